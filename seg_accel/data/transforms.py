"""Pipeline transforms with MMSegmentation names and semantics (docs/behaviour.md section 10).

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


def resize_image(img_chw: torch.Tensor, size_hw: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Bilinear, as mmcv's cv2 INTER_LINEAR (no antialiasing); with ``antialias`` a shrink
    averages over the pixels it covers, as Pillow's bilinear resize does."""
    if tuple(img_chw.shape[-2:]) == tuple(size_hw):
        return img_chw
    # the channels-last kernel gives the same numbers ~2x faster; the result stays channels-last
    # (later transforms work on any layout; the sample is made contiguous at the end)
    pixels = img_chw[None].contiguous(memory_format=torch.channels_last)
    return F.interpolate(pixels, size=size_hw, mode="bilinear", align_corners=False, antialias=antialias)[0]


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
    """Resize to ``scale = [w, h]`` (MMSegmentation order); ``keep_ratio`` rescales within it;
    ``antialias`` smooths shrinks as Pillow does (mmcv's ``backend='pillow'``)."""

    def __init__(self, scale: list[int] | int, keep_ratio: bool = True, antialias: bool = False):
        self.scale = _wh(scale, "scale")
        self.keep_ratio = keep_ratio
        self.antialias = antialias

    def __call__(self, results: Results, rng: np.random.Generator) -> Results:
        h, w = results["img"].shape[-2:]
        new_w, new_h = rescale_size(w, h, self.scale) if self.keep_ratio else self.scale
        results["img"] = resize_image(results["img"], (new_h, new_w), self.antialias)
        if "gt_seg_map" in results:
            results["gt_seg_map"] = resize_label(results["gt_seg_map"], (new_h, new_w))
        return results


@TRANSFORMS.register()
class RandomResize:
    """Resize by a random scale (MMSegmentation's multi-scale training): with ``ratio_range``,
    ``scale * r`` for ``r ~ U(ratio_range)``; with ``scale`` a list of two ``[w, h]`` scales,
    a long and a short edge drawn between theirs. Then ``Resize`` (``keep_ratio``, ``antialias``)."""

    def __init__(
        self,
        scale: list[int] | list[list[int]],
        ratio_range: list[float] | None = None,
        keep_ratio: bool = True,
        antialias: bool = False,
    ):
        nested = bool(scale) and isinstance(scale[0], (list, tuple))
        if ratio_range is not None:
            if nested:
                raise ConfigError("with ratio_range, scale is one [w, h]", key="scale")
            if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
                raise ConfigError(f"must be [min, max] with 0 < min <= max, got {ratio_range}", key="ratio_range")
            self.scales = [_wh(scale, "scale")]
        else:
            if not nested or len(scale) != 2:
                raise ConfigError("give ratio_range, or scale as two [w, h] scales to draw between", key="scale")
            self.scales = [_wh(s, "scale") for s in scale]
        self.ratio_range = ratio_range
        self.keep_ratio = keep_ratio
        self.antialias = antialias

    def target_scale(self, rng: np.random.Generator) -> tuple[int, int]:
        if self.ratio_range is not None:
            ratio = rng.random() * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
            return int(self.scales[0][0] * ratio), int(self.scales[0][1] * ratio)
        longs = [max(s) for s in self.scales]
        shorts = [min(s) for s in self.scales]
        return int(rng.integers(min(longs), max(longs) + 1)), int(rng.integers(min(shorts), max(shorts) + 1))

    def __call__(self, results: Results, rng: np.random.Generator) -> Results:
        return Resize(self.target_scale(rng), self.keep_ratio, self.antialias)(results, rng)


@TRANSFORMS.register()
class RandomChoiceResize:
    """Resize to one of ``scales`` (each ``[w, h]``), drawn uniformly per sample (MMSegmentation's
    ``RandomChoiceResize``; 0.x ``Resize(img_scale=[...], multiscale_mode='value')``)."""

    def __init__(self, scales: list[list[int]], keep_ratio: bool = True, antialias: bool = False):
        if not isinstance(scales, list) or not scales:
            raise ConfigError(f"must be a list of [w, h] scales, got {scales!r}", key="scales")
        self.scales = [_wh(s, "scales") for s in scales]
        self.keep_ratio, self.antialias = keep_ratio, antialias

    def __call__(self, results: Results, rng: np.random.Generator) -> Results:
        scale = self.scales[int(rng.integers(len(self.scales)))]
        return Resize(scale, self.keep_ratio, self.antialias)(results, rng)


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


