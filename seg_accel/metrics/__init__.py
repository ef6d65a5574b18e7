"""Segmentation metrics from confusion matrices."""
from seg_accel.metrics.confusion import (
    METRIC_COLUMNS,
    confusion_matrix,
    format_table,
    metrics_from_confusion,
)

__all__ = ["METRIC_COLUMNS", "confusion_matrix", "format_table", "metrics_from_confusion"]
