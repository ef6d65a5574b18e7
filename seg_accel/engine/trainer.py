"""The training loop on Accelerate: iteration- or epoch-based, with MMSegmentation's hooks.

It reads like Accelerate's own examples: build the ``Accelerator``, seed, build data, model
and optimizer, one ``prepare`` call, then a short loop (``train`` and ``train_iter``) of
``accumulate`` + forward + losses + ``backward``. The components around it are built here and
handed to the hooks that use them: the run log (interval averages, logger hooks), the
checkpointer, the evaluator (shared with the evaluate command) and the exporter. The
schedules and the optimizer step are ``LrUpdaterHook`` (priority 10) and ``OptimizerHook``
(40), as in mmcv, so that users' hooks order themselves around them.
"""
from __future__ import annotations

import functools
import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from seg_accel import threads
from seg_accel.config.loader import Config
from seg_accel.config.schema import TrainConfig
from seg_accel.data import EpochBookkeeping, build_dataset, build_train_loader
from seg_accel.engine.checkpoint import Checkpointer
from seg_accel.engine.export import Exporter
from seg_accel.engine.hooks import (
    CheckpointHook,
    EvalHook,
    FinalExportHook,
    Hook,
    HookList,
    IterTimerHook,
    LrUpdaterHook,
    MomentumUpdaterHook,
    OptimizerHook,
)
from seg_accel.engine.loggers import IntervalMeter, LoggerHook, RunLog, scheduled_values, tracker_project
from seg_accel.engine.resume_changes import check_not_finished
from seg_accel.engine.runner import Runner
from seg_accel.engine.state import LoopState, TrainingState, run_info, workflow_phases
from seg_accel.engine.summary import describe_run
from seg_accel.inference.evaluation import Evaluator, build_eval_loader
from seg_accel.inference.inferencer import build_inferencer
from seg_accel.losses.head import build_head_losses
from seg_accel.models import build_model, family_of_model, keep_norms_fp32_if_cpu_bf16, load_weights
from seg_accel.models.builder import convert_sync_bn, set_norm_eval
from seg_accel.models.processor import build_image_processor
from seg_accel.optim import (
    build_constructor,
    build_lr_scheduler,
    build_momentum_scheduler,
    param_group_table,
    with_fused_kernel,
)
from seg_accel.optim.schedules import schedule_warnings
from seg_accel.registry import HOOKS
from seg_accel.runtime.workdir import CONFIG_FILE, EVAL_RESULTS, FINAL_DIR, RUN_INFO
from seg_accel.runtime.accelerator import build_accelerator, pin_memory, quiet_libraries
from seg_accel.runtime.console import setup_logging
from seg_accel.runtime.lock import lock_work_dir
from seg_accel.runtime.storage import write_text_atomic

logger = logging.getLogger("seg_accel")


