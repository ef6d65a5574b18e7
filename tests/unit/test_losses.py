"""Cross-entropy against the docs/behaviour.md formula, and the head's naming/summing rules."""
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


# ----------------------------------------------------------------------------- class weights from files
@pytest.mark.parametrize("suffix", [".npy", ".json", ".yaml", ".json-dict"])
def test_class_weight_files(tmp_path, batch, suffix):
    import json

    import numpy as np
    import yaml

    weights = [0.5, 2.0, 1.5]
    path = tmp_path / f"w{suffix.split('-')[0]}"
    if suffix == ".npy":
        np.save(path, np.array(weights))
    elif suffix == ".json":
        path.write_text(json.dumps(weights))
    elif suffix == ".yaml":
        path.write_text(yaml.safe_dump(weights))
    else:  # what scripts/class_weights.py writes
        path.write_text(json.dumps({"method": "median_freq", "class_weight": weights, "classes": ["a", "b", "c"]}))
    logits, labels = batch
    loss = CrossEntropyLoss(class_weight=str(path))
    assert loss.class_weight == weights
    assert math.isclose(float(loss(logits, labels)), reference_ce(logits, labels, weights), rel_tol=1e-5)


def test_class_weight_file_errors(tmp_path):
    from seg_accel.errors import ConfigError

    with pytest.raises(ConfigError, match="not found") as info:
        CrossEntropyLoss(class_weight=str(tmp_path / "missing.json"))
    assert info.value.key == "class_weight"
    (tmp_path / "bad.json").write_text('{"weights": [1, 2]}')
    with pytest.raises(ConfigError, match="list of numbers"):
        CrossEntropyLoss(class_weight=str(tmp_path / "bad.json"))


# ----------------------------------------------------------------------------- sigmoid cross-entropy
def reference_bce(z, t):
    return max(z, 0) - z * t + math.log1p(math.exp(-abs(z)))


def test_sigmoid_multiclass_matches_formula(batch):
    logits, labels = batch
    weights = [0.5, 2.0, 1.5]
    for avg_non_ignore in (False, True):
        loss = CrossEntropyLoss(use_sigmoid=True, class_weight=weights, avg_non_ignore=avg_non_ignore)
        n, c, h, w = logits.shape
        total, valid = 0.0, 0
        for b in range(n):
            for i in range(h):
                for j in range(w):
                    y = int(labels[b, i, j])
                    if y == 255:
                        continue
                    valid += 1
                    for k in range(c):
                        total += weights[k] * reference_bce(float(logits[b, k, i, j]), float(k == y))
        expected = total / ((valid if avg_non_ignore else n * h * w) * c)
        assert math.isclose(float(loss(logits, labels)), expected, rel_tol=1e-5)


def test_sigmoid_one_channel_binary_matches_formula():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 3, 4, generator=gen)
    labels = torch.randint(0, 2, (2, 3, 4), generator=gen)
    labels[0, 0, 0] = 255
    loss = CrossEntropyLoss(use_sigmoid=True, class_weight=[1.0, 3.0])
    total = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(4):
                y = int(labels[b, i, j])
                if y != 255:
                    total += [1.0, 3.0][y] * reference_bce(float(logits[b, 0, i, j]), float(y))
    assert math.isclose(float(loss(logits, labels)), total / 24, rel_tol=1e-5)
    with pytest.raises(ValueError, match="0 and 1"):
        loss(logits, torch.full((2, 3, 4), 2))


# ----------------------------------------------------------------------------- Dice, Focal, Lovasz
def brute_dice(logits, labels, smooth=1.0, exponent=2.0, class_weight=None, ignore=255):
    probs = logits.double().softmax(1)
    n, c, h, w = logits.shape
    per_class = []
    for k in range(c):
        per_image = []
        for b in range(n):
            inter = p_sum = y_sum = 0.0
            for i in range(h):
                for j in range(w):
                    if int(labels[b, i, j]) == ignore:
                        continue
                    p, y = float(probs[b, k, i, j]), float(int(labels[b, i, j]) == k)
                    inter += p * y
                    p_sum += p**exponent
                    y_sum += y**exponent
            per_image.append(1 - (2 * inter + smooth) / (p_sum + y_sum + smooth))
        value = sum(per_image) / n
        per_class.append(value * (class_weight[k] if class_weight else 1.0))
    return sum(per_class) / c


@pytest.mark.parametrize("options", [{}, {"smooth": 0.5, "exponent": 1.0}, {"class_weight": [1.0, 0.2, 3.0]}])
def test_dice_matches_brute_force(batch, options):
    from seg_accel.losses import DiceLoss

    logits, labels = batch
    loss = DiceLoss(loss_weight=2.0, **options)(logits, labels)
    assert math.isclose(float(loss), 2.0 * brute_dice(logits, labels, **options), rel_tol=1e-5)


