"""``mask_dir``: pixels outside a field-of-view mask change no loss, gradient or metric."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from seg_accel.data import build_dataset
from seg_accel.errors import DataError
from seg_accel.losses.head import HeadLosses
from seg_accel.metrics import confusion_matrix, metrics_from_confusion
from seg_accel.metrics.binary import binary_from_confusion
from tests.conftest import NORMALIZE

SIZE = (40, 48)


def fov(size=SIZE) -> np.ndarray:
    """A disc, as retinal field-of-view masks are (255 inside, 0 outside)."""
    yy, xx = np.mgrid[: size[0], : size[1]]
    return (((yy - size[0] / 2) ** 2 + (xx - size[1] / 2) ** 2) < (0.45 * min(size)) ** 2).astype(np.uint8) * 255


def write_fov_data(root, noise_seed: int, count: int = 3):
    """The same images and labels inside the field of view; outside, labels are noise that
    depends on ``noise_seed``."""
    rng, noise = np.random.default_rng(0), np.random.default_rng(noise_seed)
    for sub in ("img", "ann", "fov"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    inside = fov() > 0
    for i in range(count):
        image = rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
        label = (rng.random(SIZE) < 0.2).astype(np.uint8)
        label[~inside] = noise.integers(0, 2, SIZE, dtype=np.uint8)[~inside]
        Image.fromarray(image).save(root / "img" / f"{i:02d}_test.tif")
        Image.fromarray(label).save(root / "ann" / f"{i:02d}_manual1.png")
        Image.fromarray(fov()).save(root / "fov" / f"{i:02d}_test_mask.png")


def dataset(root, pipeline, test_mode=False, **extra):
    ds = build_dataset({"type": "CustomDataset", "data_root": str(root), "img_dir": "img", "ann_dir": "ann",
                        "img_suffix": "_test.tif", "seg_map_suffix": "_manual1.png", "mask_dir": "fov",
                        "mask_suffix": "_test_mask.png", "classes": ["background", "vessel"],
                        "pipeline": pipeline, **extra}, "data.train")
    ds.test_mode = test_mode
    return ds


TRAIN_PIPELINE = [{"type": "RandomResize", "scale": [48, 40], "ratio_range": [0.8, 1.5], "keep_ratio": True},
                  {"type": "RandomCrop", "crop_size": [32, 32]}, {"type": "RandomFlip", "prob": 0.5}, NORMALIZE]


def test_outside_the_mask_is_ignored_in_every_sample(tmp_path):
    write_fov_data(tmp_path, noise_seed=1)
    ds = dataset(tmp_path, [NORMALIZE], test_mode=True)
    outside = fov() == 0
    for i in range(len(ds)):
        label = ds[i]["labels"].numpy()
        assert (label[outside] == 255).all() and set(np.unique(label[~outside])) <= {0, 1}


def test_loss_gradient_and_metrics_do_not_see_outside_pixels(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_fov_data(a, noise_seed=1)
    write_fov_data(b, noise_seed=2)
    raw_a = np.asarray(Image.open(a / "ann" / "00_manual1.png"))
    raw_b = np.asarray(Image.open(b / "ann" / "00_manual1.png"))
    assert (raw_a != raw_b).any()  # the files differ (outside)
    losses = HeadLosses([{"type": "CrossEntropyLoss"}, {"type": "DiceLoss", "loss_weight": 0.5}], 2)
    for i in range(3):  # training samples with random augmentation, the same seed for both
        sample_a, sample_b = dataset(a, TRAIN_PIPELINE)[(i, 7)], dataset(b, TRAIN_PIPELINE)[(i, 7)]
        assert torch.equal(sample_a["pixel_values"], sample_b["pixel_values"])
        grads, totals = [], []
        for sample in (sample_a, sample_b):
            torch.manual_seed(0)
            model = torch.nn.Conv2d(3, 2, 3, padding=1)
            total, _ = losses(model(sample["pixel_values"][None]), sample["labels"][None])
            total.backward()
            totals.append(total.detach())
            grads.append(model.weight.grad.clone())
        assert torch.equal(totals[0], totals[1]) and torch.equal(grads[0], grads[1])
    # metrics: predictions that differ only outside the mask score the same
    label = dataset(a, [NORMALIZE], test_mode=True)[0]["labels"]
    rng = np.random.default_rng(3)
    pred = torch.from_numpy(rng.integers(0, 2, SIZE))
    other = pred.clone()
    other[torch.from_numpy(fov() == 0)] = torch.from_numpy(rng.integers(0, 2, SIZE))[torch.from_numpy(fov() == 0)]
    assert (other != pred).any()
    cm_a, cm_b = confusion_matrix(pred, label, 2), confusion_matrix(other, label, 2)
    assert torch.equal(cm_a, cm_b)
    assert binary_from_confusion(cm_a) == binary_from_confusion(cm_b)
    assert metrics_from_confusion(cm_a, ["mIoU", "mDice"])["aAcc"] == metrics_from_confusion(cm_b, ["mIoU"])["aAcc"]
    assert int(cm_a.sum()) == int((fov() > 0).sum())  # only the field of view is counted


def test_a_missing_or_misfit_mask_names_the_sample(tmp_path):
    write_fov_data(tmp_path, noise_seed=1)
    (tmp_path / "fov" / "01_test_mask.png").unlink()
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "fov" / "02_test_mask.png")
    ds = dataset(tmp_path, [NORMALIZE], test_mode=True)
    with pytest.raises(DataError, match=r"index 1.*no region mask .*01_test_mask.png"):
        ds[1]
    with pytest.raises(DataError, match=r"index 2.*region mask is 10x10 \(w x h\) but the label is 48x40"):
        ds[2]
    from seg_accel.errors import ConfigError

    with pytest.raises(ConfigError, match="mask_dir"):
        dataset(tmp_path, [NORMALIZE], mask_dir="nowhere")
