"""The start-up summary of a training run: versions, processes, model, data, batch, settings,
parameter groups and the hook order."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seg_accel.models.builder import batch_norm_layers
from seg_accel.version import __version__

if TYPE_CHECKING:
    from seg_accel.config.schema import TrainConfig
    from seg_accel.engine.hooks import HookList

logger = logging.getLogger("seg_accel")


def describe_run(cfg: TrainConfig, accelerator: Any, work_dir: Path, model: torch.nn.Module, train_set: Any,
                 val_set: Any, train_loader: Any, head_losses: list[Any], steps_per_epoch: int, sharded: bool,
                 find_unused: bool, group_table: str, hooks: HookList, notes: list[str],
                 warnings: list[str] = ()) -> None:
    """The start-up summary: versions, processes, model, data, batch, settings, groups, hooks."""
    acc = accelerator
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_step = cfg.data.samples_per_gpu * acc.num_processes * cfg.gradient_accumulation_steps
    logger.info("seg-accel %s | %d process(es), %s on %s | mixed precision %s | work dir %s", __version__,
                acc.num_processes, acc.distributed_type.value, acc.device, acc.mixed_precision, work_dir)
    logger.info("model %s: %.2fM parameters (%.2fM trainable), %d classes: %s", type(model).__name__, n_params / 1e6,
                n_train / 1e6, len(cfg.classes), ", ".join(cfg.classes))
    val = val_set
    logger.info("data: train %s (%d samples)%s | batch %d per process x %d processes x %d accumulation = %d per step",
                type(train_set).__name__, len(train_set),
                f", val {type(val).__name__} ({len(val)} samples)" if val is not None else "",
                cfg.data.samples_per_gpu, acc.num_processes, cfg.gradient_accumulation_steps, per_step)
    if cfg.runner.by_epoch:
        logger.info("runner: %d epochs of %d iterations", cfg.runner.max_epochs, steps_per_epoch)
    if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
        logger.warning("fp16 mixed precision needs a GPU; on the CPU Accelerate trains in fp32 (bf16 works on CPUs)")
    if getattr(train_set, "streaming", False):
        from seg_accel.data.streaming import describe_plan

        logger.info("%s", describe_plan(train_loader.stream, train_loader.loader.num_workers))
    logged_only = [name for losses in head_losses for name in losses.logged_only()]
    if logged_only:
        logger.info("logged, not trained on (name does not start with 'loss_'): %s", ", ".join(logged_only))
    if find_unused and acc.num_processes > 1:
        logger.info("DDP find_unused_parameters: true")
    for note in notes:
        logger.info("%s", note)
    requested = [name for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))
                 if os.environ.get(env, "false").lower() in ("1", "true")]
    if requested and not sharded and acc.is_main_process:
        logger.warning("the launch config asks for %s, which runs on GPUs only: this %s run is %s instead (every "
                       "process holds the whole model)", requested[0], acc.device.type, acc.distributed_type.value)
    if cfg.model.norm_eval:
        logger.info("model.norm_eval: %d BatchNorm layer(s) normalise with their running statistics (not updated)",
                    len(batch_norm_layers(model)))
    if cfg.dist_timeout is not None and acc.num_processes > 1:
        logger.info("dist_timeout: a collective operation fails after %g s without the other processes",
                    cfg.dist_timeout)
    logger.info("%s", group_table)
    logger.info("%s", hooks.describe())
    for warning in warnings if acc.is_main_process else ():
        logger.warning("%s", warning)
