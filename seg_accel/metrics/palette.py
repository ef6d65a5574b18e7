"""Class colours and the overlay images of ``predict`` and ``evaluate --show-dir``.

``default_palette(n)`` is fixed and perceptually spaced: from the 8x8x8 grid of sRGB colours it
picks, one at a time, the colour farthest (CIE76 distance in L*a*b*) from every colour already
picked, starting from a mid grey's farthest neighbour. Any two of its first 12 colours are
far apart (where random colours often gave three near-identical cyans), and the first ``n``
colours are the same for every ``n``.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

_GRID = np.array([[r, g, b] for r in range(16, 256, 32) for g in range(16, 256, 32) for b in range(16, 256, 32)],
                 dtype=np.uint8)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """``(..., 3)`` sRGB 0-255 -> CIE L*a*b* (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


@lru_cache(maxsize=1)
def _spaced_order() -> np.ndarray:
    """The grid's colours in farthest-first order (512 of them)."""
    lab = srgb_to_lab(_GRID)
    chosen = [int(np.argmax(np.linalg.norm(lab - srgb_to_lab(np.array([128, 128, 128])), axis=1)))]
    nearest = np.linalg.norm(lab - lab[chosen[0]], axis=1)
    for _ in range(len(_GRID) - 1):
        nearest[chosen] = -1.0
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[pick], axis=1))
    return _GRID[chosen]


def default_palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours for data without a palette (repeats after 512)."""
    order = _spaced_order()
    return np.stack([order[i % len(order)] for i in range(num_classes)]) if num_classes else np.zeros((0, 3), np.uint8)


def blend(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, opacity: float, ignore_index: int = 255) -> np.ndarray:
    """The class colours over the image (ignored pixels and ids beyond the palette left as they are)."""
    palette = np.asarray(palette, dtype=np.float32)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < len(palette))
    colour = palette[np.where(valid, labels, 0)]
    out = rgb.astype(np.float32)
    out[valid] = out[valid] * (1 - opacity) + colour[valid] * opacity
    return out.clip(0, 255).astype(np.uint8)


def overlay_panel(panels: Sequence[tuple[Any, ...]], classes: Sequence[str], palette: np.ndarray,
                  opacity: float = 0.5, present: Any = None, ignore_index: int = 255) -> Any:
    """Panels side by side, each ``(title, rgb)`` or ``(title, rgb, labels)`` (labels blended in
    the class colours), a header naming each panel and a legend of the classes in ``present``
    (all classes when None) below. Returns a PIL image."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    images = [panel[1] if len(panel) == 2 else blend(panel[1], panel[2], palette, opacity, ignore_index)
              for panel in panels]
    height = max(img.shape[0] for img in images)
    width = sum(img.shape[1] for img in images) + 4 * (len(images) - 1)
    ids = sorted(int(i) for i in (range(len(classes)) if present is None else present)
                 if 0 <= int(i) < len(classes))
    header, row, swatch = 16, 14, 10
    # the legend: entries laid out left to right, wrapping at the image's width
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries, x, lines = [], 4, 1
    for i in ids:
        text_width = int(draw_probe.textlength(classes[i], font=font))
        entry = swatch + 4 + text_width + 10
        if x + entry > max(width, 120) and x > 4:
            x, lines = 4, lines + 1
        entries.append((i, x, lines - 1))
        x += entry
    legend = (row * lines + 6) if ids else 0
    canvas = Image.new("RGB", (max(width, 120), header + height + legend), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for panel, img in zip(panels, images):
        canvas.paste(Image.fromarray(img), (x, header))
        draw.text((x + 2, 2), str(panel[0]), fill=(0, 0, 0), font=font)
        x += img.shape[1] + 4
    top = header + height + 3
    for i, ex, line in entries:
        y = top + line * row
        colour = tuple(int(c) for c in palette[i]) if i < len(palette) else (0, 0, 0)
        draw.rectangle([ex, y + 1, ex + swatch, y + 1 + swatch], fill=colour, outline=(0, 0, 0))
        draw.text((ex + swatch + 4, y), classes[i], fill=(0, 0, 0), font=font)
    return canvas
