"""``scripts/evaluate.py``: score a checkpoint on ``data.test`` (else ``data.val``).

Each process takes its shard of the dataset (no padding, so no sample is counted twice),
accumulates a confusion matrix on its device and the matrices are summed once; every
metric comes from the sum (SPEC section 8), identical for any number of processes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seg_accel.config.loader import Config
from seg_accel.config.schema import TrainConfig
from seg_accel.data import build_dataset, build_val_loader
from seg_accel.engine.evaluation import collect_confusion
from seg_accel.engine.inference import DEFAULT_AUG_RATIOS, Inferencer
from seg_accel.engine.log import setup_logging
from seg_accel.errors import ConfigError
from seg_accel.metrics import format_table, metrics_from_confusion

logger = logging.getLogger("seg_accel")


def default_palette(num_classes: int) -> np.ndarray:
    """Distinct, fixed colours when the dataset has no palette."""
    return np.random.default_rng(42).integers(0, 256, size=(num_classes, 3), dtype=np.uint8)


def load_model(cfg: TrainConfig, checkpoint: str) -> Any:
    """A training checkpoint folder, a ``save_pretrained`` folder or a Hub id."""
    import os

    from transformers import AutoModelForSemanticSegmentation

    from seg_accel.engine.checkpoint import META, load_weights
    from seg_accel.models.builder import build_model

    path = Path(checkpoint)
    if (path / META).is_file():  # a training checkpoint: the architecture from the config
        model = build_model(cfg.model, cfg.classes)
        load_weights(model, path, key="CHECKPOINT")
        return model
    if path.is_dir() and (path / "config.json").is_file():
        source = str(path)
    elif path.exists() or checkpoint.startswith((".", "/")) or checkpoint.count("/") > 1:
        raise ConfigError(f"not a checkpoint or save_pretrained folder: {checkpoint}", key="CHECKPOINT")
    else:
        source = checkpoint  # a Hub id
    try:
        model = AutoModelForSemanticSegmentation.from_pretrained(source)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        raise ConfigError(f"cannot load '{checkpoint}'{' (HF_HUB_OFFLINE is set)' if offline else ''}: {exc}",
                          key="CHECKPOINT") from exc
    outputs = cfg.model.decode_head.out_channels or len(cfg.classes)
    if model.config.num_labels != outputs:
        raise ConfigError(f"the model has {model.config.num_labels} output classes but the data defines "
                          f"{len(cfg.classes)} ({', '.join(cfg.classes)})", key="CHECKPOINT")
    return model


class Overlays:
    """``--show-dir``: per image, the prediction and the ground truth blended over the image."""

    def __init__(self, dataset: Any, show_dir: Path, opacity: float, ignore_index: int):
        if getattr(dataset, "streaming", False):
            raise ConfigError("--show-dir needs a map-style dataset (streaming: false)", key="--show-dir")
        self.dataset, self.show_dir, self.opacity, self.ignore = dataset, show_dir, opacity, ignore_index
        palette = dataset.palette if dataset.palette is not None else default_palette(len(dataset.classes))
        self.palette = np.asarray(palette, dtype=np.float32)
        show_dir.mkdir(parents=True, exist_ok=True)

    def blend(self, img: np.ndarray, classes: np.ndarray) -> np.ndarray:
        valid = (classes != self.ignore) & (classes < len(self.palette))
        colour = self.palette[np.where(valid, classes, 0)]
        out = img.astype(np.float32)
        out[valid] = out[valid] * (1 - self.opacity) + colour[valid] * self.opacity
        return out.clip(0, 255).astype(np.uint8)

    def __call__(self, batch: dict[str, Any], pred: torch.Tensor) -> None:
        from PIL import Image

        for index, p, label in zip(batch["indices"].tolist(), pred.cpu().numpy(), batch["labels"].numpy()):
            img, _ = self.dataset.load(index)
            panel = np.concatenate([self.blend(img, p), self.blend(img, label)], axis=1)  # prediction | truth
            Image.fromarray(panel).save(self.show_dir / f"{index:06d}.png")


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
    fig.savefig(confusion_png, dpi=100)
    plt.close(fig)

    iou = np.nan_to_num(np.asarray(results["per_class"]["IoU"], dtype=float), nan=0.0)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(classes) + 2), 4))
    ax.bar(range(len(classes)), iou, color="tab:blue")
    ax.axhline(results["mIoU"], color="tab:red", linestyle="--", label=f"mIoU {results['mIoU']:.2f}")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title("per-class IoU")
    fig.tight_layout()
    iou_png = out.with_name(out.stem + "_iou.png")
    fig.savefig(iou_png, dpi=100)
    plt.close(fig)
    return [confusion_png, iou_png]


def evaluate_checkpoint(cfg: TrainConfig, raw_cfg: Config, checkpoint: str, metrics: list[str], aug_test: bool,
                        out: Path, show_dir: Path | None = None, opacity: float = 0.5) -> dict[str, Any]:
    """Score ``checkpoint``; print the table; write ``out`` (JSON) and its two PNGs (main process)."""
    from accelerate import Accelerator

    from seg_accel.engine.trainer import _multi_process_without_accelerator

    acc = Accelerator(cpu=_multi_process_without_accelerator(), mixed_precision=cfg.mixed_precision)
    setup_logging(None, acc.is_main_process)
    split = "test" if cfg.data.test is not None else "val"
    if getattr(cfg.data, split) is None:
        raise ConfigError("nothing to evaluate on: set data.test or data.val", key="data")
    head = cfg.model.decode_head
    dataset = build_dataset(getattr(cfg.data, split), f"data.{split}", head.ignore_index, cfg.data.skip_bad_samples)
    dataset.test_mode = True
    loader_cfg = cfg.data.test_dataloader if split == "test" else cfg.data.val_dataloader
    workers = cfg.data.workers_per_gpu if loader_cfg.workers_per_gpu is None else loader_cfg.workers_per_gpu
    loader = build_val_loader(dataset, loader_cfg.samples_per_gpu or 1, workers, acc.process_index,
                              acc.num_processes, pin_memory=acc.device.type == "cuda")
    model = load_model(cfg, checkpoint).to(acc.device).eval()
    test_cfg = cfg.model.test_cfg
    if aug_test:  # MMSegmentation's --aug-test: six scales and flip unless the config names them
        test_cfg = dataclasses.replace(test_cfg, img_ratios=test_cfg.img_ratios or list(DEFAULT_AUG_RATIOS),
                                       flip=True)
    inferencer = Inferencer(test_cfg, head.align_corners, acc.autocast, head.threshold)
    overlays = Overlays(dataset, show_dir, opacity, head.ignore_index) if show_dir is not None else None
    logger.info("evaluating %s on data.%s (%d images, %d process(es)): %s%s", checkpoint, split, len(dataset),
                acc.num_processes, test_cfg.mode,
                f", scales {inferencer.ratios}{' + flip' if inferencer.flip else ''}" if inferencer.augmented else "")
    start = time.perf_counter()
    cm = collect_confusion(model, loader, len(cfg.classes), head.ignore_index, device=acc.device,
                           show_progress=acc.is_main_process, inferencer=inferencer, on_batch=overlays)
    if acc.num_processes > 1:
        cm = acc.reduce(cm, reduction="sum")
    seconds = time.perf_counter() - start
    results = metrics_from_confusion(cm, metrics)
    if acc.is_main_process:
        summary = {k: v for k, v in results.items() if k != "per_class"}
        logger.info("per-class results:\n%s", format_table(cfg.classes, results["per_class"]))
        logger.info("%s", "  ".join(f"{k}: {v:.2f}" for k, v in summary.items()))
        payload = {
            "metrics": summary,
            "per_class": {c: dict(zip(cfg.classes, v)) for c, v in results["per_class"].items()},
            "classes": cfg.classes,
            "confusion_matrix": cm.cpu().tolist(),
            "checkpoint": str(checkpoint),
            "split": split,
            "test_cfg": dataclasses.asdict(test_cfg),
            "timings": {"seconds": seconds, "images": len(dataset), "seconds_per_image": seconds / max(len(dataset), 1),
                        "processes": acc.num_processes},
            "config": json.loads(json.dumps(raw_cfg.dict, default=str)),
        }
        import evaluate

        out.parent.mkdir(parents=True, exist_ok=True)
        evaluate.save(str(out), **payload)
        plots = save_plots(out, cfg.classes, cm, results)
        logger.info("wrote %s, %s", out, ", ".join(str(p) for p in plots))
        if show_dir is not None:
            logger.info("overlays (prediction | ground truth) in %s", show_dir)
    acc.wait_for_everyone()
    return results
