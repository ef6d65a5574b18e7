"""Per-class pixel statistics of a dataset, and class weights computed from them."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

METHODS = ("median_freq", "inverse_log", "inverse")


@dataclass
class PixelCounts:
    """``pixels[c]``: pixels labelled ``c``; ``image_pixels[c]``: all pixels of the images in
    which ``c`` occurs; ``ignored``: pixels with ``ignore_index``; ``other``: any other value."""

    num_classes: int
    pixels: np.ndarray = field(init=False)
    image_pixels: np.ndarray = field(init=False)
    images: int = 0
    ignored: int = 0
    other: int = 0

    def __post_init__(self) -> None:
        self.pixels = np.zeros(self.num_classes, dtype=np.int64)
        self.image_pixels = np.zeros(self.num_classes, dtype=np.int64)

    def add(self, label: np.ndarray, ignore_index: int) -> None:
        values = np.bincount(label.ravel().astype(np.int64), minlength=max(self.num_classes, ignore_index + 1))
        counts = values[: self.num_classes]
        self.pixels += counts
        self.image_pixels += np.where(counts > 0, label.size, 0)
        self.ignored += int(values[ignore_index]) if ignore_index < len(values) else 0
        self.other += int(values.sum() - counts.sum() - (values[ignore_index] if ignore_index < len(values) else 0))
        self.images += 1


def count_pixels(dataset: Any, ignore_index: int = 255, progress: bool = True) -> PixelCounts:
    """One pass over ``dataset.load(i)`` (labels after ``label_map``/``reduce_zero_label``,
    before any pipeline transform)."""
    counts = PixelCounts(len(dataset.classes))
    for i in tqdm(range(len(dataset)), desc="counting pixels", disable=not progress, dynamic_ncols=True):
        _, label = dataset.load(i)
        counts.add(np.asarray(label), ignore_index)
    return counts


def class_weights(counts: PixelCounts, method: str) -> list[float]:
    """Weights per class (0 for a class with no pixels).

    - ``median_freq`` (Eigen & Fergus): ``freq_c = pixels_c / image_pixels_c``,
      ``w_c = median(freq) / freq_c`` (median over the classes that occur).
    - ``inverse_log`` (ENet): ``w_c = 1 / ln(1.02 + p_c)``, ``p_c = pixels_c / sum(pixels)``.
    - ``inverse``: ``w_c = sum(pixels) / (C * pixels_c)`` (1 for every class when balanced).
    """
    pixels = counts.pixels.astype(np.float64)
    present = pixels > 0
    total = pixels.sum()
    if method == "median_freq":
        freq = np.divide(pixels, counts.image_pixels, out=np.zeros_like(pixels), where=counts.image_pixels > 0)
        median = float(np.median(freq[present])) if present.any() else 0.0
        weights = np.divide(median, freq, out=np.zeros_like(freq), where=present)
    elif method == "inverse_log":
        weights = np.where(present, 1.0 / np.log(1.02 + pixels / max(total, 1.0)), 0.0)
    elif method == "inverse":
        weights = np.divide(total, len(pixels) * pixels, out=np.zeros_like(pixels), where=present)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return [float(w) for w in weights]


def frequency_table(classes: list[str], counts: PixelCounts, weights: list[float]) -> str:
    total = max(int(counts.pixels.sum()), 1)
    rows = [["id", "class", "pixels", "%", "weight"]]
    for i, name in enumerate(classes):
        rows.append([str(i), name, f"{int(counts.pixels[i]):,}", f"{100 * counts.pixels[i] / total:.3f}",
                     f"{weights[i]:.4f}" if not math.isnan(weights[i]) else "nan"])
    widths = [max(len(r[j]) for r in rows) for j in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if j == 1 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"{counts.images} images; ignored pixels: {counts.ignored:,}; other values: {counts.other:,}")
    return "\n".join(lines)
