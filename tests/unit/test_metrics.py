"""Confusion-matrix metrics against hand-computed numbers (docs/behaviour.md section 8)."""
from __future__ import annotations

import math

import pytest
import torch

from seg_accel.metrics import confusion_matrix, format_table, metrics_from_confusion


def test_confusion_matrix_counts_and_ignores():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, label, 3, 255)
    assert cm.tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 1]]


def test_metrics_hand_computed():
    # label 0: 2 px (1 right), label 1: 3 px (2 right), label 2: 2 px (1 right)
    cm = torch.tensor([[1, 1, 0], [1, 2, 0], [1, 0, 1]])
    r = metrics_from_confusion(cm, ("mIoU", "mDice", "mFscore"))
    inter, pred, lab = [1, 2, 1], [3, 3, 1], [2, 3, 2]
    iou = [i / (p + l - i) * 100 for i, p, l in zip(inter, pred, lab)]
    assert r["per_class"]["IoU"] == pytest.approx(iou)
    assert r["mIoU"] == pytest.approx(sum(iou) / 3)
    assert r["aAcc"] == pytest.approx(4 / 7 * 100)
    assert r["per_class"]["Acc"] == pytest.approx([50.0, 200 / 3, 50.0])
    assert r["per_class"]["Dice"] == pytest.approx([2 * i / (p + l) * 100 for i, p, l in zip(inter, pred, lab)])
    prec = [i / p for i, p in zip(inter, pred)]
    rec = [i / l for i, l in zip(inter, lab)]
    f1 = [2 * p * q / (p + q) * 100 for p, q in zip(prec, rec)]
    assert r["per_class"]["Fscore"] == pytest.approx(f1)
    assert r["mFscore"] == pytest.approx(sum(f1) / 3)


def test_absent_class_is_nan_and_left_out_of_the_mean():
    cm = torch.tensor([[3, 0, 0], [0, 1, 0], [0, 0, 0]])  # class 2 neither in labels nor predictions
    r = metrics_from_confusion(cm)
    assert math.isnan(r["per_class"]["IoU"][2])
    assert r["mIoU"] == pytest.approx(100.0)
    assert "nan" in format_table(["a", "b", "c"], r["per_class"])


def test_dataset_level_not_image_average():
    # two images: per-image IoU averaging would give a different number
    p1, l1 = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0])
    p2, l2 = torch.tensor([1, 1]), torch.tensor([1, 0])
    cm = confusion_matrix(p1, l1, 2) + confusion_matrix(p2, l2, 2)
    r = metrics_from_confusion(cm)
    # class 0: I=3, P=3, L=5 -> 3/5; class 1: I=1, P=3, L=1 -> 1/3
    assert r["per_class"]["IoU"] == pytest.approx([3 / 5 * 100, 1 / 3 * 100])
    per_image_class0 = (3 / 4 + 0 / 1) / 2 * 100
    assert r["per_class"]["IoU"][0] != pytest.approx(per_image_class0)


def test_bad_label_value_is_an_error():
    with pytest.raises(ValueError, match="7"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 7]), 3)


def test_table_is_aligned():
    table = format_table(["background", "cat"], {"IoU": [91.234, 5.0], "Acc": [99.0, 50.5]})
    lines = table.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "91.23" in table and "| cat " in table
