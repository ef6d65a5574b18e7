"""Segmentation metrics from confusion matrices."""
from pathlib import Path

from seg_accel.metrics.confusion import (
    METRIC_COLUMNS,
    confusion_matrix,
    format_table,
    metrics_from_confusion,
)

__all__ = ["METRIC_COLUMNS", "confusion_matrix", "evaluate_module_path", "format_table", "metrics_from_confusion"]


def evaluate_module_path() -> str:
    """The file ``evaluate.load`` takes to get seg-accel's metric as an ``evaluate`` module."""
    return str(Path(__file__).with_name("seg_metric.py"))
