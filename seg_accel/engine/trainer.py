"""The iteration-based trainer on Accelerate.

Reads like Accelerate's own examples: build the ``Accelerator``, seed, build
data/model/optimizer, one ``prepare`` call, then a short loop of
``accumulate`` + ``backward``, clipping only when gradients are synced, and the
lr schedule stepped once per optimizer step (never through ``prepare``).
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from seg_accel import __version__
from seg_accel.config.loader import Config
from seg_accel.config.schema import TrainConfig
from seg_accel.data import build_dataset, build_train_loader, build_val_loader
from seg_accel.engine.evaluation import collect_confusion
from seg_accel.engine.log import IntervalMeter, JsonLog, format_eta, setup_logging
from seg_accel.losses.head import build_head_losses
from seg_accel.metrics import format_summary, format_table, metrics_from_confusion
from seg_accel.models.builder import (
    AuxiliaryCapture,
    build_model,
    needs_unused_parameter_search,
    segmentation_logits,
)
from seg_accel.optim import build_constructor, build_lr_scheduler, build_momentum_scheduler, param_group_table
from seg_accel.optim.schedules import ParamScheduler

logger = logging.getLogger("seg_accel")

EVAL_RESULTS = "eval_results.json"
FINAL_DIR = "final"


def _multi_process_without_accelerator() -> bool:
    """Launched as several processes on a machine with no GPU: Accelerate would start
    independent single-process runs unless told to use the CPU (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())


