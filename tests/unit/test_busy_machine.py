"""The parts that run one torch thread so they keep their speed on a busy machine: the same
numbers as before, the thread count restored, and faster kernels that must not change results."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from seg_accel.data.transforms import hsv_to_rgb, resize_image, rgb_to_hsv
from seg_accel.metrics import confusion_matrix
from seg_accel.threads import one_thread


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_inside_and_restored(two_threads):
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(KeyError), one_thread():
        raise KeyError("x")
    assert torch.get_num_threads() == 2  # restored after an error too


def test_one_thread_leaves_the_count_alone_off_the_main_thread(two_threads):
    seen = []

    def work():
        with one_thread():
            seen.append(torch.get_num_threads())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [2]  # the count is global: a helper thread must not change it under the main one


def confusion_by_loop(pred, label, c):
    """Labels 0..c-1 counted (even if one equals ignore_index), everything else left out."""
    cm = torch.zeros(c, c, dtype=torch.long)
    for lab, p in zip(label.reshape(-1).tolist(), pred.reshape(-1).tolist()):
        if 0 <= lab < c:
            cm[lab, p] += 1
    return cm


@pytest.mark.parametrize("classes,ignore", [(12, 255), (150, 255), (3, 0), (3, 2), (3, 3), (3, 4), (5, -1),
                                            (2, 70000), (3, 300)])
def test_confusion_matrix_paths_agree_with_a_loop(classes, ignore, two_threads):
    rng = np.random.default_rng(classes + ignore)
    label = torch.from_numpy(rng.integers(0, classes, (30, 40)))
    label[:4] = ignore
    pred = torch.from_numpy(rng.integers(0, classes, (30, 40)))
    assert torch.equal(confusion_matrix(pred, label, classes, ignore), confusion_by_loop(pred, label, classes))
    if 0 <= ignore < 256:
        assert torch.equal(confusion_matrix(pred, label.to(torch.uint8), classes, ignore),
                           confusion_by_loop(pred, label, classes))
    for bad in (classes + 7 if classes + 7 != ignore else classes + 8, -3, 2**17):
        broken = label.clone()
        broken[10, 10] = bad
        with pytest.raises(ValueError, match=str(bad)):
            confusion_matrix(pred, broken, classes, ignore)
    assert torch.get_num_threads() == 2


def hsv_to_rgb_by_masks(hsv):
    """The former implementation: one masked copy per sector."""
    hue, sat, value = hsv[0] / 30.0, hsv[1] / 255.0, hsv[2]
    sector = torch.floor(hue) % 6
    f = hue - torch.floor(hue)
    p, q, t = value * (1 - sat), value * (1 - sat * f), value * (1 - sat * (1 - f))
    choices = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)]
    out = torch.zeros((3, *value.shape), dtype=value.dtype)
    for k, (rr, gg, bb) in enumerate(choices):
        mask = sector == k
        out[0][mask], out[1][mask], out[2][mask] = rr[mask], gg[mask], bb[mask]
    return out


def test_hsv_to_rgb_gives_the_same_numbers_as_masked_copies():
    for seed in range(5):
        img = (torch.rand(3, 64, 48, generator=torch.Generator().manual_seed(seed)) * 255).floor()
        hsv = rgb_to_hsv(img)
        hsv[0] = (hsv[0] + 7 * seed) % 180
        hsv[1] = (hsv[1] * (0.6 + 0.2 * seed)).clamp(0, 255)
        assert torch.equal(hsv_to_rgb(hsv), hsv_to_rgb_by_masks(hsv))
    grey = torch.full((3, 4, 4), 77.0)  # no chroma: hue 0, any sector logic must give back the grey
    assert torch.equal(hsv_to_rgb(rgb_to_hsv(grey)), grey)


def test_resize_gives_the_same_numbers_as_the_plain_layout():
    img = (torch.rand(3, 37, 53, generator=torch.Generator().manual_seed(0)) * 255).floor()
    for size in ((74, 106), (20, 30), (37, 53)):
        expected = torch.nn.functional.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
        assert torch.equal(resize_image(img, size).contiguous(), expected)


def test_ohem_restores_the_thread_count(two_threads):
    from seg_accel.losses.ohem import OHEMPixelSampler

    logits = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (1, 16, 16), generator=torch.Generator().manual_seed(1))
    weight = OHEMPixelSampler(thresh=0.7, min_kept=10).sample(logits, labels, 255)
    assert weight.shape == labels.shape and weight.sum() >= 10
    assert torch.get_num_threads() == 2


def test_label_map_keeps_uint8_labels():
    from seg_accel.data.base import label_lookup

    lut = label_lookup({11: 255}, reduce_zero_label=False)
    assert lut.dtype == np.uint8 and lut[11] == 255 and lut[3] == 3
    lut = label_lookup(None, reduce_zero_label=True)
    assert lut.dtype == np.uint8 and lut[0] == 255 and lut[1] == 0 and lut[255] == 255
