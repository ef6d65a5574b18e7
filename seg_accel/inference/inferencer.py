"""Inference for evaluation (docs/behaviour.md section 9): whole image or sliding window, and multi-scale +
flip test-time augmentation; scores are returned at the original label resolution."""
from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from seg_accel.logits import BINARY_THRESHOLD, resize_logits
from seg_accel.models.interface import segmentation_logits

if TYPE_CHECKING:
    from seg_accel.config.schema import TrainConfig

DEFAULT_AUG_RATIOS = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]


def slide_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)``: ``grids = max(H - crop + stride - 1, 0) // stride + 1``;
    ``y1 = k * stride; y2 = min(y1 + crop, H); y1 = max(y2 - crop, 0)`` (and alike for x)."""
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    h_grids = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for h in range(h_grids):
        for w in range(w_grids):
            y1, x1 = h * stride_h, w * stride_w
            y2, x2 = min(y1 + crop_h, height), min(x1 + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def valid_sizes(pixel_mask_nhw: torch.Tensor) -> list[tuple[int, int]]:
    """Each image's own (h, w) in a padded batch (its pixels are the top-left rectangle)."""
    return [(int(m.any(1).sum()), int(m.any(0).sum())) for m in pixel_mask_nhw]


class Inferencer:
    """``scores(model, pixel_values, size)``: logits (or, with test-time augmentation, averaged
    probabilities) of shape ``(N, C, *size)``; ``predict`` turns them into class ids."""

    def __init__(self, test_cfg: Any = None, align_corners: bool = False, autocast: Any = None,
                 threshold: float | None = None):
        self.test_cfg = test_cfg
        self.mode = getattr(test_cfg, "mode", "whole")
        self.crop = tuple(getattr(test_cfg, "crop_size", None) or ())
        self.stride = tuple(getattr(test_cfg, "stride", None) or ())
        self.ratios = list(getattr(test_cfg, "img_ratios", None) or [1.0])
        self.flip = bool(getattr(test_cfg, "flip", False))
        self.align_corners = align_corners
        self.autocast = autocast or contextlib.nullcontext
        self.threshold = threshold

    @property
    def augmented(self) -> bool:
        return self.flip or self.ratios != [1.0]

    def _logits(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits at the size of ``x`` (whole or slide)."""
        if self.mode == "whole":
            with self.autocast():
                logits = segmentation_logits(model, x)
            return resize_logits(logits.float(), x.shape[-2:], self.align_corners)
        n, _, height, width = x.shape
        total, count = None, torch.zeros((1, 1, height, width), device=x.device)
        for y1, y2, x1, x2 in slide_windows(height, width, self.crop, self.stride):
            with self.autocast():
                crop_logits = segmentation_logits(model, x[:, :, y1:y2, x1:x2])
            crop_logits = resize_logits(crop_logits.float(), (y2 - y1, x2 - x1), self.align_corners)
            if total is None:
                total = torch.zeros((n, crop_logits.shape[1], height, width), device=x.device)
            total[:, :, y1:y2, x1:x2] += crop_logits
            count[:, :, y1:y2, x1:x2] += 1
        return total / count

    @torch.no_grad()
    def scores(self, model: torch.nn.Module, pixel_values: torch.Tensor, size: tuple[int, int],
               pixel_mask: torch.Tensor | None = None) -> torch.Tensor:
        """With a ``pixel_mask`` (a batch the Pad transform padded), each image is inferred on its
        own pixels only: padding changes nothing."""
        if pixel_mask is not None and not bool(pixel_mask.all()):
            return torch.cat([self.scores(model, x[None, :, :h, :w], size)
                              for x, (h, w) in zip(pixel_values, valid_sizes(pixel_mask))])
        if not self.augmented:
            return resize_logits(self._logits(model, pixel_values), size, self.align_corners)
        probs = None
        for ratio in self.ratios:
            x = pixel_values
            if ratio != 1.0:
                h, w = pixel_values.shape[-2:]
                x = F.interpolate(pixel_values, size=(int(h * ratio + 0.5), int(w * ratio + 0.5)), mode="bilinear",
                                  align_corners=False)
            for flipped in ([False, True] if self.flip else [False]):
                logits = self._logits(model, x.flip(-1) if flipped else x)
                logits = logits.flip(-1) if flipped else logits
                logits = resize_logits(logits, size, self.align_corners)
                p = logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(1)
                probs = p if probs is None else probs + p
        return probs / (len(self.ratios) * (2 if self.flip else 1))

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[1] == 1:
            threshold = BINARY_THRESHOLD if self.threshold is None else self.threshold
            values = scores[:, 0] if self.augmented else scores[:, 0].sigmoid()
            return (values > threshold).long()
        return scores.max(1).indices


def build_inferencer(cfg: TrainConfig, accelerator: Any, aug_test: bool = False) -> Inferencer:
    """``model.test_cfg`` (whole / slide, scales, flip); ``aug_test``: MMSegmentation's six ratios
    and flip unless the config names its own."""
    test_cfg = cfg.model.test_cfg
    if aug_test:
        test_cfg = dataclasses.replace(test_cfg, img_ratios=test_cfg.img_ratios or list(DEFAULT_AUG_RATIOS), flip=True)
    head = cfg.model.decode_head
    return Inferencer(test_cfg, head.align_corners, accelerator.autocast, head.threshold)
