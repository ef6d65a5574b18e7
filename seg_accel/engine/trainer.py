"""The runner on Accelerate: iteration- or epoch-based, driven by hooks.

Reads like Accelerate's own examples: build the ``Accelerator``, seed, build
data/model/optimizer, one ``prepare`` call, then a short loop of ``accumulate`` +
``backward``. Everything around the loop is a hook (SPEC section 7): the lr and
momentum schedules, the optimizer step (clipping only when gradients are synced),
checkpoints, timing, evaluation and logging, in priority order.
"""
from __future__ import annotations

import datetime
import itertools
import json
import logging
import math
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
from seg_accel.engine import checkpoint as ckpt
from seg_accel.engine.evaluation import collect_confusion
from seg_accel.engine.hooks import (
    CheckpointHook,
    EvalHook,
    FinalExportHook,
    Hook,
    IterTimerHook,
    LrUpdaterHook,
    MomentumUpdaterHook,
    OptimizerHook,
    describe_hooks,
    get_priority,
)
from seg_accel.engine.inference import Inferencer
from seg_accel.engine.log import IntervalMeter, setup_logging
from seg_accel.engine.loggers import LoggerHook, tracker_project
from seg_accel.losses.head import build_head_losses
from seg_accel.metrics import format_table, metrics_from_confusion
from seg_accel.models.builder import (
    AuxiliaryCapture,
    batch_norm_layers,
    build_model,
    convert_sync_bn,
    needs_unused_parameter_search,
    segmentation_logits,
    set_norm_eval,
)
from seg_accel.models.processor import build_image_processor
from seg_accel.optim import (
    build_constructor,
    build_lr_scheduler,
    build_momentum_scheduler,
    param_group_table,
)
from seg_accel.registry import HOOKS

logger = logging.getLogger("seg_accel")

# what a run leaves in its work dir (the Hub pushes and scripts/push_to_hub.py read them)
CONFIG_FILE = "config.yaml"
EVAL_RESULTS = "eval_results.json"
FINAL_DIR = "final"
RUN_INFO = "run_info.json"