class Trainer:
    """Builds everything from a validated ``TrainConfig`` and runs ``runner.max_iters`` optimizer steps."""

    def __init__(self, cfg: TrainConfig, raw_cfg: Config, work_dir: str | Path):
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.work_dir = Path(work_dir)
        # find_unused_parameters is decided once the model is built, before prepare().
        self.ddp_kwargs = DistributedDataParallelKwargs()
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            cpu=_multi_process_without_accelerator(),
            kwargs_handlers=[self.ddp_kwargs],
            step_scheduler_with_optimizer=False,
        )
        if acc.is_main_process:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            raw_cfg.save(self.work_dir / "config.yaml")
        acc.wait_for_everyone()
        timestamp = setup_logging(self.work_dir, acc.is_main_process)
        self.json_log = JsonLog(self.work_dir / f"{timestamp}.log.json" if acc.is_main_process else None)
        _quiet_libraries(acc.is_main_process)
        # Depthwise conv weights (C, 1, k, k) get grads whose size-1 dim has another stride than
        # DDP's bucket view: the same memory layout, so DDP's performance warning is a false alarm.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        set_seed(cfg.seed)

        self.classes = list(cfg.classes)
        self.head_losses = [build_head_losses(cfg.model.decode_head, len(self.classes), "decode", "model.decode_head")]
        if cfg.model.auxiliary_head is not None:
            self.head_losses.append(
                build_head_losses(cfg.model.auxiliary_head, len(self.classes), "aux", "model.auxiliary_head"))
        for losses in self.head_losses:
            losses.to(acc.device)

        ignore_index = cfg.model.decode_head.ignore_index
        train_set = build_dataset(cfg.data.train, "data.train", ignore_index, cfg.data.skip_bad_samples)
        self.val_set = None
        if cfg.data.val is not None:
            self.val_set = build_dataset(cfg.data.val, "data.val", ignore_index, cfg.data.skip_bad_samples)
            self.val_set.test_mode = True
        pin = acc.device.type == "cuda"
        self.train_loader = build_train_loader(
            train_set, cfg.data.samples_per_gpu, cfg.data.workers_per_gpu,
            acc.process_index, acc.num_processes, cfg.seed, pin_memory=pin,
            shuffle=cfg.data.shuffle, buffer_size=cfg.data.shuffle_buffer_size,
        )
        stream = getattr(self.train_loader, "stream", None)
        self.epoch_log = EpochBookkeeping(acc.process_index, stream.plan if stream is not None else None)
        self.val_loader = None
        if self.val_set is not None:
            self.val_loader = build_val_loader(
                self.val_set, cfg.data.val_batch_size(), cfg.data.val_workers(),
                acc.process_index, acc.num_processes, pin_memory=pin,
            )

        set_seed(cfg.seed)  # here, so that data libraries' own use of the RNGs never changes the init
        model = build_model(cfg.model, self.classes)
        self.aux_capture = AuxiliaryCapture(model) if len(self.head_losses) > 1 else None
        find_unused = cfg.find_unused_parameters
        if find_unused is None:
            find_unused = needs_unused_parameter_search(model, aux_trained=self.aux_capture is not None)
        self.ddp_kwargs.find_unused_parameters = find_unused
        constructor = build_constructor(cfg.optimizer)
        optimizer = constructor(model)
        group_table = param_group_table(model, optimizer, getattr(constructor, "notes", None))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        schedulers = (build_lr_scheduler(cfg.lr_config, optimizer, cfg.runner.max_iters),
                      build_momentum_scheduler(cfg.momentum_config, optimizer, cfg.runner.max_iters))
        self.schedulers: list[ParamScheduler] = [s for s in schedulers if s is not None]
        self.grad_clip = cfg.optimizer_config.grad_clip
        self.iter = 0
        self._describe(train_set, model)
        logger.info("%s", group_table)

    # ------------------------------------------------------------------ logging
    def _describe(self, train_set: Any, model: torch.nn.Module) -> None:
        acc, cfg = self.accelerator, self.cfg
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        per_step = cfg.data.samples_per_gpu * acc.num_processes * cfg.gradient_accumulation_steps
        logger.info(
            "seg-accel %s | %d process(es), %s on %s | mixed precision %s | work dir %s",
            __version__, acc.num_processes, acc.distributed_type.value, acc.device, acc.mixed_precision, self.work_dir,
        )
        logger.info(
            "model %s: %.2fM parameters (%.2fM trainable), %d classes: %s",
            type(model).__name__, n_params / 1e6, n_train / 1e6, len(self.classes), ", ".join(self.classes),
        )
        logger.info(
            "data: train %s (%d samples)%s | batch %d per process x %d processes x %d accumulation = %d per step",
            type(train_set).__name__, len(train_set),
            f", val {type(self.val_set).__name__} ({len(self.val_set)} samples)" if self.val_set is not None else "",
            cfg.data.samples_per_gpu, acc.num_processes, cfg.gradient_accumulation_steps, per_step,
        )
        if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
            logger.warning("fp16 mixed precision needs a GPU; on the CPU Accelerate trains in fp32 (bf16 works on CPUs)")
        if getattr(train_set, "streaming", False):
            from seg_accel.data.streaming import describe_plan

            logger.info("%s", describe_plan(self.train_loader.stream, self.train_loader.loader.num_workers))
        logged_only = [name for losses in self.head_losses for name in losses.logged_only()]
        if logged_only:
            logger.info("logged, not trained on (name does not start with 'loss_'): %s", ", ".join(logged_only))
        if self.ddp_kwargs.find_unused_parameters and acc.num_processes > 1:
            logger.info("DDP find_unused_parameters: true")

    def _log_interval(self, meter: IntervalMeter, scheduled: dict[str, float | None], started: float,
                      start_iter: int) -> None:
        """One console line and one JSON line: the interval's means over all processes."""
        acc = self.accelerator
        averages = meter.averages()
        keys = sorted(averages)
        values = torch.tensor([averages[k] for k in keys], dtype=torch.float64, device=acc.device)
        values = acc.reduce(values, reduction="mean") if acc.num_processes > 1 else values
        averages = dict(zip(keys, values.tolist()))
        max_iters = self.cfg.runner.max_iters
        per_iter = (time.perf_counter() - started) / max(self.iter - start_iter, 1)
        record: dict[str, Any] = {"mode": "train", "iter": self.iter}
        record.update({k: v for k, v in scheduled.items() if v is not None})
        record.update(time=averages.pop("time"), data_time=averages.pop("data_time"))
        if acc.device.type == "cuda":
            record["memory"] = torch.cuda.max_memory_allocated(acc.device) // 2**20
        record.update(averages)
        self.json_log.write(record)
        parts = [f"{k}: {v:.3e}" for k, v in scheduled.items() if v is not None]
        parts.append(f"eta: {format_eta(per_iter * (max_iters - self.iter))}")
        parts += [f"{k}: {record[k]:.3f}" for k in ("time", "data_time")]
        if "memory" in record:
            parts.append(f"memory: {record['memory']}")
        parts += [f"{k}: {v:.4f}" for k, v in averages.items()]
        logger.info("Iter [%d/%d]\t%s", self.iter, max_iters, ", ".join(parts))

    # ------------------------------------------------------------------ training
    def _batch(self, data_iter: Any) -> tuple[dict[str, torch.Tensor], float]:
        start = time.perf_counter()
        batch = next(data_iter)
        waited = time.perf_counter() - start
        self.epoch_log.update(batch)
        device = self.accelerator.device
        return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}, waited

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The forward pass and every head's losses: (total to backpropagate, values to log)."""
        logits = segmentation_logits(self.model, batch["pixel_values"])
        outputs = [logits] if self.aux_capture is None else [logits, self.aux_capture.pop()]
        total, logs = 0.0, {}
        for losses, head_logits in zip(self.head_losses, outputs):
            loss, head_logs = losses(head_logits, batch["labels"])
            total = total + loss
            logs.update(head_logs)
        return total, logs

    def train_step(self, data_iter: Any) -> dict[str, Any]:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        acc = self.accelerator
        accum = self.cfg.gradient_accumulation_steps
        logs: dict[str, Any] = {"data_time": 0.0}
        group = self.optimizer.param_groups[0]  # the values this step uses (set before it)
        scheduled = {"lr": group.get("lr")}
        if any(s.target == "momentum" for s in self.schedulers):
            scheduled["momentum"] = group["betas"][0] if "betas" in group else group["momentum"]
        for _ in range(accum):
            batch, waited = self._batch(data_iter)
            logs["data_time"] += waited
            with acc.accumulate(self.model):
                loss, head_logs = self.compute_losses(batch)
                acc.backward(loss)
                if acc.sync_gradients and self.grad_clip is not None:
                    logs["grad_norm"] = acc.clip_grad_norm_(
                        self.model.parameters(), self.grad_clip.max_norm, self.grad_clip.norm_type
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in {"loss": loss.detach(), **head_logs}.items():
                logs[key] = logs.get(key, 0.0) + value / accum
        if not self.optimizer.step_was_skipped:  # fp16 overflow: the schedules wait too
            for scheduler in self.schedulers:
                scheduler.step()
        logs["scheduled"] = scheduled
        return logs

    def train(self) -> dict[str, Any] | None:
        """Train to ``runner.max_iters``, evaluate on the val set, export ``final/``."""
        acc = self.accelerator
        max_iters = self.cfg.runner.max_iters
        interval = self.cfg.log_config.interval
        data_iter = iter(self.train_loader)
        meter = IntervalMeter()
        start_iter, started = self.iter, time.perf_counter()
        last = started
        self.model.train()
        with tqdm(total=max_iters, initial=self.iter, desc="train", disable=not acc.is_main_process,
                  dynamic_ncols=True, mininterval=1.0) as bar:
            while self.iter < max_iters:
                logs = self.train_step(data_iter)
                self.iter += 1
                now = time.perf_counter()
                logs["time"], last = now - last, now
                scheduled = logs.pop("scheduled")
                meter.update(logs)
                bar.update(1)
                if self.iter % interval == 0 or self.iter == max_iters:
                    self._log_interval(meter, scheduled, started, start_iter)
                    meter.reset()
        self.epoch_log.finish()
        results = self.evaluate() if self.val_loader is not None else None
        self.export(self.work_dir / FINAL_DIR)
        return results

    # ------------------------------------------------------------------ evaluation and export
    def evaluate(self) -> dict[str, Any]:
        """mIoU etc. on the whole val set, identical for any number of processes."""
        acc = self.accelerator
        head = self.cfg.model.decode_head
        cm = collect_confusion(
            acc.unwrap_model(self.model), self.val_loader, len(self.classes), head.ignore_index,
            head.align_corners, acc.device, autocast=acc.autocast, show_progress=acc.is_main_process,
            threshold=head.threshold,
        )
        if acc.num_processes > 1:
            cm = acc.reduce(cm, reduction="sum")
        results = metrics_from_confusion(cm, ("mIoU",))
        logger.info("per-class results at iter %d:\n%s", self.iter, format_table(self.classes, results["per_class"]))
        logger.info("Iter(val) [%d]\t%s", self.iter, format_summary(results))
        self.json_log.write({"mode": "val", "iter": self.iter,
                             **{k: v for k, v in results.items() if k != "per_class"}})
        if acc.is_main_process:
            payload = {
                "iter": self.iter,
                "metrics": {k: v for k, v in results.items() if k != "per_class"},
                "per_class": {c: dict(zip(self.classes, v)) for c, v in results["per_class"].items()},
                "confusion_matrix": cm.cpu().tolist(),
                "classes": self.classes,
                "num_processes": acc.num_processes,
            }
            (self.work_dir / EVAL_RESULTS).write_text(json.dumps(payload, indent=2))
        return results

    def export(self, out_dir: Path) -> None:
        """``save_pretrained`` (safetensors, id2label in config.json) on the main process."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            model = acc.unwrap_model(self.model, keep_fp32_wrapper=False)
            model.save_pretrained(out_dir)
            logger.info("exported the final model to %s", out_dir)
        acc.wait_for_everyone()


class EpochBookkeeping:
    """Per epoch of the training stream: samples repeated to even out the processes, and bad
    samples skipped; reported when the stream moves on to the next epoch. ``plan`` (streamed
    data) gives every process's sample count, so the main process reports them all."""

    def __init__(self, rank: int, plan: Any = None):
        self.rank, self.plan, self.epoch = rank, plan, None
        self.repeats, self.skipped = 0, []

    def update(self, batch: dict[str, Any]) -> None:
        epochs = batch["epochs"].tolist()
        repeated = batch["repeated"].tolist()
        for epoch in sorted(set(epochs)):  # a batch may straddle two epochs
            if self.epoch is not None and epoch > self.epoch:
                self.finish()
            self.epoch = epoch if self.epoch is None else max(self.epoch, epoch)
            self.repeats += sum(r for e, r in zip(epochs, repeated) if e == epoch)
            self.skipped += [reason for e, reason in batch["skipped"] if e == epoch]

    def finish(self) -> None:
        if self.plan is not None and self.epoch is not None:
            counts = self.plan(self.epoch).counts
            if len(set(counts)) > 1:
                logger.info("epoch %d: samples per process %s; repeated %s so that every process runs the same "
                            "steps", self.epoch, ", ".join(map(str, counts)),
                            ", ".join(str(max(counts) - c) for c in counts))
        if self.repeats:
            logger.info("epoch %d: process %d repeated %d sample(s)", self.epoch, self.rank, self.repeats)
        if self.skipped:
            shown = "; ".join(self.skipped[:3]) + (f"; ... ({len(self.skipped) - 3} more)" if len(self.skipped) > 3 else "")
            logger.warning("epoch %d: process %d skipped %d bad sample(s): %s", self.epoch, self.rank,
                           len(self.skipped), shown)
        self.repeats, self.skipped = 0, []


def _quiet_libraries(is_main: bool) -> None:
    """Library warnings once, from the main process only."""
    import transformers

    if is_main:
        transformers.logging.set_verbosity_warning()
    else:
        transformers.logging.set_verbosity_error()
