"""A 1-channel (sigmoid) head: CE with pos_weight, Dice, Focal and the Lovasz hinge against
brute-force per-pixel references; ignored pixels count nowhere; config checks."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from seg_accel.errors import ConfigError
from seg_accel.losses.head import HeadLosses
from seg_accel.registry import LOSSES

IGNORE = 255


def batch(seed=0, shape=(2, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], 1, *shape[1:], generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 2, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.15] = IGNORE
    return logits, labels


def sigmoid(z):
    return 1 / (1 + math.exp(-z))


def pixels(logits, labels):
    """(z, y) of every pixel, ignored included (y = None)."""
    for n, i, j in itertools.product(*map(range, labels.shape)):
        y = int(labels[n, i, j])
        yield float(logits[n, 0, i, j]), (None if y == IGNORE else y)


@pytest.mark.parametrize("pos_weight", [None, 3.0])
@pytest.mark.parametrize("class_weight", [None, [0.5, 2.0]])
def test_sigmoid_ce_with_pos_weight(pos_weight, class_weight):
    logits, labels = batch(1)
    loss = LOSSES.build({"type": "CrossEntropyLoss", "use_sigmoid": True, "pos_weight": pos_weight,
                         "class_weight": class_weight}, "loss")
    total = 0.0
    for z, y in pixels(logits, labels):
        if y is None:
            continue
        p = sigmoid(z)
        term = -((pos_weight or 1.0) * y * math.log(p) + (1 - y) * math.log(1 - p))
        total += term * (class_weight[y] if class_weight else 1.0)
    expected = total / labels.numel()  # mean over every pixel (MMSegmentation's default)
    assert abs(loss(logits, labels, ignore_index=IGNORE).item() - expected) < 1e-10


@pytest.mark.parametrize("smooth,exponent", [(1.0, 2.0), (0.0, 1.0)])
def test_dice_on_one_channel(smooth, exponent):
    logits, labels = batch(2)
    loss = LOSSES.build({"type": "DiceLoss", "smooth": smooth, "exponent": exponent}, "loss")
    per_image = []
    for n in range(labels.shape[0]):
        inter = p_sum = y_sum = 0.0
        for z, y in pixels(logits[n:n + 1], labels[n:n + 1]):
            if y is None:
                continue
            p = sigmoid(z)
            inter, p_sum, y_sum = inter + p * y, p_sum + p ** exponent, y_sum + y ** exponent
        per_image.append(1 - (2 * inter + smooth) / (p_sum + y_sum + smooth))
    assert abs(loss(logits, labels, ignore_index=IGNORE).item() - np.mean(per_image)) < 1e-6


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (0.0, 0.5), (1.5, [0.4, 0.7])])
def test_focal_on_one_channel(gamma, alpha):
    logits, labels = batch(3)
    loss = LOSSES.build({"type": "FocalLoss", "gamma": gamma, "alpha": alpha}, "loss")
    a = alpha[-1] if isinstance(alpha, list) else alpha
    total = 0.0
    for z, y in pixels(logits, labels):
        if y is None:
            continue
        p = sigmoid(z)
        bce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
        total += bce * (a * y + (1 - a) * (1 - y)) * (y * (1 - p) + (1 - y) * p) ** gamma
    assert abs(loss(logits, labels, ignore_index=IGNORE).item() - total / labels.numel()) < 1e-6


def lovasz_hinge_brute(zs, ys):
    """The Lovasz extension of the Jaccard loss by its definition: errors sorted down, each
    weighted by how much the Jaccard loss of the set of the i worst pixels grows at i."""
    errors = [max(0.0, 1 - z * (2 * y - 1)) for z, y in zip(zs, ys)]
    order = sorted(range(len(zs)), key=lambda i: -(1 - zs[i] * (2 * ys[i] - 1)))
    truth = {i for i, y in enumerate(ys) if y == 1}

    def jaccard_loss(wrong):  # |M| / |G u M| for the set M of mispredicted pixels
        union = truth | wrong
        return len(wrong) / len(union) if union else 0.0

    total, previous = 0.0, 0.0
    for k in range(1, len(order) + 1):
        current = jaccard_loss(set(order[:k]))
        total += errors[order[k - 1]] * (current - previous)
        previous = current
    return total


@pytest.mark.parametrize("per_image", [False, True])
def test_lovasz_hinge_on_one_channel(per_image):
    logits, labels = batch(4)
    loss = LOSSES.build({"type": "LovaszLoss", "loss_type": "binary", "per_image": per_image}, "loss")
    groups = [range(labels.shape[0])] if not per_image else [[n] for n in range(labels.shape[0])]
    values = []
    for group in groups:
        zs, ys = [], []
        for n in group:
            for z, y in pixels(logits[n:n + 1], labels[n:n + 1]):
                if y is not None:
                    zs.append(z)
                    ys.append(y)
        values.append(lovasz_hinge_brute(zs, ys))
    assert abs(loss(logits, labels, ignore_index=IGNORE).item() - np.mean(values)) < 1e-6  # computed in float32


@pytest.mark.parametrize("cfg", [
    {"type": "CrossEntropyLoss", "use_sigmoid": True, "pos_weight": 2.0},
    {"type": "DiceLoss"}, {"type": "FocalLoss"}, {"type": "LovaszLoss", "loss_type": "binary"},
])
def test_ignored_pixels_change_neither_loss_nor_gradient(cfg):
    logits, labels = batch(5)
    other = logits.clone()
    other[labels.unsqueeze(1) == IGNORE] = torch.randn(int((labels == IGNORE).sum()), dtype=torch.float64) * 5
    losses = HeadLosses([cfg], 2)
    grads = []
    for z in (logits, other):
        z = z.clone().requires_grad_(True)
        total, _ = losses(z, labels)
        total.backward()
        grads.append((total.detach(), z.grad[labels.unsqueeze(1) != IGNORE]))
        assert (z.grad[labels.unsqueeze(1) == IGNORE] == 0).all()
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-12) and torch.allclose(grads[0][1], grads[1][1], atol=1e-12)


def test_one_channel_config_checks(tmp_path):
    from seg_accel.config import load_config
    from seg_accel.validate import validate_train_config
    from tests.conftest import NORMALIZE, tiny_config, write_yaml

    from tests.unit.test_binary_metrics import binary_folder

    binary_folder(tmp_path / "data", count=2)

    def config(loss):
        cfg = tiny_config()
        two = {"type": "CustomDataset", "data_root": str(tmp_path / "data"), "img_dir": "img", "ann_dir": "ann",
               "img_suffix": ".png", "pipeline": [NORMALIZE], "classes": ["background", "vessel"]}
        cfg["data"]["train"], cfg["data"]["val"] = dict(two), dict(two)
        cfg["model"]["decode_head"] = {"out_channels": 1, "loss_decode": loss}
        return validate_train_config(load_config(str(write_yaml(tmp_path / "c.yaml", cfg))))

    config([{"type": "CrossEntropyLoss", "use_sigmoid": True, "pos_weight": 5.0},
            {"type": "DiceLoss", "loss_weight": 0.5}, {"type": "LovaszLoss", "loss_type": "binary"},
            {"type": "FocalLoss"}])
    with pytest.raises(ConfigError, match=r"loss_decode.*LovaszLoss with loss_type: binary"):
        config({"type": "LovaszLoss"})
    with pytest.raises(ConfigError, match=r"pos_weight.*use_sigmoid: true"):
        LOSSES.build({"type": "CrossEntropyLoss", "pos_weight": 2.0}, "loss")
    with pytest.raises(ConfigError, match=r"pos_weight.*must be > 0"):
        LOSSES.build({"type": "CrossEntropyLoss", "use_sigmoid": True, "pos_weight": 0}, "loss")
