"""Checkpoint testing (the evaluate command): score a checkpoint or export on ``data.test`` (else ``data.val``).

Each process takes its shard of the dataset (no padding, so no sample is counted twice),
accumulates a confusion matrix on its device and the matrices are summed once; every
metric comes from the sum (docs/behaviour.md section 8), identical for any number of processes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from seg_accel import threads
from seg_accel.config.loader import Config
from seg_accel.config.schema import TrainConfig
from seg_accel.inference.evaluation import build_eval_loader, check_split, evaluate_model, summary_metrics
from seg_accel.inference.inferencer import build_inferencer
from seg_accel.inference.reports import Overlays, save_per_image_csv, save_plots, save_results
from seg_accel.models import keep_norms_fp32_if_cpu_bf16, load_model
from seg_accel.runtime.accelerator import build_accelerator
from seg_accel.runtime.console import setup_logging

logger = logging.getLogger("seg_accel")


def evaluate_checkpoint(cfg: TrainConfig, raw_cfg: Config, checkpoint: str, metrics: list[str], aug_test: bool,
                        out: Path, show_dir: Path | None = None, opacity: float = 0.5, sweep: bool = False,
                        per_image: bool = False, show_image: bool = False, show_scale: int = 1,
                        trust_remote_code: bool = False) -> dict[str, Any]:
    """Score ``checkpoint``; print the table; write ``out`` (JSON), its charts and with
    ``per_image`` ``<out stem>_per_image.csv`` (main process)."""
    acc, _ = build_accelerator(cfg, training=False)
    setup_logging(None, acc.is_main_process)
    split = check_split(cfg)
    threads.apply(threads.decide(cfg.torch_threads, cfg.data.loader(split)[1]))
    dataset, loader = build_eval_loader(cfg, split, acc)
    model = load_model(checkpoint, model_cfg=cfg.model, classes=list(cfg.classes),
                       trust_remote_code=trust_remote_code).to(acc.device).eval()
    if (note := keep_norms_fp32_if_cpu_bf16(model, acc)) is not None:  # as training evaluated it
        logger.info("%s", note)
    inferencer = build_inferencer(cfg, acc, aug_test)
    overlays = Overlays(dataset, show_dir, opacity, cfg.ignore_index, show_image, show_scale) \
        if show_dir is not None else None
    logger.info("evaluating %s on data.%s (%d images, %d process(es)): %s%s", checkpoint, split, len(dataset),
                acc.num_processes, inferencer.mode,
                f", scales {inferencer.ratios}{' + flip' if inferencer.flip else ''}" if inferencer.augmented else "")
    start = time.perf_counter()
    cm, results = evaluate_model(acc, model, loader, list(cfg.classes), cfg.ignore_index, inferencer, metrics,
                                 on_batch=overlays, sweep=sweep, per_image=per_image)
    seconds = time.perf_counter() - start
    skipped = results.pop("skipped")
    images = len(dataset) - skipped
    if acc.is_main_process:
        summary = summary_metrics(results)
        logger.info("%s", "  ".join(f"{k}: {v:.2f}" for k, v in summary.items()))
        extra = {key: results[key] for key in ("threshold_sweep", "curves") if key in results}
        if "auc_bin_error_bound" in results:
            extra["auc_bin_error_bound"] = results["auc_bin_error_bound"]
        payload = {
            "metrics": summary,
            **extra,
            "per_class": {c: dict(zip(cfg.classes, v)) for c, v in results["per_class"].items()},
            "classes": list(cfg.classes),
            "confusion_matrix": cm.cpu().tolist(),
            "checkpoint": str(checkpoint),
            "split": split,
            "test_cfg": dataclasses.asdict(inferencer.test_cfg),
            "timings": {"seconds": seconds, "images": images, "seconds_per_image": seconds / max(images, 1),
                        "processes": acc.num_processes},
            "skipped_samples": skipped,
            "config": json.loads(json.dumps(raw_cfg.dict, default=str)),
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        save_results(out, payload)
        plots = save_plots(out, list(cfg.classes), cm, results)
        if "per_image" in results:
            plots.append(save_per_image_csv(out.with_name(out.stem + "_per_image.csv"), results["per_image"], dataset))
        logger.info("wrote %s, %s", out, ", ".join(str(p) for p in plots))
        if show_dir is not None:
            logger.info("overlays (%sprediction | ground truth) in %s", "image | " if show_image else "", show_dir)
    acc.wait_for_everyone()
    acc.end_training()  # the process group destroyed: a clean exit under a launcher
    return results
