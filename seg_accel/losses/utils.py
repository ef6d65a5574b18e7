"""Helpers shared by the losses: class weights from lists or files, reductions, masks, and the base
of the per-pixel losses."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from seg_accel.errors import ConfigError


def load_class_weight(value: list[float] | str | None, key: str = "class_weight") -> list[float] | None:
    """A list of floats, or a path (relative to the working directory) to a ``.npy``,
    ``.json`` or ``.yaml`` file holding the list (or a mapping with a ``class_weight``
    list, as ``scripts/class_weights.py`` writes). Every weight finite and >= 0, one > 0 (a
    negative weight trains the model away from that class)."""
    import math

    weights = _read_class_weight(value, key)
    if weights is None:
        return None
    bad = [(i, w) for i, w in enumerate(weights) if not math.isfinite(w) or w < 0]
    if bad:
        raise ConfigError(f"every class weight must be finite and >= 0; class {bad[0][0]} has {bad[0][1]}", key=key)
    if not any(w > 0 for w in weights):
        raise ConfigError("at least one class weight must be > 0 (all are 0: nothing would be trained)", key=key)
    return weights


def _read_class_weight(value: list[float] | str | None, key: str = "class_weight") -> list[float] | None:
    """A list of floats, or a path (relative to the working directory) to a ``.npy``,
    ``.json`` or ``.yaml`` file holding the list (or a mapping with a ``class_weight``
    list, as ``scripts/class_weights.py`` writes)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"class weight file not found: {path}", key=key)
    try:
        if path.suffix == ".npy":
            import numpy as np

            data = np.load(path).tolist()
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
        else:
            raise ConfigError(f"class weight files are .npy, .json or .yaml, got {path.name}", key=key)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read class weights from {path}: {exc}", key=key) from exc
    if isinstance(data, dict):
        data = data.get("class_weight")
    if not isinstance(data, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in data):
        raise ConfigError(f"{path} does not hold a list of numbers (or a 'class_weight' list)", key=key)
    return [float(v) for v in data]


def reduce_pixel_loss(loss: torch.Tensor, reduction: str, denominator: torch.Tensor | float) -> torch.Tensor:
    """'none' as is, 'sum', or 'mean' = sum / denominator."""
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if torch.is_tensor(denominator):
        denominator = denominator.clamp_min(1)
    return loss.sum() / denominator


def resolve_ignore_index(own: int | None, head: int) -> int:
    """A loss's ``ignore_index``: its own when set, else the head's (``ignore_index: null``)."""
    return own if own is not None else head


def valid_mask(labels_nhw: torch.Tensor, ignore_index: int, pixel_weight_nhw: torch.Tensor | None = None) -> torch.Tensor:
    """1 where a pixel counts (not ignored; times the sampler's weight when given)."""
    mask = (labels_nhw != ignore_index).to(torch.float32)
    return mask if pixel_weight_nhw is None else mask * pixel_weight_nhw


def one_hot(labels_nhw: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(N, C, H, W) float one-hot; ignored pixels are all zeros."""
    safe = torch.where(labels_nhw == ignore_index, torch.zeros_like(labels_nhw), labels_nhw)
    hot = torch.nn.functional.one_hot(safe, num_classes).permute(0, 3, 1, 2).to(torch.float32)
    return hot * (labels_nhw != ignore_index).unsqueeze(1)


def binary_target(labels_nhw: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """A 1-channel (sigmoid) head's target ``(N, H, W)``: labels 0/1 as floats, ignored pixels 0
    (masked by the caller)."""
    labels = torch.where(labels_nhw == ignore_index, torch.zeros_like(labels_nhw), labels_nhw)
    if labels.numel() and labels.max() > 1:
        raise ValueError("a 1-channel sigmoid head takes labels 0 and 1 only (two classes)")
    return labels.to(torch.float32)


class PixelLoss(nn.Module):
    """Base of the losses made of one term per pixel (cross-entropy, focal): ``forward`` weights
    each pixel's ``pixel_loss`` ``(N, H, W)`` by the sampler's ``pixel_weight_nhw``, reduces it
    (``reduction``; ``mean`` divides by ``denominator``) and scales it by ``loss_weight``."""

    reduction: str = "mean"
    loss_weight: float = 1.0
    ignore_index: int | None = None

    def pixel_loss(self, logits_nchw: torch.Tensor, labels_nhw: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        raise NotImplementedError

    def denominator(self, logits_nchw: torch.Tensor, labels_nhw: torch.Tensor, ignore: int) -> torch.Tensor | float:
        """What ``mean`` divides by: every pixel of every class channel (N*C*H*W)."""
        return labels_nhw.numel() * logits_nchw.shape[1]

    def forward(
        self,
        logits_nchw: torch.Tensor,
        labels_nhw: torch.Tensor,
        pixel_weight_nhw: torch.Tensor | None = None,
        ignore_index: int = 255,
    ) -> torch.Tensor:
        loss = self.pixel_loss(logits_nchw, labels_nhw, ignore_index)
        if pixel_weight_nhw is not None:
            loss = loss * pixel_weight_nhw
        ignore = resolve_ignore_index(self.ignore_index, ignore_index)
        return self.loss_weight * reduce_pixel_loss(loss, self.reduction, self.denominator(logits_nchw, labels_nhw,
                                                                                            ignore))
