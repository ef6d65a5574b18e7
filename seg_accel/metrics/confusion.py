"""Dataset-level segmentation metrics from a confusion matrix (docs/behaviour.md section 8).

Each process accumulates a ``C x C`` matrix of ``bincount(C * label + pred)`` on
its device; the matrices are summed across processes once, and every metric is
derived from the sum. No process ever holds all predictions.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from seg_accel.threads import one_thread

METRIC_COLUMNS = {"mIoU": ("IoU", "Acc"), "mDice": ("Dice", "Acc"), "mFscore": ("Fscore", "Precision", "Recall")}


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """``cm[l, p]`` = number of pixels with label ``l`` predicted as ``p`` (ignored pixels left out).

    One ``bincount`` of ``C * label + pred``, no pixel copied out by a mask: when every label is a
    small non-negative number (class ids and an ``ignore_index`` below 2**16: the usual case),
    ignored pixels land in bins past ``C * C`` that are dropped; otherwise out-of-range labels are
    first sent to two extra bins (ignored, invalid). int32 indices halve the memory traffic. On
    CPU one thread does it (threads gain little on a few passes over memory and collapse when
    the machine is busy).
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    if pred.device.type == "cpu":
        with one_thread():
            return _confusion_matrix(pred, label, num_classes, ignore_index)
    return _confusion_matrix(pred, label, num_classes, ignore_index)


def _confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    c = num_classes
    dtype = torch.int32 if (max(c, ignore_index + 1) + 1) * c < 2**31 else torch.int64
    if label.numel() == 0:
        return torch.zeros(c, c, dtype=torch.long, device=label.device)
    low, high = (int(v) for v in torch.aminmax(label))
    if low >= 0 and high < 2**16 and dtype == torch.int32:  # every label's bins are within reach
        # int32 in place: mixed-type or int64 arithmetic is several times slower on CPU
        index = label.reshape(-1).to(dtype, copy=True).mul_(c).add_(pred.reshape(-1).to(dtype))
        counts = torch.bincount(index, minlength=c * c)
        beyond = counts[c * c:]  # rows of labels >= c: the ignored one, and any invalid ones
        if 0 <= ignore_index - c and ignore_index - c < beyond.numel() // c + 1:
            beyond = torch.cat([beyond[: (ignore_index - c) * c], beyond[(ignore_index - c + 1) * c:]])
        invalid = bool(beyond.any()) if beyond.numel() else False
    else:
        lab, prd = label.to(dtype).reshape(-1), pred.to(dtype).reshape(-1)
        in_range = (lab >= 0) & (lab < c)
        overflow = c * c + (lab != ignore_index).to(dtype)  # c*c: ignored, c*c + 1: invalid
        counts = torch.bincount(torch.where(in_range, lab * c + prd, overflow), minlength=c * c + 2)
        invalid = bool(counts[c * c + 1] > 0)
    if invalid:
        bad = torch.unique(label[(label != ignore_index) & ((label < 0) | (label >= c))]).tolist()
        raise ValueError(f"label values {bad[:10]} are neither a class id (0..{c - 1}) nor ignore_index ({ignore_index})")
    return counts[: c * c].view(c, c).long()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with NaN where den == 0 (a class absent from both label and prediction)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, math.nan))


def _nanmean(values: torch.Tensor) -> float:
    keep = ~torch.isnan(values)
    return float(values[keep].mean()) if keep.any() else math.nan


def metrics_from_confusion(
    cm: torch.Tensor, metrics: Sequence[str] = ("mIoU",), beta: float = 1.0
) -> dict[str, object]:
    """aAcc and the requested mean metrics (in %), plus per-class columns.

    Returns ``{'aAcc': .., 'mIoU': .., 'mAcc': .., 'per_class': {'IoU': [...], 'Acc': [...]}}``.
    """
    unknown = [m for m in metrics if m not in METRIC_COLUMNS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRIC_COLUMNS)}")
    cm = cm.double().cpu()
    inter = cm.diag()
    area_pred = cm.sum(0)
    area_label = cm.sum(1)
    union = area_pred + area_label - inter
    columns = {
        "IoU": _ratio(inter, union),
        "Acc": _ratio(inter, area_label),
        "Dice": _ratio(2 * inter, area_pred + area_label),
        "Precision": _ratio(inter, area_pred),
        "Recall": _ratio(inter, area_label),
    }
    p, r = columns["Precision"], columns["Recall"]
    columns["Fscore"] = (1 + beta**2) * p * r / (beta**2 * p + r)

    total = area_label.sum()
    result: dict[str, object] = {"aAcc": float(inter.sum() / total * 100) if total > 0 else math.nan}
    per_class: dict[str, list[float]] = {}
    for metric in metrics:
        for column in METRIC_COLUMNS[metric]:
            if column not in per_class:
                values = columns[column] * 100
                per_class[column] = values.tolist()
                result[f"m{column}"] = _nanmean(values)
    result["per_class"] = per_class
    return result


def format_table(class_names: Sequence[str], per_class: dict[str, list[float]]) -> str:
    """An aligned plain-text table: one row per class, one column per metric (2 decimals)."""
    headers = ["Class", *per_class]
    rows = [
        [name, *("nan" if math.isnan(per_class[c][i]) else f"{per_class[c][i]:.2f}" for c in per_class)]
        for i, name in enumerate(class_names)
    ]
    widths = [max(len(str(r[j])) for r in [headers, *rows]) for j in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(
            str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(cells, widths))
        ) + " |"

    sep = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    return "\n".join([sep, line(headers), sep, *(line(r) for r in rows), sep])