class Trainer:
    """Builds everything from a validated ``TrainConfig``; ``train()`` runs the workflow."""

    def __init__(self, cfg: TrainConfig, raw_cfg: Config, work_dir: str | Path | None = None):
        self.cfg, self.by_epoch = cfg, cfg.runner.by_epoch
        self.work_dir = Path(work_dir if work_dir is not None else cfg.work_dir)
        self.loop = LoopState()  # the counters: written by this loop alone (hooks get a read-only Runner)
        self.lock = None
        logger_hooks = self._start(raw_cfg)
        try:
            self._build_data()
            model, group_table, notes = self._build_model_and_optimizer()
            notes = [*(f"config: {line}" for line in raw_cfg.notices), *notes]  # what MMSegmentation's keys became
            self._build_components()
            self._build_hooks(logger_hooks)
            self._resume(model)
            self._build_train_loader()
        except BaseException:
            self.release_work_dir()
            raise
        if self.accelerator.is_main_process:  # built, loaded and resumed: this config is now the work dir's
            write_text_atomic(self.work_dir / CONFIG_FILE, self._config_text)
        describe_run(cfg, self.accelerator, self.work_dir, model, self.train_set, self.val_set, self.train_loader,
                     self.head_losses, self.steps_per_epoch, self.exporter.sharded,
                     self.ddp_kwargs.find_unused_parameters, group_table, self.hooks, notes, self.warnings)

    # ------------------------------------------------------------------ build steps
    def _start(self, raw_cfg: Config) -> list[Hook]:
        """The Accelerator (with the logger hooks' trackers), the work dir, logging, the thread
        budget, this run's config beside its log, the seed. Returns the logger hooks."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        logger_hooks = [self._build_hook(c, f"log_config.hooks.{i}") for i, c in enumerate(cfg.log_config.hooks)]
        self.trackers, tracker_dir = tracker_project(logger_hooks, self.work_dir)
        self.accelerator, self.ddp_kwargs = build_accelerator(cfg, self.trackers, tracker_dir)
        acc = self.accelerator
        if acc.is_main_process:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self.lock = lock_work_dir(acc, self.work_dir)  # one run per work dir, before anything is written there
        timestamp = setup_logging(self.work_dir, acc.is_main_process)
        if self.lock is not None and self.lock.note is not None:
            logger.warning("%s", self.lock.note)
        self.json_log_path = self.work_dir / f"{timestamp}.log.json"
        self.threads = threads.decide(cfg.torch_threads, cfg.data.workers_per_gpu)
        threads.apply(self.threads)
        # this run's config beside its log now; config.yaml (what the checkpoints are made with) only
        # once the run has started (a resume that fails must not replace it)
        self._config_text = raw_cfg.dump(work_dir=str(self.work_dir))
        if acc.is_main_process:
            write_text_atomic(self.work_dir / f"{timestamp}.config.yaml", self._config_text)
        quiet_libraries(acc.is_main_process)
        # Depthwise conv weights (C, 1, k, k) get grads whose size-1 dim has another stride than
        # DDP's bucket view: the same memory layout, so DDP's performance warning is a false alarm.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        set_seed(cfg.seed, deterministic=cfg.deterministic)
        return logger_hooks

    def _build_data(self) -> None:
        """The heads' losses, the training set, the val set and loader, the run's length."""
        cfg, acc = self.cfg, self.accelerator
        self.classes = list(cfg.classes)
        self.head_losses = [build_head_losses(cfg.model.decode_head, len(self.classes), "decode", "model.decode_head")]
        if cfg.model.auxiliary_head is not None:
            self.head_losses.append(
                build_head_losses(cfg.model.auxiliary_head, len(self.classes), "aux", "model.auxiliary_head"))
        for losses in self.head_losses:
            losses.to(acc.device)
        self.train_set = build_dataset(cfg.data.train, "data.train", cfg.ignore_index, cfg.data.skip_bad_samples)
        self.val_set = self.val_loader = None
        if cfg.data.val is not None:
            self.val_set, self.val_loader = build_eval_loader(cfg, "val", acc)
        per_process = math.ceil(len(self.train_set) / acc.num_processes)
        self.steps_per_epoch = max(1, math.ceil(per_process / (cfg.data.samples_per_gpu *
                                                               cfg.gradient_accumulation_steps)))
        self.max_iters = cfg.runner.max_epochs * self.steps_per_epoch if self.by_epoch else cfg.runner.max_iters

    def _build_model_and_optimizer(self) -> tuple[torch.nn.Module, str, list[str]]:
        """The model (its family's forward, weights from ``load_from``, sync BN, norm modes,
        memory format) and the optimizer, prepared. Returns (the unwrapped model, the group
        table, notes for the summary)."""
        from accelerate.utils import set_seed

        cfg, acc = self.cfg, self.accelerator
        set_seed(cfg.seed, deterministic=cfg.deterministic)  # so that data libraries' use of the RNGs never changes the init
        model = build_model(cfg.model, self.classes)
        if cfg.load_from is not None:
            load_weights(model, Path(cfg.load_from))
        family = family_of_model(model)
        aux_trained = len(self.head_losses) > 1
        self.forward = family.forward_fn(model, auxiliary=aux_trained)
        self.objective = family.training_objective(model, cfg.ignore_index, cfg.seed)  # None: the heads' losses
        find_unused = cfg.find_unused_parameters
        self.ddp_kwargs.find_unused_parameters = family.needs_unused_parameter_search(model, aux_trained) \
            if find_unused is None else find_unused
        notes = [self.objective.describe()] if self.objective is not None else []
        if cfg.sync_bn or getattr(model, "seg_accel_sync_bn", False):  # or MMSegmentation's SyncBN
            model, note = convert_sync_bn(model, acc.num_processes, acc.device.type)
            notes.append(note)
        if cfg.model.norm_eval:
            set_norm_eval(model)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if (note := keep_norms_fp32_if_cpu_bf16(model, acc)) is not None:
            notes.append(note)
        optimizer_cfg, fused_note = with_fused_kernel(cfg.optimizer, acc.device.type)
        constructor = build_constructor(optimizer_cfg)
        optimizer = constructor(model)
        notes_of_groups = list(getattr(constructor, "notes", None) or []) + ([fused_note] if fused_note else [])
        group_table = param_group_table(model, optimizer, notes_of_groups)
        self.group_names = [g.get("name", f"group{i}") for i, g in enumerate(optimizer.param_groups)]
        self._optimizer, self._params = optimizer, [p for group in optimizer.param_groups for p in group["params"]]
        self.model, self.optimizer = acc.prepare(model, optimizer)
        return model, group_table, notes

    def _build_components(self) -> None:
        """What the hooks are given: the run log, the exporter, the checkpointer, the evaluator."""
        cfg, acc = self.cfg, self.accelerator
        self.log = RunLog(acc, self.work_dir, self.json_log_path, cfg.log_config.interval, self.max_iters,
                          self.by_epoch, self.steps_per_epoch)
        self.exporter = Exporter(acc, self.model, self.classes, build_image_processor(cfg.data))
        self.checkpoint_dir = Path(cfg.checkpoint_config.out_dir) if cfg.checkpoint_config and \
            cfg.checkpoint_config.out_dir else self.work_dir
        self.hooks = HookList()
        self.checkpointer = Checkpointer(acc, self.checkpoint_dir, TrainingState(self.loop, self.hooks), self.exporter,
                                         self._config_text)
        self.evaluator = None
        if cfg.evaluates:
            self.evaluator = Evaluator(acc, self.model, self.val_loader, self.classes, cfg.ignore_index,
                                       build_inferencer(cfg, acc), self.work_dir / EVAL_RESULTS, self.log)
        self.runner = Runner(self.loop, self.hooks, self.run_info, accelerator=acc, model=self.model,
                             optimizer=self.optimizer, log=self.log, checkpointer=self.checkpointer,
                             evaluator=self.evaluator, exporter=self.exporter, work_dir=self.work_dir,
                             checkpoint_dir=self.checkpoint_dir, max_iters=self.max_iters, by_epoch=self.by_epoch,
                             max_epochs=cfg.runner.max_epochs, steps_per_epoch=self.steps_per_epoch)

    def _build_hooks(self, logger_hooks: list[Hook]) -> None:
        """The built-ins (schedules, optimizer step, checkpoints, timer, evaluation, final export,
        the Hub push), the logger hooks and the users' ``custom_hooks``, by priority."""
        cfg = self.cfg
        self.schedulers, self.warnings = [], []
        for section, builder, hook_cls in (("lr_config", build_lr_scheduler, LrUpdaterHook),
                                           ("momentum_config", build_momentum_scheduler, MomentumUpdaterHook)):
            section_cfg = getattr(cfg, section)
            if section_cfg is not None:
                by_epoch = bool(section_cfg.get("by_epoch", False))
                length = cfg.runner.max_epochs if by_epoch else self.max_iters
                self.schedulers.append(builder(section_cfg, self._optimizer, length))
                self.warnings += schedule_warnings(section_cfg, length, section, "epochs" if by_epoch else "iterations")
                self.register_hook(hook_cls(self.schedulers[-1], by_epoch))
        self.register_hook(OptimizerHook(self.accelerator, self.optimizer, self._params, self.log,
                                         cfg.optimizer_config.grad_clip, cfg.skip_nonfinite_steps,
                                         on_applied=self._optimizer_stepped))
        push = cfg.push_to_hub
        if cfg.checkpoint_config is not None:
            self.register_hook(CheckpointHook(self.checkpointer, cfg.checkpoint_config, cfg.checkpoints_by_epoch,
                                              export=push is not None and push.strategy == "checkpoint"))
        self.register_hook(IterTimerHook(self.log))
        if self.evaluator is not None:
            self.register_hook(EvalHook(self.evaluator, self.checkpointer, cfg.evaluation, self.by_epoch))
        self.register_hook(FinalExportHook(self.exporter, self.work_dir / FINAL_DIR, self.work_dir / RUN_INFO,
                                           self.run_info))
        if push is not None:  # seg_accel.hub registers it (the engine does not import the Hub code)
            self.register_hook(HOOKS.get("PushToHubHook", "push_to_hub")(push))
        for hook in logger_hooks:
            hook.attach(self.log)
            self.register_hook(hook)
        for i, hook_cfg in enumerate(cfg.custom_hooks):
            self.register_hook(self._build_hook(hook_cfg, f"custom_hooks.{i}"), hook_cfg.get("priority"))

    def _build_hook(self, cfg: dict, key: str) -> Hook:
        hook = HOOKS.build({k: v for k, v in cfg.items() if k != "priority"}, key)
        if hasattr(hook, "check_package"):
            hook.check_package()
        return hook

    def _resume(self, model: torch.nn.Module) -> None:
        self.resumed_from = self.checkpointer.restore(self.cfg.resume_from, self.cfg.auto_resume, model)

    def _build_train_loader(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.train_loader = build_train_loader(
            self.train_set, cfg.data.samples_per_gpu, cfg.data.workers_per_gpu, acc.process_index,
            acc.num_processes, cfg.seed, start=self.loop.samples, pin_memory=pin_memory(cfg, acc),
            shuffle=cfg.data.shuffle, buffer_size=cfg.data.shuffle_buffer_size, prefetch_factor=cfg.data.prefetch_factor,
        )
        stream = getattr(self.train_loader, "stream", None)
        self.epoch_log = EpochBookkeeping(acc.process_index, stream.plan if stream is not None else None)

    def release_work_dir(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def register_hook(self, hook: Hook, priority: int | str | None = None) -> None:
        """Insert by priority (the hook's own by default); equal priorities keep registration order."""
        self.hooks.register(hook, priority)

    def call_hook(self, point: str) -> None:
        self.hooks.call(point, self.runner)

    # ------------------------------------------------------------------ state
    def _optimizer_stepped(self) -> None:
        self.loop.optimizer_steps += 1

    iter, epoch = property(lambda self: self.loop.iter), property(lambda self: self.loop.epoch)  # read-only counters
    optimizer_steps, scheduled = property(lambda self: self.loop.optimizer_steps), property(lambda self: self.loop.scheduled)

    @property
    def run_info(self) -> Callable[[], dict[str, Any]]:
        """How the run was made (for ``run_info.json`` and the model card), as a call that holds
        the loop's counters, not the trainer."""
        return functools.partial(run_info, self.loop, self.accelerator, self.by_epoch, len(self.train_set))

    def train_mode(self) -> None:
        """``model.train()``, with BatchNorm kept in eval mode under ``model.norm_eval``."""
        self.model.train()
        if self.cfg.model.norm_eval:
            set_norm_eval(self.model)

    # ------------------------------------------------------------------ the loop
    def _batch(self, data_iter: Any) -> tuple[dict[str, torch.Tensor], float]:
        start = time.perf_counter()
        batch = next(data_iter)
        waited = time.perf_counter() - start
        self.epoch_log.update(batch)
        self.loop.samples += len(batch["indices"])
        batch = {k: v.to(self.accelerator.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
        if self.cfg.channels_last:
            batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
        return batch, waited

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The forward pass and every head's losses: (total to backpropagate, values to log)."""
        if self.objective is not None:
            return self.objective(self.model, batch, self.loop.iter)
        out = self.forward(self.model, batch["pixel_values"])
        total, logs = 0.0, {}
        for losses, logits in zip(self.head_losses, (out.logits, out.aux_logits)):
            loss, head_logs = losses(logits, batch["labels"])
            total, logs = total + loss, {**logs, **head_logs}
        return total, logs

    def train_iter(self, data_iter: Any) -> None:
        """One iteration: the schedules set this step's lr and momentum (``before_train_iter``),
        ``gradient_accumulation_steps`` micro-batches go forward and backward, then
        ``after_train_iter`` steps the optimizer (40), saves (50), evaluates (70) and logs (90)."""
        acc, accum = self.accelerator, self.cfg.gradient_accumulation_steps
        self.call_hook("before_train_iter")
        self.loop.scheduled = self.log.scheduled = scheduled_values(self.optimizer.param_groups, self.group_names,
                                                                    self.cfg.momentum_config is not None)
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
        self.loop.outputs = logs
        self.log.put_all({**logs, "data_time": data_time})
        self.loop.iter += 1
        self.call_hook("after_train_iter")

    def train(self) -> dict[str, Any] | None:
        """Run the workflow to ``max_iters`` (``max_epochs``); the end-of-run hooks evaluate,
        save and export ``final/``. Returns the last evaluation's results."""
        if self.resumed_from is not None:  # a resume at or past the end would only repeat the end
            check_not_finished(self.resumed_from, self.loop.iter, self.max_iters, self.cfg.runner.max_epochs, self.by_epoch)
        acc = self.accelerator
        data_iter = iter(self.train_loader)
        val_iter = itertools.chain.from_iterable(itertools.repeat(self.val_loader)) \
            if any(m == "val" for m, _ in self.cfg.workflow) else None
        self.loop.started = time.perf_counter()
        self.log.start(self.iter)
        if self.trackers:
            init_kwargs = {k: v for h in self.hooks if isinstance(h, LoggerHook) for k, v in h.tracker_kwargs().items()}
            acc.init_trackers(self.work_dir.name, config={"work_dir": str(self.work_dir)}, init_kwargs=init_kwargs)
        self.call_hook("before_run")
        with tqdm(total=self.max_iters, initial=self.iter, desc="train", disable=not acc.is_main_process,
                  dynamic_ncols=True, mininterval=1.0) as bar:
            for mode, count in workflow_phases(self.cfg.workflow, self.steps_per_epoch if self.by_epoch else 1,
                                               self.loop.iter):
                if mode == "train" and self.iter >= self.max_iters:
                    break  # as mmcv: a val phase after the last train phase still runs
                if mode == "val":
                    self.val_phase(val_iter, count * len(self.val_loader) if self.by_epoch else count)
                    continue
                self.call_hook("before_train_epoch")
                for remaining in range(count - 1, -1, -1):
                    if self.iter >= self.max_iters:
                        break
                    self.train_iter(data_iter)
                    bar.update(1)
                    if self.by_epoch and self.iter % self.steps_per_epoch == 0:
                        self.call_hook("after_train_epoch")
                        self.loop.epoch += 1
                        if remaining and self.iter < self.max_iters:
                            self.call_hook("before_train_epoch")
                if not self.by_epoch:
                    self.call_hook("after_train_epoch")
        self.epoch_log.finish()
        self.call_hook("after_run")
        acc.wait_for_everyone()  # no process is inside a collective when the group goes away
        acc.end_training()  # trackers finished, the process group destroyed (a clean exit under a launcher)
        self.release_work_dir()  # (a run that fails releases it when its process ends)
        return self.evaluator.latest if self.evaluator is not None else None

    @torch.no_grad()
    def val_phase(self, data_iter: Any, iterations: int) -> None:
        """A workflow ``val`` phase: the losses on the val data, no update."""
        self.call_hook("before_val_epoch")
        self.model.eval()
        meter = IntervalMeter()
        for _ in range(iterations):
            self.call_hook("before_val_iter")
            batch = {k: v.to(self.accelerator.device) for k, v in next(data_iter).items() if torch.is_tensor(v)}
            loss, logs = self.compute_losses(batch)
            meter.update({"loss": loss, **logs})
            self.call_hook("after_val_iter")
        averages = self.log.reduce_mean(meter.averages())
        self.log.emit({"mode": "val", "epoch": self.epoch + 1, "iter": self.iter, **averages})
        self.call_hook("after_val_epoch")
        self.train_mode()
