"""SyntheticShapes: procedural images of coloured shapes on textured backgrounds.

Needs no files. Sample ``i`` of a given ``seed`` is always the same image. One
class per shape kind; shapes may overlap (later ones on top) and touch the border.
"""
from __future__ import annotations

import math

import numpy as np

from seg_accel.data.base import SegDataset
from seg_accel.errors import ConfigError
from seg_accel.registry import DATASETS

CLASSES = ("background", "circle", "square", "triangle")
# Each shape kind has a colour family (jittered per shape), as real classes have a
# typical appearance; the shape and the texture contrast carry the rest.
CLASS_COLOURS = np.array([[0, 0, 0], [225, 70, 60], [70, 200, 80], [70, 100, 235]], dtype=np.float64)


def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Two random colours blended by a random stripe/plaid pattern, plus pixel noise."""
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pattern = np.ones_like(xx)
    for _ in range(int(rng.integers(1, 3))):
        freq = rng.uniform(0.05, 0.5)
        theta = rng.uniform(0, math.pi)
        phase = rng.uniform(0, 2 * math.pi)
        pattern = pattern * (0.5 + 0.5 * np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase))
    img = c1 * pattern[..., None] + c2 * (1 - pattern[..., None])
    return img + rng.normal(0, 6, img.shape)


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == 1:  # circle of radius r
        return dy * dy + dx * dx <= r * r
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    if kind == 2:  # square with the circle's area: half side r*sqrt(pi)/2
        half = r * math.sqrt(math.pi) / 2
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # equilateral triangle with the circle's area, centred on its centroid
    side = r * math.sqrt(4 * math.pi / math.sqrt(3))
    inr = side / (2 * math.sqrt(3))  # distance from centroid to each edge
    mask = np.ones_like(u, dtype=bool)
    for k in range(3):
        a = 2 * math.pi * k / 3
        mask &= u * math.cos(a) + v * math.sin(a) <= inr
    return mask


def render_shapes(
    rng: np.random.Generator,
    height: int,
    width: int,
    max_shapes: int,
    min_size: float,
    max_size: float,
    colour_jitter: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its label map (H, W) uint8."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = _texture(rng, yy, xx)
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = int(rng.integers(1, len(CLASSES)))
        r = rng.uniform(min_size, max_size) * min(height, width) / 2
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        mask = _shape_mask(kind, yy, xx, cy, cx, r, rng.uniform(0, 2 * math.pi))
        colour = np.clip(CLASS_COLOURS[kind] + rng.uniform(-colour_jitter, colour_jitter, 3), 0, 255)
        shade = 1 + 0.15 * np.sin(rng.uniform(0.1, 0.4) * xx + rng.uniform(0, 2 * math.pi))
        img[mask] = colour * shade[mask][:, None] + rng.normal(0, 6, (int(mask.sum()), 3))
        label[mask] = kind
    return np.clip(img, 0, 255).astype(np.uint8), label


@DATASETS.register()
class SyntheticShapes(SegDataset):
    """Circles, squares and triangles (size, rotation, overlap at random; each kind's
    colour jittered by up to ``colour_jitter`` around its own hue) on random striped
    textures; classes: background, circle, square, triangle.

    ``img_size`` is ``[h, w]``; ``min_size``/``max_size`` are shape diameters as a
    fraction of the shorter side. Use different ``seed`` values for train and val.
    """

    def __init__(
        self,
        num_samples: int = 1000,
        img_size: list[int] | int = 64,
        seed: int = 0,
        max_shapes: int = 3,
        min_size: float = 0.3,
        max_size: float = 0.7,
        colour_jitter: float = 15.0,
        pipeline: list[dict] | None = None,
    ):
        if num_samples < 1:
            raise ConfigError(f"must be >= 1, got {num_samples}", key="num_samples")
        if max_shapes < 1:
            raise ConfigError(f"must be >= 1, got {max_shapes}", key="max_shapes")
        if not 0 < min_size <= max_size:
            raise ConfigError(f"need 0 < min_size <= max_size, got {min_size}, {max_size}", key="min_size")
        size = [img_size, img_size] if isinstance(img_size, int) else list(img_size)
        if len(size) != 2 or min(size) < 8:
            raise ConfigError(f"must be [h, w] with both >= 8, got {img_size}", key="img_size")
        super().__init__(pipeline)
        self.num_samples = num_samples
        self.height, self.width = size
        self.seed = seed
        self.max_shapes = max_shapes
        self.min_size, self.max_size = min_size, max_size
        self.colour_jitter = colour_jitter

    @classmethod
    def resolve_classes(cls, **kwargs) -> list[str]:
        return list(CLASSES)

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> str:
        return f"SyntheticShapes(seed={self.seed})[{index}]"

    def image_size(self, index: int) -> tuple[int, int]:
        return self.height, self.width

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{self.describe(index)}: index out of range (num_samples={self.num_samples})")
        rng = np.random.default_rng([self.seed, index])
        return render_shapes(
            rng, self.height, self.width, self.max_shapes, self.min_size, self.max_size, self.colour_jitter
        )


CURVE_CLASSES = ("background", "curve")


def render_curves(rng: np.random.Generator, height: int, width: int, num_curves: tuple[int, int],
                  widths: tuple[float, float], contrast: float) -> tuple[np.ndarray, np.ndarray]:
    """Thin structures: smooth random curves (cubic Bezier) of ``widths`` pixels on a random
    texture, slightly darker or lighter than it (``contrast``: the difference in grey levels),
    as vessels or cracks are. Image (H, W, 3) uint8, label (H, W) uint8 (1 on a curve)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = _texture(rng, yy, xx) * 0.6 + 50  # a muted background: the curves carry little contrast
    label = np.zeros((height, width), dtype=np.uint8)
    steps = np.linspace(0, 1, 4 * (height + width))[:, None]
    for _ in range(int(rng.integers(num_curves[0], num_curves[1] + 1))):
        points = rng.uniform([0, 0], [height, width], (4, 2))
        curve = ((1 - steps) ** 3 * points[0] + 3 * (1 - steps) ** 2 * steps * points[1]
                 + 3 * (1 - steps) * steps ** 2 * points[2] + steps ** 3 * points[3])
        radius = rng.uniform(*widths) / 2
        mask = np.zeros((height, width), dtype=bool)
        reach = int(math.ceil(radius)) + 1
        for cy, cx in curve:  # a disc around each point along the curve (sub-pixel centres)
            y0, y1 = max(0, int(cy) - reach), min(height, int(cy) + reach + 1)
            x0, x1 = max(0, int(cx) - reach), min(width, int(cx) + reach + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            dy, dx = yy[y0:y1, x0:x1] + 0.5 - cy, xx[y0:y1, x0:x1] + 0.5 - cx
            mask[y0:y1, x0:x1] |= dy * dy + dx * dx <= radius * radius
        sign = 1 if rng.random() < 0.5 else -1
        img[mask] = img[mask] + sign * contrast + rng.normal(0, 4, (int(mask.sum()), 3))
        label[mask] = 1
    return np.clip(img, 0, 255).astype(np.uint8), label


@DATASETS.register()
class SyntheticCurves(SegDataset):
    """Thin structures for vessel- or crack-like tasks: ``num_curves`` random smooth curves
    ``curve_width`` pixels wide ([min, max], default 1-3) on random textures, each a little
    darker or lighter than the background (``contrast`` grey levels); classes background,
    curve. Deterministic per ``seed`` and index (use different seeds for train and val)."""

    def __init__(self, num_samples: int = 200, img_size: list[int] | int = 128, seed: int = 0,
                 num_curves: list[int] | None = None, curve_width: list[float] | None = None,
                 contrast: float = 40.0, pipeline: list[dict] | None = None):
        size = [img_size, img_size] if isinstance(img_size, int) else list(img_size)
        if len(size) != 2 or min(size) < 8:
            raise ConfigError(f"must be [h, w] with both >= 8, got {img_size}", key="img_size")
        if num_samples < 1:
            raise ConfigError(f"must be >= 1, got {num_samples}", key="num_samples")
        curves = list(num_curves or [2, 6])
        if len(curves) != 2 or not 1 <= curves[0] <= curves[1]:
            raise ConfigError(f"must be [min, max] with 1 <= min <= max, got {num_curves}", key="num_curves")
        widths = list(curve_width or [1.0, 3.0])
        if len(widths) != 2 or not 0 < widths[0] <= widths[1]:
            raise ConfigError(f"must be [min, max] pixels with 0 < min <= max, got {curve_width}", key="curve_width")
        super().__init__(pipeline)
        self.num_samples, (self.height, self.width), self.seed = num_samples, size, seed
        self.num_curves, self.widths, self.contrast = (curves[0], curves[1]), (widths[0], widths[1]), contrast

    @classmethod
    def resolve_classes(cls, **kwargs) -> list[str]:
        return list(CURVE_CLASSES)

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> str:
        return f"SyntheticCurves(seed={self.seed})[{index}]"

    def image_size(self, index: int) -> tuple[int, int]:
        return self.height, self.width

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{self.describe(index)}: index out of range (num_samples={self.num_samples})")
        return render_curves(np.random.default_rng([self.seed, index]), self.height, self.width, self.num_curves,
                             self.widths, self.contrast)