def rgb_to_hsv(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in 0-255 -> HSV as OpenCV's 8-bit convention: H in [0, 180), S and V in 0-255."""
    r, g, b = img
    value, _ = img.max(0)
    low, _ = img.min(0)
    chroma = value - low
    sat = torch.where(value > 0, chroma / value.clamp_min(1e-12) * 255, torch.zeros_like(value))
    safe = chroma.clamp_min(1e-12)
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    hue = torch.where(chroma > 0, (hue * 30) % 180, torch.zeros_like(hue))
    return torch.stack([hue, sat, value])


# per HSV sector (0-5), which of (value, p, q, t) each RGB channel takes
_SECTOR_CHANNELS = torch.tensor([[0, 2, 1, 1, 3, 0],   # red: v q p p t v
                                 [3, 0, 0, 2, 1, 1],   # green: t v v q p p
                                 [1, 1, 3, 0, 0, 2]])  # blue: p p t v v q


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, sat, value = hsv[0] / 30.0, hsv[1] / 255.0, hsv[2]
    sector = (torch.floor(hue) % 6).long()
    f = hue - torch.floor(hue)
    p, q, t = value * (1 - sat), value * (1 - sat * f), value * (1 - sat * (1 - f))
    candidates = torch.stack([value, p, q, t])  # one gather picks each channel's value: no masked copies
    return candidates.gather(0, _SECTOR_CHANNELS[:, sector.reshape(-1)].view(3, *value.shape))


def _as_uint8(img: torch.Tensor) -> torch.Tensor:
    """What mmcv's ``convert`` does after each step: clip to 0-255, truncate to uint8."""
    return img.clamp(0, 255).floor()


@TRANSFORMS.register()
class PhotoMetricDistortion:
    """MMSegmentation's colour jitter, each step with probability 0.5, on the image only:
    brightness ``+U(-brightness_delta, brightness_delta)``; contrast ``*U(contrast_range)``
    (before or after the HSV steps, at random); saturation ``*U(saturation_range)``; hue
    ``+U{-hue_delta..hue_delta}`` (OpenCV's 0-180 hue scale). Values are clipped to 0-255
    and truncated as uint8 after each step."""

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: list[float] = (0.5, 1.5),
        saturation_range: list[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        for name, value in (("contrast_range", contrast_range), ("saturation_range", saturation_range)):
            if len(value) != 2 or not 0 <= value[0] <= value[1]:
                raise ConfigError(f"must be [low, high] with 0 <= low <= high, got {list(value)}", key=name)
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)
        self.hue_delta = hue_delta

    def __call__(self, results: Results, rng: np.random.Generator) -> Results:
        img = _as_uint8(results["img"])

        def contrast(x: torch.Tensor) -> torch.Tensor:
            return _as_uint8(x * rng.uniform(*self.contrast_range)) if rng.integers(2) else x

        if rng.integers(2):
            img = _as_uint8(img + rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = bool(rng.integers(2))
        if contrast_first:
            img = contrast(img)
        hsv = rgb_to_hsv(img)
        changed = False
        if rng.integers(2):
            hsv[1] = (hsv[1] * rng.uniform(*self.saturation_range)).clamp(0, 255)
            changed = True
        if rng.integers(2):
            hsv[0] = (hsv[0] + int(rng.integers(-self.hue_delta, self.hue_delta + 1))) % 180
            changed = True
        if changed:
            img = _as_uint8(hsv_to_rgb(hsv))
        if not contrast_first:
            img = contrast(img)
        results["img"] = img
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
    images with ``pad_val``, labels with ``seg_pad_val`` (ignored by losses and metrics). The
    unpadded size is kept: batches then carry a ``pixel_mask`` (1 on the image's own pixels),
    with which inference, and the mask-classification models' training, leave the padding out."""

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
            results.setdefault("valid_hw", (h, w))  # the image's own pixels: the batch's pixel_mask
            results["img"] = F.pad(results["img"], (0, tw - w, 0, th - h), value=self.pad_val)
            if "gt_seg_map" in results:
                results["gt_seg_map"] = F.pad(results["gt_seg_map"], (0, tw - w, 0, th - h), value=self.seg_pad_val)
        return results


def build_pipeline(pipeline: list[dict] | None, key: str) -> list[Any]:
    return [TRANSFORMS.build(cfg, f"{key}.{i}") for i, cfg in enumerate(pipeline or [])]
