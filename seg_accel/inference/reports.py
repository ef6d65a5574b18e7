"""What an evaluation writes beside its numbers: the results JSON with its metadata, the
confusion-matrix and per-class charts, ROC/PR curves, per-image rows and overlay panels."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seg_accel.errors import ConfigError
from seg_accel.metrics.palette import default_palette, overlay_panel
from seg_accel.runtime.storage import atomic_file


class Overlays:
    """``--show-dir``: per image, the prediction and the ground truth blended over the image (with
    ``image``, the image itself first), side by side under a header naming each, with a legend
    of the classes either shows, enlarged ``scale`` times; named after the source image
    (``<show_dir>/<image name>.png``)."""

    def __init__(self, dataset: Any, show_dir: Path, opacity: float, ignore_index: int, image: bool = False,
                 scale: int = 1):
        if getattr(dataset, "streaming", False):
            raise ConfigError("--show-dir needs a map-style dataset (streaming: false)", key="--show-dir")
        self.dataset, self.show_dir, self.opacity, self.ignore = dataset, show_dir, opacity, ignore_index
        self.image, self.scale = image, scale
        palette = dataset.palette if dataset.palette is not None else default_palette(len(dataset.classes))
        self.palette = np.asarray(palette, dtype=np.uint8)
        show_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: dict[str, Any], pred: torch.Tensor) -> None:
        for index, p, label in zip(batch["indices"].tolist(), pred.cpu().numpy(), batch["labels"].numpy()):
            img, _ = self.dataset.load(index)
            present = np.union1d(np.unique(p), np.unique(label[label != self.ignore]))
            if self.scale > 1:  # nearest neighbour: every pixel a block, the labels unchanged
                img, p, label = (np.repeat(np.repeat(a, self.scale, 0), self.scale, 1) for a in (img, p, label))
            panels = [("image", img)] if self.image else []
            panels += [("prediction", img, p), ("ground truth", img, label)]
            panel = overlay_panel(panels, self.dataset.classes, self.palette, self.opacity, present, self.ignore)
            target = self.show_dir / f"{self.dataset.sample_name(index)}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(target) as tmp:
                panel.save(tmp, format="PNG")


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_file(path) as tmp:  # a full disk leaves the old chart or none, never half of one
        fig.savefig(tmp, dpi=100, format="png")


def save_plots(out: Path, classes: list[str], cm: torch.Tensor, results: dict[str, Any]) -> list[Path]:
    """The confusion matrix (rows: truth, normalised per row, in %) and per-class IoU bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = cm.double().cpu().numpy()
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0) * 100
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion matrix (% of each true class)")
    if len(classes) <= 30:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if share[i, j] > 50 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    confusion_png = out.with_name(out.stem + "_confusion.png")
    _save_figure(fig, confusion_png)
    plt.close(fig)

    written = [confusion_png, _bar_chart(plt, out, classes, results, "IoU", "tab:blue")]
    if "Dice" in results["per_class"]:
        written.append(_bar_chart(plt, out, classes, results, "Dice", "tab:green"))
    if "curves" in results:
        curves = results["curves"]
        fig, (roc, pr) = plt.subplots(1, 2, figsize=(9, 4.2))
        roc.plot(curves["fpr"], curves["tpr"], color="tab:blue")
        roc.plot([0, 1], [0, 1], color="grey", linestyle=":")
        roc.set_xlabel("false positive rate (1 - specificity)")
        roc.set_ylabel("true positive rate (sensitivity)")
        roc.set_title(f"ROC, AUC {results['AUC_ROC']:.2f}%")
        pr.plot(curves["recall"], curves["precision"], color="tab:orange")
        pr.set_xlabel("recall (sensitivity)")
        pr.set_ylabel("precision")
        pr.set_ylim(0, 1.02)
        pr.set_title(f"precision-recall, AUC {results['AUC_PR']:.2f}%")
        fig.tight_layout()
        written.append(out.with_name(out.stem + "_roc_pr.png"))
        _save_figure(fig, written[-1])
        plt.close(fig)
    return written


def _bar_chart(plt: Any, out: Path, classes: list[str], results: dict[str, Any], column: str, colour: str) -> Path:
    """Per-class bars of ``column`` (IoU, Dice) with its mean as a line: ``<out stem>_<column>.png``."""
    values = np.nan_to_num(np.asarray(results["per_class"][column], dtype=float), nan=0.0)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(classes) + 2), 4))
    ax.bar(range(len(classes)), values, color=colour)
    mean = results[f"m{column}"]
    ax.axhline(mean, color="tab:red", linestyle="--", label=f"m{column} {mean:.2f}")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_ylabel(f"{column} (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(f"per-class {column}")
    fig.tight_layout()
    path = out.with_name(f"{out.stem}_{column.lower()}.png")
    _save_figure(fig, path)
    plt.close(fig)
    return path


def save_per_image_csv(path: Path, rows: list[dict[str, Any]], dataset: Any) -> Path:
    """One row per image: its name, then its metrics (in %; empty where undefined)."""
    import csv
    import math

    columns = ["image", *[k for k in rows[0] if k != "index"]] if rows else ["image"]
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            values = [dataset.sample_name(row["index"])]
            for column in columns[1:]:
                value = row[column]
                values.append("" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}")
            writer.writerow(values)
    return path


def save_results(out: Path, payload: dict[str, Any]) -> None:
    """The results JSON with the metadata ``evaluate.save`` writes (time, versions, interpreter,
    git commit when run inside a git checkout), written atomically. Our own writer: ``evaluate.save``
    runs ``git`` wherever it is and lets it print "fatal: not a git repository"."""
    import datetime
    import importlib.metadata
    import platform
    import subprocess
    import sys

    from seg_accel.runtime.storage import json_safe, write_text_atomic

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        git_hash = commit.stdout.strip() if commit.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        git_hash = None
    try:
        evaluate_version = importlib.metadata.version("evaluate")
    except importlib.metadata.PackageNotFoundError:
        evaluate_version = None
    meta = {"_timestamp": datetime.datetime.now().isoformat(), "_git_commit_hash": git_hash,
            "_evaluate_version": evaluate_version, "_python_version": platform.python_version(),
            "_interpreter_path": sys.executable}
    write_text_atomic(out, json.dumps(json_safe({**payload, **meta}), indent=2, default=str, allow_nan=False))
