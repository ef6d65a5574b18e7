"""The image processor saved with every export, so that ``pipeline("image-segmentation")``
and ``AutoImageProcessor`` prepare images as the training config's test pipeline does.

It is built from the config's ``Normalize`` (mean/std in 0-255 units, as MMSegmentation
writes them, become ``rescale 1/255`` then mean/std in 0-1 units) and, when the test
pipeline resizes to a fixed ``[w, h]`` (``keep_ratio: false``), that size. A
``keep_ratio`` resize has no equivalent among the processor's options: images are then
given to the model at their own size (``do_resize: false``), which every seg-accel model
accepts.
"""
from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("seg_accel")

IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]


def _find(pipeline: list[dict] | None, name: str) -> dict | None:
    for step in pipeline or []:
        if isinstance(step, dict) and step.get("type") == name:
            return step
    return None


def processor_settings(data_cfg: Any) -> dict[str, Any]:
    """Keyword arguments of ``SegformerImageProcessor`` from ``data.test`` (else ``data.val``,
    else ``data.train``): its ``Normalize`` and fixed-size ``Resize``."""
    pipelines = [getattr(data_cfg, split) for split in ("test", "val", "train")]
    pipelines = [p.get("pipeline") for p in pipelines if isinstance(p, dict)]
    normalize = next((n for n in (_find(p, "Normalize") for p in pipelines) if n is not None), None)
    mean = list(normalize["mean"]) if normalize else IMAGENET_MEAN
    std = list(normalize["std"]) if normalize else IMAGENET_STD
    if normalize is not None and normalize.get("to_rgb", True) is False:
        logger.warning("Normalize to_rgb: false trains on BGR images; the exported image processor gives the model RGB")
    settings: dict[str, Any] = {
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [m / 255 for m in mean], "image_std": [s / 255 for s in std],
        "do_reduce_labels": False, "do_resize": False,
    }
    resize = _find(pipelines[0] if pipelines else None, "Resize")
    if resize is not None and resize.get("keep_ratio", True) is False:
        scale = resize["scale"]
        w, h = (scale, scale) if isinstance(scale, int) else scale
        settings.update(do_resize=True, size={"height": int(h), "width": int(w)})
    return settings


def build_image_processor(data_cfg: Any) -> Any:
    try:  # the PIL implementation needs no torchvision; it saves as "SegformerImageProcessor"
        from transformers import SegformerImageProcessorPil as Processor
    except ImportError:
        from transformers import SegformerImageProcessor as Processor
    return Processor(**processor_settings(data_cfg))
