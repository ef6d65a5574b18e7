"""Models: the interface every trainable network meets, and the families that build, export and load them.

Importing this package registers seg-accel's own families (mmseg, smp, mask classification, transformers, then any module);
segmentation_models_pytorch itself is imported only when a config or export names it."""
from seg_accel.models import hf, mask_classification, mmseg, modules, smp  # noqa: F401  (register the families)
from seg_accel.models.builder import (
    build_empty_model,
    build_model,
    export_model,
    keep_norms_fp32_if_cpu_bf16,
    needs_unused_parameter_search,
)
from seg_accel.models.families import (
    family_of_export,
    family_of_model,
    list_families,
    model_family,
    register_family,
)
from seg_accel.models.interface import ModelFamily, SegOutput, as_seg_output, segmentation_logits
from seg_accel.models.loading import load_model, load_weights, resolve_export

__all__ = [
    "ModelFamily",
    "SegOutput",
    "as_seg_output",
    "build_empty_model",
    "build_model",
    "export_model",
    "family_of_export",
    "family_of_model",
    "keep_norms_fp32_if_cpu_bf16",
    "list_families",
    "load_model",
    "load_weights",
    "model_family",
    "needs_unused_parameter_search",
    "register_family",
    "resolve_export",
    "segmentation_logits",
]
