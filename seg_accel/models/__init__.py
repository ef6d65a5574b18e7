"""Models: transformers ``*ForSemanticSegmentation`` classes built from the config."""
from seg_accel.models.builder import build_model, needs_unused_parameter_search, segmentation_logits

__all__ = ["build_model", "needs_unused_parameter_search", "segmentation_logits"]
