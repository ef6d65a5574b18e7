"""Pipeline transforms with MMSegmentation names and semantics (SPEC section 10).

A transform is a callable ``t(results, rng) -> results``. ``results`` holds
``img`` (float32 tensor ``(3, H, W)``, RGB, 0-255 until ``Normalize``) and
``gt_seg_map`` (int64 tensor ``(H, W)``); ``rng`` is a ``numpy.random.Generator``
seeded per sample, so augmentations do not depend on the number of workers.
Register your own with ``@TRANSFORMS.register()`` and load it with ``custom_imports``.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from seg_accel.errors import ConfigError
from seg_accel.registry import TRANSFORMS

Results = dict[str, Any]


def resize_image(img_chw: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear, as mmcv's cv2 INTER_LINEAR (no antialiasing)."""
    if tuple(img_chw.shape[-2:]) == tuple(size_hw):
        return img_chw
    return F.interpolate(img_chw[None], size=size_hw, mode="bilinear", align_corners=False)[0]


def resize_label(label_hw: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Nearest neighbour, so no new label values appear."""
    if tuple(label_hw.shape[-2:]) == tuple(size_hw):
        return label_hw
    return F.interpolate(label_hw[None, None].float(), size=size_hw, mode="nearest")[0, 0].to(label_hw.dtype)


def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``imrescale``: the largest size with the same aspect ratio whose long edge
    fits ``max(scale)`` and short edge fits ``min(scale)``. Returns (w, h)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def _wh(value: list[int] | tuple[int, int] | int, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"{name} must be two positive integers, got {value!r}", key=name)
    return int(value[0]), int(value[1])


@TRANSFORMS.register()
class Resize:
    """Resize to ``scale = [w, h]`` (MMSegmentation order); ``keep_ratio`` rescales within it."""

    def __init__(self, scale: list[int] | int, keep_ratio: bool = True):
        self.scale = _wh(scale, "scale")
        self.keep_ratio = keep_ratio

    def __call__(self, results: Results, rng: np.random.Generator) -> Results:
        h, w = results["img"].shape[-2:]
        new_w, new_h = rescale_size(w, h, self.scale) if self.keep_ratio else self.scale
        results["img"] = resize_image(results["img"], (new_h, new_w))
        if "gt_seg_map" in results:
            results["gt_seg_map"] = resize_label(results["gt_seg_map"], (new_h, new_w))
        return results


@TRANSFORMS.register()
class RandomCrop:
    """Crop ``crop_size = [h, w]`` at a random place; with ``cat_max_ratio < 1`` retry up
    to 10 times until no single class covers more than that share of the crop."""

    def __init__(self, crop_size: list[int] | int, cat_max_ratio: float = 1.0, ignore_index: int = 255):
        self.crop_h, self.crop_w = _wh(crop_size, "crop_size")
        if not 0 < cat_max_ratio <= 1:
            raise ConfigError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}", key="cat_max_ratio")
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _box(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        off_h = int(rng.integers(0, max(h - self.crop_h, 0) + 1))
        off_w = int(rng.integers(0, max(w - self.crop_w, 0) + 1))
        return off_h, min(off_h + self.crop_h, h), off_w, min(off_w + self.crop_w, w)

    def __call__(self, results: Results, rng: np.random.Generator) -> Results:
        h, w = results["img"].shape[-2:]
        y1, y2, x1, x2 = self._box(h, w, rng)
        if self.cat_max_ratio < 1.0 and "gt_seg_map" in results:
            for _ in range(10):
                crop = results["gt_seg_map"][y1:y2, x1:x2]
                _, counts = torch.unique(crop[crop != self.ignore_index], return_counts=True)
                if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                    break
                y1, y2, x1, x2 = self._box(h, w, rng)
        results["img"] = results["img"][:, y1:y2, x1:x2]
        if "gt_seg_map" in results:
            results["gt_seg_map"] = results["gt_seg_map"][y1:y2, x1:x2]
        return results


@TRANSFORMS.register()
class RandomFlip:
    """Flip image and label together with probability ``prob``."""

    def __init__(self, prob: float = 0.5, direction: Literal["horizontal", "vertical"] = "horizontal"):
        if not 0 <= prob <= 1:
            raise ConfigError(f"prob must be in [0, 1], got {prob}", key="prob")
        self.prob = prob
        self.dim = -1 if direction == "horizontal" else -2

    def __call__(self, results: Results, rng: np.random.Generator) -> Results:
        if rng.random() < self.prob:
            results["img"] = results["img"].flip(self.dim)
            if "gt_seg_map" in results:
                results["gt_seg_map"] = results["gt_seg_map"].flip(self.dim)
        return results


@TRANSFORMS.register()
class Normalize:
    """``(img - mean) / std`` per channel. Images are loaded as RGB, so ``to_rgb: true``
    (MMSegmentation's BGR->RGB) keeps them; ``to_rgb: false`` gives BGR, as MMSegmentation would."""

    def __init__(self, mean: list[float], std: list[float], to_rgb: bool = True):
        if len(mean) != 3 or len(std) != 3 or any(s == 0 for s in std):
            raise ConfigError(f"mean and std need 3 values each, std non-zero; got {mean}, {std}", key="mean")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.to_rgb = to_rgb

    def __call__(self, results: Results, rng: np.random.Generator) -> Results:
        img = results["img"]
        if not self.to_rgb:
            img = img.flip(0)
        results["img"] = (img - self.mean) / self.std
        return results


@TRANSFORMS.register()
class Pad:
    """Pad bottom/right to ``size = [h, w]`` (or to a multiple of ``size_divisor``);
    images with ``pad_val``, labels with ``seg_pad_val`` (ignored by losses and metrics)."""

    def __init__(
        self,
        size: list[int] | int | None = None,
        size_divisor: int | None = None,
        pad_val: float = 0.0,
        seg_pad_val: int = 255,
    ):
        if (size is None) == (size_divisor is None):
            raise ConfigError("set exactly one of size and size_divisor", key="size")
        self.size = None if size is None else _wh(size, "size")
        self.size_divisor = size_divisor
        self.pad_val = pad_val
        self.seg_pad_val = seg_pad_val

    def __call__(self, results: Results, rng: np.random.Generator) -> Results:
        h, w = results["img"].shape[-2:]
        if self.size is not None:
            th, tw = max(self.size[0], h), max(self.size[1], w)
        else:
            d = self.size_divisor
            th, tw = -(-h // d) * d, -(-w // d) * d
        if (th, tw) != (h, w):
            results["img"] = F.pad(results["img"], (0, tw - w, 0, th - h), value=self.pad_val)
            if "gt_seg_map" in results:
                results["gt_seg_map"] = F.pad(results["gt_seg_map"], (0, tw - w, 0, th - h), value=self.seg_pad_val)
        return results


def build_pipeline(pipeline: list[dict] | None, key: str) -> list[Any]:
    return [TRANSFORMS.build(cfg, f"{key}.{i}") for i, cfg in enumerate(pipeline or [])]
