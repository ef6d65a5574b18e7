"""seg-accel: MMSegmentation-style semantic segmentation training on Hugging Face Accelerate."""
from __future__ import annotations

from typing import Any

from seg_accel.version import __version__

__all__ = ["Predictor", "__version__", "load_model"]


def __getattr__(name: str) -> Any:
    """``seg_accel.load_model`` and ``seg_accel.Predictor``, imported when first used (``import
    seg_accel`` stays light)."""
    if name == "load_model":
        from seg_accel.models import load_model

        return load_model
    if name == "Predictor":
        from seg_accel.inference.predict import Predictor

        return Predictor
    raise AttributeError(f"module 'seg_accel' has no attribute {name!r}")
