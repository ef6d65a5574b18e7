"""Binary (foreground vs background) metrics: the headline numbers of a 2-class task from the
confusion matrix, and ROC/PR curves, their areas and the best threshold from streamed
histograms of the foreground probability.

Histograms: every evaluated pixel (ignore excluded) falls into bin ``k = ceil(p * B) - 1``
(clamped to ``0..B-1``; ``B = SCORE_BINS``), so ``p > k / B`` exactly when its bin is ``>= k``;
positives and negatives are counted apart. Memory stays at ``2 B`` counts whatever the number
of images, and the counts add up across processes. The curves are those of the scores rounded
to their bins: the areas equal scikit-learn's ``roc_auc_score`` / ``average_precision_score``
on the binned scores exactly, and differ from the areas on the raw scores only through
positive/negative pairs that share a bin (``auc_bin_error_bound``: at most
``0.5 * sum_k pos_k * neg_k / (P * N)``).
"""
from __future__ import annotations

import math
from typing import Any

import torch

SCORE_BINS = 10000
BINARY_COLUMNS = ("fgIoU", "fgDice", "Sensitivity", "Specificity", "Precision")


def binary_from_confusion(cm: torch.Tensor, foreground: int = 1) -> dict[str, float]:
    """Foreground IoU and Dice, sensitivity (recall), specificity and precision, in %, from a 2x2
    confusion matrix (rows: truth, columns: prediction). NaN where a ratio has no denominator."""
    cm = cm.double().cpu()
    if cm.shape != (2, 2):
        raise ValueError(f"binary metrics need 2 classes, got a {tuple(cm.shape)} confusion matrix")
    background = 1 - foreground
    tp, fn = cm[foreground, foreground].item(), cm[foreground, background].item()
    fp, tn = cm[background, foreground].item(), cm[background, background].item()

    def ratio(num: float, den: float) -> float:
        return num / den * 100 if den > 0 else math.nan

    return {"fgIoU": ratio(tp, tp + fp + fn), "fgDice": ratio(2 * tp, 2 * tp + fp + fn),
            "Sensitivity": ratio(tp, tp + fn), "Specificity": ratio(tn, tn + fp), "Precision": ratio(tp, tp + fp)}


def foreground_probability(scores: torch.Tensor, augmented: bool) -> torch.Tensor:
    """``(N, H, W)`` foreground probability from an inferencer's scores: a 1-channel head's
    sigmoid (already probabilities with test-time augmentation), else the second class's softmax."""
    if scores.shape[1] == 1:
        return scores[:, 0] if augmented else scores[:, 0].sigmoid()
    if scores.shape[1] != 2:
        raise ValueError(f"foreground probabilities need 2 classes, got {scores.shape[1]}")
    return scores[:, 1] if augmented else scores.softmax(1)[:, 1]


def score_bins(prob: torch.Tensor, bins: int = SCORE_BINS) -> torch.Tensor:
    """Bin of each probability: ``ceil(p * bins) - 1`` clamped to ``0..bins-1`` (float64: ``p * bins``
    is exact for float32 ``p``, so ``bin >= k`` exactly when ``p > k / bins``)."""
    return (torch.ceil(prob.double() * bins) - 1).clamp_(0, bins - 1).long()


class ScoreHistogram:
    """Streamed counts of positive and negative pixels per foreground-probability bin."""

    def __init__(self, bins: int = SCORE_BINS, device: torch.device | str = "cpu"):
        self.bins = bins
        self.counts = torch.zeros(2, bins, dtype=torch.long, device=device)  # [negatives, positives]

    def update(self, prob: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, foreground: int = 1) -> None:
        valid = labels != ignore_index
        index = score_bins(prob[valid], self.bins) + self.bins * (labels[valid] == foreground).long()
        self.counts += torch.bincount(index, minlength=2 * self.bins).view(2, self.bins)

    @property
    def negatives(self) -> torch.Tensor:
        return self.counts[0]

    @property
    def positives(self) -> torch.Tensor:
        return self.counts[1]


def curves(positives: torch.Tensor, negatives: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cumulative counts from the highest bin down: entry ``j`` predicts foreground for the top
    ``j`` bins (threshold ``(B - j) / B``), from nothing (``j = 0``) to everything (``j = B``)."""
    pos = positives.double().cpu().flip(0)
    neg = negatives.double().cpu().flip(0)
    zero = torch.zeros(1, dtype=torch.float64)
    tp = torch.cat([zero, pos.cumsum(0)])
    fp = torch.cat([zero, neg.cumsum(0)])
    return {"tp": tp, "fp": fp, "P": pos.sum(), "N": neg.sum()}


def roc_pr(positives: torch.Tensor, negatives: torch.Tensor) -> dict[str, Any]:
    """ROC AUC, PR AUC (average precision, scikit-learn's definition: sum of recall steps times
    precision) and the points of both curves, from the histograms."""
    c = curves(positives, negatives)
    tp, fp, total_pos, total_neg = c["tp"], c["fp"], c["P"].item(), c["N"].item()
    if total_pos == 0 or total_neg == 0:
        return {"AUC_ROC": math.nan, "AUC_PR": math.nan, "auc_bin_error_bound": math.nan,
                "fpr": [], "tpr": [], "recall": [], "precision": []}
    tpr, fpr = tp / total_pos, fp / total_neg
    roc_auc = float(torch.trapezoid(tpr, fpr))
    predicted = tp + fp
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), torch.ones_like(tp))
    recall_steps = tpr[1:] - tpr[:-1]
    average_precision = float((recall_steps * precision[1:]).sum())
    bound = 0.5 * float((positives.double().cpu() * negatives.double().cpu()).sum()) / (total_pos * total_neg)
    # the curves at the bins where something changes (a short list for JSON and charts)
    changed = torch.ones_like(tp, dtype=torch.bool)
    changed[1:] = (tp[1:] != tp[:-1]) | (fp[1:] != fp[:-1])
    return {"AUC_ROC": roc_auc * 100, "AUC_PR": average_precision * 100, "auc_bin_error_bound": bound * 100,
            "fpr": fpr[changed].tolist(), "tpr": tpr[changed].tolist(),
            "recall": tpr[changed].tolist(), "precision": precision[changed].tolist()}


def threshold_sweep(positives: torch.Tensor, negatives: torch.Tensor, by: str = "fgDice") -> dict[str, float]:
    """The threshold ``t = k / B`` (``k = 1..B-1``; foreground where ``p > t``) that maximises
    foreground Dice (``by: fgIoU``: IoU), with the binary metrics there; ties: the lowest ``t``."""
    bins = positives.numel()
    c = curves(positives, negatives)
    # foreground for bins >= k  <->  the top (B - k) bins  <->  curve entry j = B - k
    k = torch.arange(1, bins)
    j = bins - k
    tp, fp = c["tp"][j], c["fp"][j]
    fn = c["P"] - tp
    tn = c["N"] - fp
    dice = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.zeros_like(tp))
    iou = torch.where(tp + fp + fn > 0, tp / (tp + fp + fn).clamp_min(1), torch.zeros_like(tp))
    score = {"fgDice": dice, "fgIoU": iou}[by]
    best = int(torch.nonzero(score == score.max())[0])  # the first maximum: the lowest threshold
    cm = torch.tensor([[tn[best], fp[best]], [fn[best], tp[best]]], dtype=torch.float64)
    return {"threshold": float(k[best]) / bins, "by": by, **binary_from_confusion(cm)}
