"""seg-accel's segmentation metric as a Hugging Face ``evaluate`` module.

    import evaluate
    from seg_accel.metrics import evaluate_module_path
    metric = evaluate.load(evaluate_module_path())
    metric.compute(predictions=[...], references=[...], num_labels=19, ignore_index=255)

The numbers are those of ``seg_accel.metrics.metrics_from_confusion`` (dataset-level
areas, docs/behaviour.md section 8): ``aAcc``, ``mIoU``, ``mAcc`` (plus ``mDice``, ``mFscore``,
``mPrecision``, ``mRecall`` with ``metrics=[...]``) in %, and the per-class columns.
"""
from __future__ import annotations

import datasets
import evaluate
import numpy as np
import torch

from seg_accel.metrics.confusion import confusion_matrix, metrics_from_confusion

_DESCRIPTION = "Semantic segmentation metrics from a dataset-level confusion matrix (seg-accel)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: class-id maps (H, W), one per image.
    references: label maps (H, W), same sizes; `ignore_index` pixels are left out.
    num_labels: the number of classes.
    ignore_index: the label of pixels to leave out (default 255).
    reduce_labels: 0 becomes ignore_index and every other label decreases by 1 (default False).
    metrics: any of "mIoU", "mDice", "mFscore" (default ["mIoU"]).
Returns:
    aAcc, mIoU, mAcc, ... in %, and per_class: {IoU: [...], Acc: [...], ...}.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SegMetric(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
            }),
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index: int = 255,
                 reduce_labels: bool = False, metrics: list[str] | None = None) -> dict:
        cm = torch.zeros(num_labels, num_labels, dtype=torch.long)
        for pred, label in zip(predictions, references):
            label = torch.as_tensor(np.asarray(label), dtype=torch.int64)
            if reduce_labels:
                label = torch.where(label == 0, ignore_index, label - 1)
                label = torch.where(label == ignore_index - 1, ignore_index, label)
            cm += confusion_matrix(torch.as_tensor(np.asarray(pred), dtype=torch.int64), label, num_labels,
                                   ignore_index)
        return metrics_from_confusion(cm, metrics or ["mIoU"])
