"""Losses (registered in ``seg_accel.registry.LOSSES``), OHEM, and the per-head loss module."""
from seg_accel.losses.cross_entropy import CrossEntropyLoss
from seg_accel.losses.dice import DiceLoss
from seg_accel.losses.focal import FocalLoss
from seg_accel.losses.head import HeadLosses, build_head_losses, pixel_accuracy, predict, resize_logits
from seg_accel.losses.lovasz import LovaszLoss
from seg_accel.losses.ohem import OHEMPixelSampler

__all__ = [
    "CrossEntropyLoss",
    "DiceLoss",
    "FocalLoss",
    "HeadLosses",
    "LovaszLoss",
    "OHEMPixelSampler",
    "build_head_losses",
    "pixel_accuracy",
    "predict",
    "resize_logits",
]
