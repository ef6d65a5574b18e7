"""Cross-entropy against the SPEC formula, and the head's naming/summing rules."""
from __future__ import annotations

import math

import pytest
import torch

from seg_accel.losses import CrossEntropyLoss, HeadLosses


def reference_ce(logits, labels, weight=None, ignore=255, avg_non_ignore=False, reduction="mean"):
    """Pixel by pixel: w[y] * -log softmax(z)[y], 0 where ignored."""
    n, c, h, w = logits.shape
    total, per_pixel = 0.0, torch.zeros(n, h, w, dtype=torch.float64)
    valid = 0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = int(labels[b, i, j])
                if y == ignore:
                    continue
                z = logits[b, :, i, j].double()
                nll = -(z[y] - torch.logsumexp(z, 0))
                wy = 1.0 if weight is None else weight[y]
                per_pixel[b, i, j] = wy * nll
                total += float(wy * nll)
                valid += 1
    if reduction == "none":
        return per_pixel
    if reduction == "sum":
        return total
    return total / (valid if avg_non_ignore else n * h * w)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=gen)
    labels = torch.randint(0, 3, (2, 4, 5), generator=gen)
    labels[0, 0, :3] = 255
    labels[1, 2, 1] = 255
    return logits, labels


@pytest.mark.parametrize("avg_non_ignore", [False, True])
@pytest.mark.parametrize("weight", [None, [0.5, 2.0, 1.5]])
def test_ce_mean_matches_formula(batch, avg_non_ignore, weight):
    logits, labels = batch
    loss = CrossEntropyLoss(class_weight=weight, avg_non_ignore=avg_non_ignore, loss_weight=0.7)
    expected = 0.7 * reference_ce(logits, labels, weight, avg_non_ignore=avg_non_ignore)
    assert math.isclose(float(loss(logits, labels)), expected, rel_tol=1e-5)


def test_ce_sum_none_and_pixel_weights(batch):
    logits, labels = batch
    assert math.isclose(float(CrossEntropyLoss(reduction="sum")(logits, labels)),
                        reference_ce(logits, labels, reduction="sum"), rel_tol=1e-5)
    per_pixel = CrossEntropyLoss(reduction="none")(logits, labels)
    assert torch.allclose(per_pixel.double(), reference_ce(logits, labels, reduction="none"), atol=1e-5)
    keep = (torch.arange(40).view(2, 4, 5) % 2).float()
    weighted = CrossEntropyLoss(reduction="sum")(logits, labels, pixel_weight_nhw=keep)
    assert math.isclose(float(weighted), float((per_pixel * keep).sum()), rel_tol=1e-5)


def test_ce_own_ignore_index_beats_the_heads(batch):
    logits, labels = batch
    labels = labels.clone()
    labels[labels == 255] = 2
    own = CrossEntropyLoss(ignore_index=2)(logits, labels, ignore_index=255)
    assert math.isclose(float(own), reference_ce(logits, labels, ignore=2), rel_tol=1e-5)


def test_ignored_pixels_do_not_change_loss_or_gradients(batch):
    logits, labels = batch
    a = logits.clone().requires_grad_(True)
    b = logits.clone()
    mask = (labels == 255).unsqueeze(1).expand_as(b)
    b[mask] = torch.randn(int(mask.sum()))
    b.requires_grad_(True)
    ce = CrossEntropyLoss(class_weight=[1.0, 2.0, 3.0])
    la, lb = ce(a, labels), ce(b, labels)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    assert torch.equal(a.grad, b.grad) and (a.grad[mask] == 0).all()


def test_head_names_sums_and_logged_only_losses(batch):
    logits, labels = batch
    head = HeadLosses([
        {"type": "CrossEntropyLoss", "loss_weight": 1.0},
        {"type": "CrossEntropyLoss", "loss_weight": 0.5},  # same name: adds up
        {"type": "CrossEntropyLoss", "loss_name": "ce_monitor"},  # logged only
    ], num_classes=3)
    total, logs = head(logits, labels)
    ce = reference_ce(logits, labels)
    assert set(logs) == {"decode.loss_ce", "decode.ce_monitor", "decode.acc_seg"}
    assert math.isclose(float(logs["decode.loss_ce"]), 1.5 * ce, rel_tol=1e-5)
    assert math.isclose(float(total), 1.5 * ce, rel_tol=1e-5)
    assert head.logged_only() == ["decode.ce_monitor"]
    valid = labels != 255
    acc = ((logits.argmax(1) == labels) & valid).sum() / valid.sum() * 100
    assert math.isclose(float(logs["decode.acc_seg"]), float(acc), rel_tol=1e-6)


def test_head_resizes_logits_to_label_size():
    logits = torch.randn(1, 2, 4, 4)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    total, _ = HeadLosses([{"type": "CrossEntropyLoss"}], 2)(logits, labels)
    up = torch.nn.functional.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    assert math.isclose(float(total), reference_ce(up, labels), rel_tol=1e-5)


def test_class_weight_length_must_match():
    from seg_accel.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        HeadLosses([{"type": "CrossEntropyLoss", "class_weight": [1.0, 2.0]}], 3)
    assert info.value.key == "model.decode_head.loss_decode.class_weight"
