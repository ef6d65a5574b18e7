"""Evaluation, shared by training (``EvalHook``) and the evaluate command: a confusion matrix per
process over its shard, summed once across processes, and every metric from the sum."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from seg_accel.config.schema import TrainConfig
from seg_accel.data import build_dataset, build_val_loader
from seg_accel.inference.inferencer import Inferencer
from seg_accel.runtime.accelerator import pin_memory
from seg_accel.runtime.storage import agree_on_write, json_safe, write_text_atomic
from seg_accel.errors import ConfigError
from seg_accel.metrics import confusion_matrix, format_table, metrics_from_confusion
from seg_accel.metrics.binary import (
    ScoreHistogram,
    binary_from_confusion,
    foreground_probability,
    roc_pr,
    threshold_sweep,
)

logger = logging.getLogger("seg_accel")


class RecordSink(Protocol):
    """Where the training-time evaluation sends its record (the trainer's run log)."""

    def emit(self, record: dict[str, Any]) -> None: ...


def build_eval_loader(cfg: TrainConfig, split: str, accelerator: Any) -> tuple[Any, Any]:
    """(dataset, this process's loader) of ``data.<split>`` in test mode (original labels)."""
    dataset = build_dataset(getattr(cfg.data, split), f"data.{split}", cfg.ignore_index, cfg.data.skip_bad_samples)
    dataset.test_mode = True
    batch, workers = cfg.data.loader(split)
    loader = build_val_loader(dataset, batch, workers, accelerator.process_index, accelerator.num_processes,
                              pin_memory=pin_memory(cfg, accelerator), persistent_workers=cfg.data.persistent_workers,
                              prefetch_factor=cfg.data.prefetch_factor, device_type=accelerator.device.type)
    return dataset, loader


def check_split(cfg: TrainConfig) -> str:
    """The split the evaluate command scores: ``test``, else ``val``."""
    split = "test" if cfg.data.test is not None else "val"
    if getattr(cfg.data, split) is None:
        raise ConfigError("nothing to evaluate on: set data.test or data.val", key="data")
    return split


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
    skipped: list[str] | None = None,
    histogram: ScoreHistogram | None = None,
    per_image: list[tuple[int, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """This process's confusion matrix over its shard of ``loader``: scores at each original
    label size (``inferencer``: whole image by default), class ids, ``bincount``.
    ``on_batch(batch, predictions)`` sees every batch (visualisation); ``skipped`` collects
    the bad samples that ``skip_bad_samples`` replaced (their stand-ins count no pixel);
    ``histogram`` counts the foreground probabilities (2 classes); ``per_image`` collects
    ``(index, confusion matrix)`` of every image."""
    inferencer = inferencer or Inferencer(None, align_corners, autocast, threshold)
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    try:
        for batch in tqdm(loader, desc="eval", disable=not show_progress, leave=False, dynamic_ncols=True):
            pixel_values = batch["pixel_values"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            mask = batch.get("pixel_mask")
            scores = inferencer.scores(model, pixel_values, labels.shape[-2:], mask.to(device) if mask is not None else None)
            pred = inferencer.predict(scores)
            cm += confusion_matrix(pred, labels, num_classes, ignore_index)
            if histogram is not None:
                histogram.update(foreground_probability(scores, inferencer.augmented), labels, ignore_index)
            if per_image is not None:
                for index, p, label in zip(batch["indices"].tolist(), pred, labels):
                    per_image.append((index, confusion_matrix(p, label, num_classes, ignore_index).cpu()))
            if skipped is not None:
                skipped += [reason for _, reason in batch.get("skipped", [])]
            if on_batch is not None:
                on_batch(batch, pred)
    finally:
        model.train(was_training)
    return cm


def broadcast_norm_buffers(accelerator: Any, model: torch.nn.Module) -> None:
    """Every process evaluates (and exports) the main process's model: BatchNorm running
    statistics are per process in DDP (each updates them with its own batches), so they
    are copied from process 0 first (mmcv's ``broadcast_bn_buffer``)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    for module in accelerator.unwrap_model(model, keep_torch_compile=False).modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase):
            for buffer in module.buffers(recurse=False):
                if buffer is not None:
                    buffer.copy_(broadcast(buffer.clone(), from_process=0))


def evaluate_model(accelerator: Any, model: torch.nn.Module, loader: DataLoader, classes: list[str],
                   ignore_index: int, inferencer: Inferencer, metrics: list[str],
                   on_batch: Callable[[dict[str, Any], torch.Tensor], None] | None = None,
                   sweep: bool = False, per_image: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """(confusion matrix summed over every process, metrics); identical for any number of
    processes. The per-class table is logged, and the bad samples skipped (each process's).
    ``results["skipped"]`` counts those of all processes. With 2 classes the binary metrics
    (foreground IoU/Dice, sensitivity, specificity, precision) lead the results; ``AUC`` in
    ``metrics`` adds ROC/PR areas and curves (``results["curves"]``), ``sweep`` the best
    threshold (``results["threshold_sweep"]``), ``per_image`` each image's metrics
    (``results["per_image"]``, main process)."""
    binary = len(classes) == 2
    if ("AUC" in metrics or sweep) and not binary:
        raise ConfigError(f"AUC and the threshold sweep need a 2-class model (foreground vs background); this one "
                          f"has {len(classes)} classes", key="--metrics" if "AUC" in metrics else "--threshold-sweep")
    skipped: list[str] = []
    histogram = ScoreHistogram(device=accelerator.device) if "AUC" in metrics or sweep else None
    images: list[tuple[int, torch.Tensor]] | None = [] if per_image else None
    cm = collect_confusion(accelerator.unwrap_model(model, keep_torch_compile=False), loader, len(classes), ignore_index,
                           device=accelerator.device, show_progress=accelerator.is_main_process,
                           inferencer=inferencer, on_batch=on_batch, skipped=skipped, histogram=histogram,
                           per_image=images)
    if skipped:
        logger.warning("evaluation: process %d skipped %d bad sample(s), not counted: %s", accelerator.process_index,
                       len(skipped), "; ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    count = torch.tensor([len(skipped)], device=accelerator.device)
    if accelerator.num_processes > 1:
        cm = accelerator.reduce(cm, reduction="sum")
        count = accelerator.reduce(count, reduction="sum")
        if histogram is not None:
            histogram.counts = accelerator.reduce(histogram.counts, reduction="sum")
        if images is not None:
            from accelerate.utils import gather_object

            images = gather_object([(i, m.tolist()) for i, m in images])
    results: dict[str, Any] = binary_from_confusion(cm) if binary else {}
    results.update(metrics_from_confusion(cm, [m for m in metrics if m != "AUC"]))
    if histogram is not None:
        areas = roc_pr(histogram.positives, histogram.negatives)
        if "AUC" in metrics:
            results.update({k: areas[k] for k in ("AUC_ROC", "AUC_PR", "auc_bin_error_bound")})
            results["curves"] = {k: areas[k] for k in ("fpr", "tpr", "recall", "precision")}
        if sweep:
            results["threshold_sweep"] = threshold_sweep(histogram.positives, histogram.negatives)
    if images is not None:
        results["per_image"] = per_image_metrics(images, classes)
    logger.info("per-class results:\n%s", format_table(classes, results["per_class"]))
    if binary:
        logger.info("foreground (%s): %s", classes[1], "  ".join(
            f"{k}: {results[k]:.2f}" for k in ("fgIoU", "fgDice", "Sensitivity", "Specificity", "Precision")))
    if "threshold_sweep" in results:
        best = results["threshold_sweep"]
        logger.info("threshold sweep: the best threshold by foreground Dice is %.4f (fgDice %.2f, fgIoU %.2f)",
                    best["threshold"], best["fgDice"], best["fgIoU"])
    return cm, {**results, "skipped": int(count.item())}


def per_image_metrics(images: list[tuple[int, Any]], classes: list[str]) -> list[dict[str, Any]]:
    """Each image's metrics from its own confusion matrix, in dataset order: per-class IoU and
    Dice (and, with 2 classes, the binary metrics), pixel accuracy."""
    rows = []
    for index, matrix in sorted(images, key=lambda item: item[0]):
        cm = torch.as_tensor(matrix)
        scores = metrics_from_confusion(cm, ["mIoU", "mDice"])
        row: dict[str, Any] = {"index": index, "aAcc": scores["aAcc"], "mIoU": scores["mIoU"], "mDice": scores["mDice"]}
        if len(classes) == 2:
            row.update(binary_from_confusion(cm))
        for column in ("IoU", "Dice"):
            row.update({f"{column}.{name}": value for name, value in zip(classes, scores["per_class"][column])})
        rows.append(row)
    return rows


SCALAR_TYPES = (int, float)


def summary_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of an evaluation (no per-class columns, curves or per-image rows)."""
    return {k: v for k, v in results.items() if isinstance(v, SCALAR_TYPES) and not isinstance(v, bool)
            and k not in ("skipped", "auc_bin_error_bound")}


def eval_record(results: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """The summary metrics and ``<column>.<class>`` per-class values of one evaluation."""
    summary = summary_metrics(results)
    per_class = {f"{column}.{name}": value for column, values in results["per_class"].items()
                 for name, value in zip(classes, values)}
    return {**summary, **per_class}


class Evaluator:
    """Training-time evaluation on ``data.val``: at most once per iteration (a second request
    at the same iteration gets the same results), the main process's BatchNorm statistics,
    the record handed to the logger hooks and ``eval_results.json`` rewritten."""

    def __init__(self, accelerator: Any, model: torch.nn.Module, loader: DataLoader, classes: list[str],
                 ignore_index: int, inferencer: Inferencer, results_file: Path, log: RecordSink):
        self.accelerator, self.model, self.loader = accelerator, model, loader
        self.classes, self.ignore_index, self.inferencer = list(classes), ignore_index, inferencer
        self.results_file, self.log = results_file, log
        self.latest: dict[str, Any] | None = None
        self._latest_iter: int | None = None

    def evaluate(self, iteration: int, epoch: int, metrics: list[str]) -> dict[str, Any]:
        if self._latest_iter == iteration and self.latest is not None:
            return self.latest
        acc = self.accelerator
        started = time.perf_counter()
        broadcast_norm_buffers(acc, self.model)
        cm, results = evaluate_model(acc, self.model, self.loader, self.classes, self.ignore_index,
                                     self.inferencer, metrics)
        seconds = time.perf_counter() - started
        skipped = results.pop("skipped")
        self.log.emit({"mode": "val", "epoch": epoch, "iter": iteration, **eval_record(results, self.classes)})
        error = None
        if acc.is_main_process:
            payload = {
                "iter": iteration, "epoch": epoch,
                "metrics": summary_metrics(results),
                "per_class": {c: dict(zip(self.classes, v)) for c, v in results["per_class"].items()},
                "confusion_matrix": cm.cpu().tolist(), "classes": self.classes,
                "num_processes": acc.num_processes, "skipped_samples": skipped, "seconds": round(seconds, 3),
            }
            try:
                write_text_atomic(self.results_file, json.dumps(json_safe(payload), indent=2, allow_nan=False))
            except OSError as exc:
                error = exc
        agree_on_write(acc, error, f"the evaluation results {self.results_file}")
        self.latest, self._latest_iter = results, iteration
        return results
