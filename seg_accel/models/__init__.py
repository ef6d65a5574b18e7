"""Models: the interface every trainable network meets, and the families that build, export and load them."""
from seg_accel.models.builder import (
    build_empty_model,
    build_model,
    export_model,
    family_of_model,
    load_model,
    model_family,
    needs_unused_parameter_search,
)
from seg_accel.models.interface import ModelFamily, SegOutput, as_seg_output, segmentation_logits

__all__ = [
    "ModelFamily",
    "SegOutput",
    "as_seg_output",
    "build_empty_model",
    "build_model",
    "export_model",
    "family_of_model",
    "load_model",
    "model_family",
    "needs_unused_parameter_search",
    "segmentation_logits",
]
