"""Evaluation on a dataset: a confusion matrix per process, summed once across processes."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from seg_accel.engine.inference import Inferencer
from seg_accel.metrics import confusion_matrix

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
    inferencer: Inferencer | None = None,
    on_batch: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """This process's confusion matrix over its shard of ``loader``: scores at each original
    label size (``inferencer``: whole image by default), class ids, ``bincount``.
    ``on_batch(batch, predictions)`` sees every batch (visualisation)."""
    inferencer = inferencer or Inferencer(None, align_corners, autocast, threshold)
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    try:
        for batch in tqdm(loader, desc="eval", disable=not show_progress, leave=False, dynamic_ncols=True):
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            pred = inferencer.predict(inferencer.scores(model, pixel_values, labels.shape[-2:]))
            cm += confusion_matrix(pred, labels, num_classes, ignore_index)
            if on_batch is not None:
                on_batch(batch, pred)
    finally:
        model.train(was_training)
    return cm
