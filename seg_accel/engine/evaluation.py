"""Evaluation on the val set: a confusion matrix per process, summed once."""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from seg_accel.losses.head import predict, resize_logits
from seg_accel.metrics import confusion_matrix
from seg_accel.models.builder import segmentation_logits

logger = logging.getLogger("seg_accel")


@torch.no_grad()
def collect_confusion(
    model: torch.nn.Module,
    loader: DataLoader,
    num_classes: int,
    ignore_index: int = 255,
    align_corners: bool = False,
    device: torch.device | str = "cpu",
    autocast: Any = None,
    show_progress: bool = False,
    threshold: float | None = None,
) -> torch.Tensor:
    """This process's confusion matrix over its shard of ``loader`` (whole-image inference,
    logits resized to each original label size)."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    ctx = autocast if autocast is not None else contextlib.nullcontext
    try:
        for batch in tqdm(loader, desc="eval", disable=not show_progress, leave=False, dynamic_ncols=True):
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with ctx():
                logits = segmentation_logits(model, pixel_values)
            pred = predict(resize_logits(logits.float(), labels.shape[-2:], align_corners), threshold)
            cm += confusion_matrix(pred, labels, num_classes, ignore_index)
    finally:
        model.train(was_training)
    return cm