@pytest.mark.parametrize("alpha, gamma", [(0.5, 2.0), (0.25, 0.0), ([0.3, 0.5, 0.7], 1.5)])
def test_focal_matches_brute_force(batch, alpha, gamma):
    from seg_accel.losses import FocalLoss

    logits, labels = batch
    weights = [1.0, 2.0, 0.5]
    n, c, h, w = logits.shape
    total = 0.0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = int(labels[b, i, j])
                if y == 255:
                    continue
                for k in range(c):
                    z, t = float(logits[b, k, i, j]), float(k == y)
                    p = 1 / (1 + math.exp(-z))
                    a = alpha[k] if isinstance(alpha, list) else alpha
                    focal = (a * t + (1 - a) * (1 - t)) * (t * (1 - p) + (1 - t) * p) ** gamma
                    total += weights[k] * reference_bce(z, t) * focal
    loss = FocalLoss(alpha=alpha, gamma=gamma, class_weight=weights, loss_weight=3.0)(logits, labels)
    assert math.isclose(float(loss), 3.0 * total / (n * c * h * w), rel_tol=1e-5)


def brute_lovasz_class(probs_k, fg):
    """The Lovasz extension of the Jaccard set loss, evaluated from its definition with sets."""
    errors = [abs(f - p) for p, f in zip(probs_k, fg)]
    order = sorted(range(len(errors)), key=lambda i: -errors[i])
    gt = {i for i, f in enumerate(fg) if f}

    def jaccard_loss(mistakes):
        union = gt | mistakes
        return 1 - len(gt - mistakes) / len(union) if union else 0.0

    total, chosen, previous = 0.0, set(), 0.0
    for i in order:
        chosen.add(i)
        current = jaccard_loss(chosen)
        total += errors[i] * (current - previous)
        previous = current
    return total


def brute_lovasz(logits, labels, per_image, ignore=255):
    probs = logits.double().softmax(1)
    groups = [[b] for b in range(logits.shape[0])] if per_image else [list(range(logits.shape[0]))]
    values = []
    for images in groups:
        pixels = [(b, i, j) for b in images for i in range(labels.shape[1]) for j in range(labels.shape[2])
                  if int(labels[b, i, j]) != ignore]
        per_class = []
        for k in range(logits.shape[1]):
            fg = [int(labels[p]) == k for p in pixels]
            if any(fg):
                per_class.append(brute_lovasz_class([float(probs[b, k, i, j]) for b, i, j in pixels], fg))
        values.append(sum(per_class) / len(per_class))
    return sum(values) / len(values)


@pytest.mark.parametrize("per_image", [False, True])
def test_lovasz_matches_brute_force(batch, per_image):
    from seg_accel.losses import LovaszLoss

    logits, labels = batch
    loss = LovaszLoss(per_image=per_image)(logits, labels)
    assert math.isclose(float(loss), brute_lovasz(logits, labels, per_image), rel_tol=1e-5)


ALL_LOSSES = [
    ("CrossEntropyLoss", {"class_weight": [1.0, 2.0, 3.0]}),
    ("CrossEntropyLoss", {"class_weight": [1.0, 2.0, 3.0], "avg_non_ignore": True}),
    ("CrossEntropyLoss", {"use_sigmoid": True, "class_weight": [1.0, 2.0, 3.0]}),
    ("DiceLoss", {"class_weight": [1.0, 2.0, 3.0]}),
    ("FocalLoss", {"class_weight": [1.0, 2.0, 3.0]}),
    ("LovaszLoss", {"per_image": False}),
    ("LovaszLoss", {"per_image": True, "class_weight": [1.0, 2.0, 3.0]}),
]


@pytest.mark.parametrize("name, options", ALL_LOSSES)
def test_ignored_pixels_change_neither_loss_nor_gradient(batch, name, options):
    from seg_accel.registry import LOSSES

    logits, labels = batch
    loss_fn = LOSSES.build({"type": name, **options}, "loss")
    mask = (labels == 255).unsqueeze(1).expand_as(logits)
    a = logits.clone().requires_grad_(True)
    b = logits.clone()
    b[mask] = torch.randn(int(mask.sum())) * 50
    b.requires_grad_(True)
    la, lb = loss_fn(a, labels), loss_fn(b, labels)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, rtol=1e-6, atol=1e-7)
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert (a.grad[mask] == 0).all() and (b.grad[mask] == 0).all()
