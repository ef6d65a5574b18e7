"""Losses (registered in ``seg_accel.registry.LOSSES``) and the per-head loss module."""
from seg_accel.losses.cross_entropy import CrossEntropyLoss
from seg_accel.losses.head import HeadLosses, pixel_accuracy, resize_logits

__all__ = ["CrossEntropyLoss", "HeadLosses", "pixel_accuracy", "resize_logits"]