def _multi_process_without_accelerator() -> bool:
    """Launched as several processes on a machine with no GPU: Accelerate would start
    independent single-process runs unless told to use the CPU (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())


class Trainer:
    """Builds everything from a validated ``TrainConfig``; ``train()`` runs the workflow."""

    def __init__(self, cfg: TrainConfig, raw_cfg: Config, work_dir: str | Path):
        from accelerate import (
            Accelerator,
            DistributedDataParallelKwargs,
            InitProcessGroupKwargs,
        )
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.work_dir = Path(work_dir)
        self.by_epoch = cfg.runner.by_epoch
        logger_hooks = [self._build_hook(c, f"log_config.hooks.{i}") for i, c in enumerate(cfg.log_config.hooks)]
        trackers, tracker_dir = tracker_project(logger_hooks, self.work_dir)
        # find_unused_parameters is decided once the model is built, before prepare().
        self.ddp_kwargs = DistributedDataParallelKwargs()
        handlers: list[Any] = [self.ddp_kwargs]
        if cfg.dist_timeout is not None:
            handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist_timeout)))
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            cpu=_multi_process_without_accelerator(),
            kwargs_handlers=handlers,
            step_scheduler_with_optimizer=False,
            log_with=trackers or None,
            project_dir=tracker_dir,
        )
        if acc.is_main_process:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            raw_cfg.save(self.work_dir / CONFIG_FILE)
        acc.wait_for_everyone()
        timestamp = setup_logging(self.work_dir, acc.is_main_process)
        self.json_log_path = self.work_dir / f"{timestamp}.log.json"
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
        self.train_set = build_dataset(cfg.data.train, "data.train", ignore_index, cfg.data.skip_bad_samples)
        self.val_set = None
        if cfg.data.val is not None:
            self.val_set = build_dataset(cfg.data.val, "data.val", ignore_index, cfg.data.skip_bad_samples)
            self.val_set.test_mode = True
        self.pin_memory = acc.device.type == "cuda"
        self.val_loader = None
        if self.val_set is not None:
            self.val_loader = build_val_loader(
                self.val_set, cfg.data.val_batch_size(), cfg.data.val_workers(),
                acc.process_index, acc.num_processes, pin_memory=self.pin_memory,
            )

        # counters (restored on resume); iter counts finished iterations (optimizer steps, or
        # micro-batch groups that a skipped step did not apply)
        self.iter, self.epoch, self.optimizer_steps, self.samples = 0, 0, 0, 0
        self.seconds_before = 0.0  # training time of the runs this one resumes
        per_process = math.ceil(len(self.train_set) / acc.num_processes)
        per_step = cfg.data.samples_per_gpu * cfg.gradient_accumulation_steps
        self.steps_per_epoch = max(1, math.ceil(per_process / per_step))
        self.max_iters = cfg.runner.max_epochs * self.steps_per_epoch if self.by_epoch else cfg.runner.max_iters

        set_seed(cfg.seed)  # here, so that data libraries' own use of the RNGs never changes the init
        model = build_model(cfg.model, self.classes)
        if cfg.load_from is not None:
            ckpt.load_weights(model, Path(cfg.load_from))
        self.aux_capture = AuxiliaryCapture(model) if len(self.head_losses) > 1 else None
        find_unused = cfg.find_unused_parameters
        if find_unused is None:
            find_unused = needs_unused_parameter_search(model, aux_trained=self.aux_capture is not None)
        self.ddp_kwargs.find_unused_parameters = find_unused
        self.sync_bn_note = None
        if cfg.sync_bn:
            model, self.sync_bn_note = convert_sync_bn(model, acc.num_processes, acc.device.type)
        if cfg.model.norm_eval:
            set_norm_eval(model)
        constructor = build_constructor(cfg.optimizer)
        optimizer = constructor(model)
        group_table = param_group_table(model, optimizer, getattr(constructor, "notes", None))
        self.group_names = [g.get("name", f"group{i}") for i, g in enumerate(optimizer.param_groups)]
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.trainable_params = [p for group in optimizer.param_groups for p in group["params"]]
        self.schedulers = []

        self.hooks: list[Hook] = []
        self._register_builtin_hooks(optimizer)
        for hook in logger_hooks:
            self.register_hook(hook, getattr(hook, "priority", "VERY_LOW"))
        for i, hook_cfg in enumerate(cfg.custom_hooks):
            hook = self._build_hook(hook_cfg, f"custom_hooks.{i}")
            self.register_hook(hook, hook_cfg.get("priority", getattr(hook, "priority", "NORMAL")))

        self.checkpoint_dir = Path(cfg.checkpoint_config.out_dir) if cfg.checkpoint_config and \
            cfg.checkpoint_config.out_dir else self.work_dir
        acc.register_for_checkpointing(ckpt.RunnerState(self))
        self._resume(cfg)
        self.train_loader = build_train_loader(
            self.train_set, cfg.data.samples_per_gpu, cfg.data.workers_per_gpu, acc.process_index,
            acc.num_processes, cfg.seed, start=self.samples, pin_memory=self.pin_memory,
            shuffle=cfg.data.shuffle, buffer_size=cfg.data.shuffle_buffer_size,
        )
        stream = getattr(self.train_loader, "stream", None)
        self.epoch_log = EpochBookkeeping(acc.process_index, stream.plan if stream is not None else None)

        self.meter = IntervalMeter()
        self.last_results: dict[str, Any] | None = None  # the latest evaluation
        self.final_results: dict[str, Any] | None = None  # set by FinalExportHook
        self.log_buffer: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self._record: tuple[int, dict[str, Any] | None] | None = None
        self._started, self._start_iter = time.perf_counter(), self.iter
        self._describe(model, group_table)

    # ------------------------------------------------------------------ hooks
    def _build_hook(self, cfg: dict, key: str) -> Hook:
        hook = HOOKS.build({k: v for k, v in cfg.items() if k != "priority"}, key)
        if hasattr(hook, "check_package"):
            hook.check_package()
        return hook

    def register_hook(self, hook: Hook, priority: int | str = "NORMAL") -> None:
        """Insert by priority; equal priorities keep registration order."""
        hook.priority_value = get_priority(priority)
        index = len(self.hooks)
        while index > 0 and self.hooks[index - 1].priority_value > hook.priority_value:
            index -= 1
        self.hooks.insert(index, hook)

    def call_hook(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)(self)

    def _register_builtin_hooks(self, optimizer: torch.optim.Optimizer) -> None:
        cfg = self.cfg
        for section, builder, hook_cls in (("lr_config", build_lr_scheduler, LrUpdaterHook),
                                           ("momentum_config", build_momentum_scheduler, MomentumUpdaterHook)):
            section_cfg = getattr(cfg, section)
            if section_cfg is None:
                continue
            by_epoch = bool(section_cfg.get("by_epoch", False))
            length = cfg.runner.max_epochs if by_epoch else self.max_iters
            scheduler = builder(section_cfg, optimizer, length)
            self.schedulers.append(scheduler)
            self.register_hook(hook_cls(scheduler, by_epoch), hook_cls.priority)
        self.register_hook(OptimizerHook(cfg.optimizer_config.grad_clip, cfg.skip_nonfinite_steps), "ABOVE_NORMAL")
        if cfg.checkpoint_config is not None:
            if cfg.checkpoint_config.by_epoch is None:
                cfg.checkpoint_config.by_epoch = self.by_epoch
            push = cfg.push_to_hub
            self.register_hook(CheckpointHook(cfg.checkpoint_config,
                                              export=push is not None and push.strategy == "checkpoint"), "NORMAL")
        self.register_hook(IterTimerHook(), "LOW")
        if cfg.evaluation is not None:
            self.register_hook(EvalHook(cfg.evaluation, self.by_epoch), "LOW")
        self.register_hook(FinalExportHook(), FinalExportHook.priority)
        if cfg.push_to_hub is not None:
            from seg_accel.hub.hook import PushToHubHook

            self.register_hook(PushToHubHook(cfg.push_to_hub), PushToHubHook.priority)

    def _resume(self, cfg: TrainConfig) -> None:
        if self.accelerator.is_main_process:
            ckpt.remove_unfinished(self.checkpoint_dir)
        self.accelerator.wait_for_everyone()
        path = Path(cfg.resume_from) if cfg.resume_from else None
        key = "resume_from"
        if path is None and cfg.auto_resume:
            path, key = ckpt.latest_checkpoint(self.checkpoint_dir), "auto_resume"
            if path is None:
                logger.info("auto_resume: no checkpoint in %s; starting afresh", self.checkpoint_dir)
        if path is not None:
            ckpt.load_checkpoint(self, path, key)

    # ------------------------------------------------------------------ logging
    def _describe(self, model: torch.nn.Module, group_table: str) -> None:
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
            type(self.train_set).__name__, len(self.train_set),
            f", val {type(self.val_set).__name__} ({len(self.val_set)} samples)" if self.val_set is not None else "",
            cfg.data.samples_per_gpu, acc.num_processes, cfg.gradient_accumulation_steps, per_step,
        )
        if self.by_epoch:
            logger.info("runner: %d epochs of %d iterations", cfg.runner.max_epochs, self.steps_per_epoch)
        if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
            logger.warning("fp16 mixed precision needs a GPU; on the CPU Accelerate trains in fp32 (bf16 works on CPUs)")
        if getattr(self.train_set, "streaming", False):
            from seg_accel.data.streaming import describe_plan

            logger.info("%s", describe_plan(self.train_loader.stream, self.train_loader.loader.num_workers))
        logged_only = [name for losses in self.head_losses for name in losses.logged_only()]
        if logged_only:
            logger.info("logged, not trained on (name does not start with 'loss_'): %s", ", ".join(logged_only))
        if self.ddp_kwargs.find_unused_parameters and acc.num_processes > 1:
            logger.info("DDP find_unused_parameters: true")
        if self.sync_bn_note:
            logger.info("%s", self.sync_bn_note)
        requested = [name for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))
                     if os.environ.get(env, "false").lower() in ("1", "true")]
        if requested and not self.sharded and acc.is_main_process:
            logger.warning("the launch config asks for %s, which runs on GPUs only: this %s run is %s instead (every "
                           "process holds the whole model)", requested[0], acc.device.type, acc.distributed_type.value)
        if cfg.model.norm_eval:
            logger.info("model.norm_eval: %d BatchNorm layer(s) normalise with their running statistics (not "
                        "updated)", len(batch_norm_layers(self.model)))
        if cfg.dist_timeout is not None and acc.num_processes > 1:
            logger.info("dist_timeout: a collective operation fails after %g s without the other processes",
                        cfg.dist_timeout)
        logger.info("%s", group_table)
        logger.info("%s", describe_hooks(self.hooks))

    def train_mode(self) -> None:
        """``model.train()``, with BatchNorm kept in eval mode under ``model.norm_eval``."""
        self.model.train()
        if self.cfg.model.norm_eval:
            set_norm_eval(self.model)

    @property
    def train_seconds(self) -> float:
        """Wall time spent training, over every resumed run."""
        return self.seconds_before + time.perf_counter() - self._started

    def run_info(self) -> dict[str, Any]:
        """How the run was made (for ``run_info.json`` and the model card)."""
        import platform

        import accelerate
        import transformers

        acc = self.accelerator
        device_name = torch.cuda.get_device_name(acc.device) if acc.device.type == "cuda" else \
            (f"CPU ({platform.processor() or platform.machine()})" if acc.device.type == "cpu" else acc.device.type)
        return {
            "seg_accel": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "num_processes": acc.num_processes,
            "distributed_type": acc.distributed_type.value, "device": acc.device.type, "device_name": device_name,
            "mixed_precision": acc.mixed_precision, "iterations": self.iter, "epochs": self.epoch,
            "optimizer_steps": self.optimizer_steps, "samples": self.samples,
            "train_seconds": round(self.train_seconds, 1),
        }

    def seconds_per_iter(self) -> float:
        return (time.perf_counter() - self._started) / max(self.iter - self._start_iter, 1)

    def _is_log_iter(self) -> bool:
        return self.iter % self.cfg.log_config.interval == 0 or self.iter == self.max_iters

    def interval_record(self) -> dict[str, Any] | None:
        """At a log iteration: the interval's means over all processes (computed once, for every
        logger hook); otherwise None. Every process calls it at the same iterations."""
        if self._record is not None and self._record[0] == self.iter:
            return self._record[1]
        record = None
        if self._is_log_iter():
            self.meter.update(self.log_buffer)
            averages = self.meter.averages()
            self.meter.reset()
            keys = sorted(averages)
            values = torch.tensor([averages[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="mean")
            averages = dict(zip(keys, values.tolist()))
            record = {"mode": "train", "epoch": self.epoch + 1, "iter": self.iter, **self.scheduled}
            record.update({k: averages.pop(k) for k in ("time", "data_time") if k in averages})
            if self.accelerator.device.type == "cuda":
                record["memory"] = torch.cuda.max_memory_allocated(self.accelerator.device) // 2**20
            record.update(averages)
        self._record = (self.iter, record)
        return record

    def emit(self, record: dict[str, Any]) -> None:
        """Hand a record (an evaluation, a val phase) to every logger hook."""
        for hook in self.hooks:
            if isinstance(hook, LoggerHook):
                hook.log(self, record)

    # ------------------------------------------------------------------ training
    def _batch(self, data_iter: Any) -> tuple[dict[str, torch.Tensor], float]:
        start = time.perf_counter()
        batch = next(data_iter)
        waited = time.perf_counter() - start
        self.epoch_log.update(batch)
        self.samples += len(batch["indices"])
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

    def _scheduled_values(self) -> dict[str, float]:
        """The lr (first group, and each group by name when there are several) and momentum this step uses."""
        groups = self.optimizer.param_groups
        values: dict[str, float] = {}
        if "lr" in groups[0]:
            values["lr"] = groups[0]["lr"]
            if len(groups) > 1:
                values.update({f"lr.{name}": g["lr"] for name, g in zip(self.group_names, groups)})
        if self.cfg.momentum_config is not None:
            values["momentum"] = groups[0]["betas"][0] if "betas" in groups[0] else groups[0]["momentum"]
        return values

    def train_iter(self, data_iter: Any) -> None:
        """One iteration: ``gradient_accumulation_steps`` micro-batches forward and backward; the
        optimizer steps in OptimizerHook (after_train_iter)."""
        acc = self.accelerator
        accum = self.cfg.gradient_accumulation_steps
        self.call_hook("before_train_iter")
        self.scheduled = self._scheduled_values()
        if not self.model.training:
            self.train_mode()
        logs: dict[str, Any] = {}
        data_time = 0.0
        for _ in range(accum):
            batch, waited = self._batch(data_iter)
            data_time += waited
            with acc.accumulate(self.model):
                loss, head_logs = self.compute_losses(batch)
                acc.backward(loss)
            for key, value in {"loss": loss.detach(), **head_logs}.items():
                logs[key] = logs.get(key, 0.0) + value / accum
        self.outputs = logs
        self.log_buffer = {**logs, "data_time": data_time}
        self.iter += 1
        self.call_hook("after_train_iter")
        if self._record is None or self._record[0] != self.iter:  # not taken by a logger at this iteration
            self.meter.update(self.log_buffer)

    @torch.no_grad()
    def val_phase(self, data_iter: Any, iterations: int) -> None:
        """A workflow ``val`` phase: the losses on the val data, no update."""
        self.call_hook("before_val_epoch")
        self.model.eval()
        meter = IntervalMeter()
        for _ in range(iterations):
            self.call_hook("before_val_iter")
            batch = next(data_iter)
            batch = {k: v.to(self.accelerator.device) for k, v in batch.items() if torch.is_tensor(v)}
            loss, logs = self.compute_losses(batch)
            meter.update({"loss": loss, **logs})
            self.call_hook("after_val_iter")
        averages = meter.averages()
        keys = sorted(averages)
        values = torch.tensor([averages[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        self.emit({"mode": "val", "epoch": self.epoch + 1, "iter": self.iter, **dict(zip(keys, values.tolist()))})
        self.call_hook("after_val_epoch")
        self.train_mode()

    def _val_batches(self) -> Any:
        """Endless val batches for workflow val phases (each process its shard, in order)."""
        return itertools.chain.from_iterable(itertools.repeat(self.val_loader))

    def _phases(self) -> Any:
        """The workflow as (mode, count) phases from the current position onwards (a resumed run
        picks up inside its cycle)."""
        workflow = [tuple(p) for p in self.cfg.workflow]
        unit = self.steps_per_epoch if self.by_epoch else 1
        per_cycle = sum(n for mode, n in workflow if mode == "train") * unit
        done = self.iter % per_cycle
        for mode, count in itertools.cycle(workflow):
            if mode == "train":
                span = count * unit
                if done >= span:
                    done -= span
                    continue
                yield mode, span - done
                done = 0
            elif done == 0:
                yield mode, count

    def train(self) -> dict[str, Any] | None:
        """Run the workflow to ``max_iters`` (``max_epochs``), then evaluate and export ``final/``."""
        acc = self.accelerator
        data_iter = iter(self.train_loader)
        val_iter = self._val_batches() if any(m == "val" for m, _ in self.cfg.workflow) else None
        self._started, self._start_iter = time.perf_counter(), self.iter
        if self.trackers:
            acc.init_trackers(self.work_dir.name, config={"work_dir": str(self.work_dir)},
                              init_kwargs=self._tracker_kwargs())
        self.call_hook("before_run")
        with tqdm(total=self.max_iters, initial=self.iter, desc="train", disable=not acc.is_main_process,
                  dynamic_ncols=True, mininterval=1.0) as bar:
            for mode, count in self._phases():
                if mode == "train" and self.iter >= self.max_iters:
                    break  # as mmcv: a val phase after the last train phase still runs
                if mode == "val":
                    self.val_phase(val_iter, count if not self.by_epoch else count * len(self.val_loader))
                    continue
                self.call_hook("before_train_epoch")
                for remaining in range(count - 1, -1, -1):
                    if self.iter >= self.max_iters:
                        break
                    self.train_iter(data_iter)
                    bar.update(1)
                    if self.by_epoch and self.iter % self.steps_per_epoch == 0:
                        self.call_hook("after_train_epoch")
                        self.epoch += 1
                        if remaining and self.iter < self.max_iters:
                            self.call_hook("before_train_epoch")
                if not self.by_epoch:
                    self.call_hook("after_train_epoch")
        self.epoch_log.finish()
        self.call_hook("after_run")  # FinalExportHook evaluates and exports final/
        if self.trackers:
            acc.end_training()
        return self.final_results

    # ------------------------------------------------------------------ evaluation and export
    @property
    def trackers(self) -> list[str]:
        return [h.tracker for h in self.hooks if isinstance(h, LoggerHook) and h.tracker]

    def _tracker_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for hook in self.hooks:
            if isinstance(hook, LoggerHook):
                kwargs.update(hook.tracker_kwargs(self))
        return kwargs

    def evaluate(self, metrics: list[str] | None = None) -> dict[str, Any]:
        """Metrics on the whole val set, identical for any number of processes; written to
        ``eval_results.json`` and handed to the logger hooks (per class too)."""
        acc = self.accelerator
        head = self.cfg.model.decode_head
        metrics = metrics or (self.cfg.evaluation.metrics() if self.cfg.evaluation else ["mIoU"])
        self.broadcast_norm_buffers()
        inferencer = Inferencer(self.cfg.model.test_cfg, head.align_corners, acc.autocast, head.threshold)
        cm = collect_confusion(
            acc.unwrap_model(self.model), self.val_loader, len(self.classes), head.ignore_index,
            device=acc.device, show_progress=acc.is_main_process, inferencer=inferencer,
        )
        if acc.num_processes > 1:
            cm = acc.reduce(cm, reduction="sum")
        results = metrics_from_confusion(cm, metrics)
        logger.info("per-class results at iter %d:\n%s", self.iter, format_table(self.classes, results["per_class"]))
        summary = {k: v for k, v in results.items() if k != "per_class"}
        per_class = {f"{column}.{name}": value for column, values in results["per_class"].items()
                     for name, value in zip(self.classes, values)}
        self.emit({"mode": "val", "epoch": self.epoch, "iter": self.iter, **summary, **per_class})
        if acc.is_main_process:
            payload = {
                "iter": self.iter,
                "epoch": self.epoch,
                "metrics": summary,
                "per_class": {c: dict(zip(self.classes, v)) for c, v in results["per_class"].items()},
                "confusion_matrix": cm.cpu().tolist(),
                "classes": self.classes,
                "num_processes": acc.num_processes,
            }
            (self.work_dir / EVAL_RESULTS).write_text(json.dumps(payload, indent=2))
        self.last_results = results
        return results

    def broadcast_norm_buffers(self) -> None:
        """Every process evaluates (and exports) the main process's model: BatchNorm running
        statistics are per process in DDP (each updates them with its own batches), so they
        are copied from process 0 first (mmcv's ``broadcast_bn_buffer``)."""
        if self.accelerator.num_processes == 1:
            return
        from accelerate.utils import broadcast

        model = self.accelerator.unwrap_model(self.model)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._NormBase):
                for name, buffer in module.named_buffers(recurse=False):
                    if buffer is not None:
                        buffer.copy_(broadcast(buffer.clone(), from_process=0))

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: no process holds the whole model; exports gather it first."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def export_state(self) -> dict[str, Any] | None:
        """The full state dict for an export, gathered from every process's shards (every
        process must call it) when the model is sharded; None otherwise (the model's own)."""
        return self.accelerator.get_state_dict(self.model) if self.sharded else None

    def export(self, out_dir: Path, wait: bool = True, state_dict: dict[str, Any] | None = None) -> None:
        """``save_pretrained`` (safetensors, id2label in config.json) and the image processor
        (``preprocessor_config.json``) on the main process. With ``wait`` every process calls
        it (and a sharded model is gathered here); without, only the main process does, and a
        sharded model's ``state_dict`` comes from ``export_state()``."""
        acc = self.accelerator
        if wait:
            acc.wait_for_everyone()
            if state_dict is None:
                state_dict = self.export_state()
        elif state_dict is None and self.sharded:
            raise RuntimeError("a sharded model is exported with the state dict gathered by export_state()")
        if acc.is_main_process:
            model = acc.unwrap_model(self.model, keep_fp32_wrapper=False)
            model.save_pretrained(out_dir, state_dict=state_dict)
            build_image_processor(self.cfg.data).save_pretrained(out_dir)
            logger.info("exported the model to %s", out_dir)
        if wait:
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
