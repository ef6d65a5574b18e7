"""What the trainer and the evaluate command build from a validated config before they run:
the Accelerator, the evaluation data and inference settings, the start-up summary."""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from seg_accel.config.schema import TrainConfig
from seg_accel.data import build_dataset, build_val_loader
from seg_accel.engine.inference import DEFAULT_AUG_RATIOS, Inferencer
from seg_accel.errors import ConfigError

if TYPE_CHECKING:
    from seg_accel.engine.trainer import Trainer

logger = logging.getLogger("seg_accel")


def multi_process_without_accelerator() -> bool:
    """Launched as several processes on a machine with no GPU: Accelerate would start
    independent single-process runs unless told to use the CPU (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())


def build_accelerator(cfg: TrainConfig, trackers: list[str] | None = None, tracker_dir: str | None = None,
                      training: bool = True) -> tuple[Any, Any]:
    """The Accelerator for ``cfg`` and its DDP kwargs handler (whose ``find_unused_parameters``
    is decided once the model is built, before ``prepare``)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    ddp_kwargs = DistributedDataParallelKwargs()
    handlers: list[Any] = [ddp_kwargs]
    if cfg.dist_timeout is not None:
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=cfg.dist_timeout)))
    kwargs: dict[str, Any] = {"gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                              "step_scheduler_with_optimizer": False, "log_with": trackers or None,
                              "project_dir": tracker_dir} if training else {}
    if training and cfg.compile is not None:
        from accelerate.utils import TorchDynamoPlugin

        kwargs["dynamo_plugin"] = TorchDynamoPlugin(backend=cfg.compile.backend, mode=cfg.compile.mode,
                                                    fullgraph=cfg.compile.fullgraph, dynamic=cfg.compile.dynamic)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=multi_process_without_accelerator(),
                              kwargs_handlers=handlers, **kwargs)
    return accelerator, ddp_kwargs


def build_eval_loader(cfg: TrainConfig, split: str, accelerator: Any) -> tuple[Any, Any]:
    """(dataset, this process's loader) of ``data.<split>`` in test mode (original labels)."""
    dataset = build_dataset(getattr(cfg.data, split), f"data.{split}", cfg.ignore_index, cfg.data.skip_bad_samples)
    dataset.test_mode = True
    batch, workers = cfg.data.loader(split)
    loader = build_val_loader(dataset, batch, workers, accelerator.process_index, accelerator.num_processes,
                              pin_memory=pin_memory(cfg, accelerator), persistent_workers=cfg.data.persistent_workers,
                              prefetch_factor=cfg.data.prefetch_factor, device_type=accelerator.device.type)
    return dataset, loader


def pin_memory(cfg: TrainConfig, accelerator: Any) -> bool:
    return accelerator.device.type == "cuda" if cfg.data.pin_memory is None else cfg.data.pin_memory


def build_inferencer(cfg: TrainConfig, accelerator: Any, aug_test: bool = False) -> Inferencer:
    """``model.test_cfg`` (whole / slide, scales, flip); ``aug_test``: MMSegmentation's six ratios
    and flip unless the config names its own."""
    test_cfg = cfg.model.test_cfg
    if aug_test:
        test_cfg = dataclasses.replace(test_cfg, img_ratios=test_cfg.img_ratios or list(DEFAULT_AUG_RATIOS), flip=True)
    head = cfg.model.decode_head
    return Inferencer(test_cfg, head.align_corners, accelerator.autocast, head.threshold)


def check_split(cfg: TrainConfig) -> str:
    """The split the evaluate command scores: ``test``, else ``val``."""
    split = "test" if cfg.data.test is not None else "val"
    if getattr(cfg.data, split) is None:
        raise ConfigError("nothing to evaluate on: set data.test or data.val", key="data")
    return split


def describe_run(trainer: Trainer, model: torch.nn.Module, group_table: str, notes: list[str]) -> None:
    """The start-up summary: versions, processes, model, data, batch, settings, groups, hooks."""
    from seg_accel import __version__
    from seg_accel.models.builder import batch_norm_layers

    acc, cfg = trainer.accelerator, trainer.cfg
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_step = cfg.data.samples_per_gpu * acc.num_processes * cfg.gradient_accumulation_steps
    logger.info("seg-accel %s | %d process(es), %s on %s | mixed precision %s | work dir %s", __version__,
                acc.num_processes, acc.distributed_type.value, acc.device, acc.mixed_precision, trainer.work_dir)
    logger.info("model %s: %.2fM parameters (%.2fM trainable), %d classes: %s", type(model).__name__, n_params / 1e6,
                n_train / 1e6, len(cfg.classes), ", ".join(cfg.classes))
    val = trainer.val_set
    logger.info("data: train %s (%d samples)%s | batch %d per process x %d processes x %d accumulation = %d per step",
                type(trainer.train_set).__name__, len(trainer.train_set),
                f", val {type(val).__name__} ({len(val)} samples)" if val is not None else "",
                cfg.data.samples_per_gpu, acc.num_processes, cfg.gradient_accumulation_steps, per_step)
    if trainer.by_epoch:
        logger.info("runner: %d epochs of %d iterations", cfg.runner.max_epochs, trainer.steps_per_epoch)
    if acc.mixed_precision == "fp16" and acc.device.type == "cpu":
        logger.warning("fp16 mixed precision needs a GPU; on the CPU Accelerate trains in fp32 (bf16 works on CPUs)")
    if getattr(trainer.train_set, "streaming", False):
        from seg_accel.data.streaming import describe_plan

        logger.info("%s", describe_plan(trainer.train_loader.stream, trainer.train_loader.loader.num_workers))
    logged_only = [name for losses in trainer.head_losses for name in losses.logged_only()]
    if logged_only:
        logger.info("logged, not trained on (name does not start with 'loss_'): %s", ", ".join(logged_only))
    if trainer.ddp_kwargs.find_unused_parameters and acc.num_processes > 1:
        logger.info("DDP find_unused_parameters: true")
    for note in notes:
        logger.info("%s", note)
    requested = [name for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))
                 if os.environ.get(env, "false").lower() in ("1", "true")]
    if requested and not trainer.exporter.sharded and acc.is_main_process:
        logger.warning("the launch config asks for %s, which runs on GPUs only: this %s run is %s instead (every "
                       "process holds the whole model)", requested[0], acc.device.type, acc.distributed_type.value)
    if cfg.model.norm_eval:
        logger.info("model.norm_eval: %d BatchNorm layer(s) normalise with their running statistics (not updated)",
                    len(batch_norm_layers(model)))
    if cfg.dist_timeout is not None and acc.num_processes > 1:
        logger.info("dist_timeout: a collective operation fails after %g s without the other processes",
                    cfg.dist_timeout)
    logger.info("%s", group_table)
    logger.info("%s", trainer.hooks.describe())


def quiet_libraries(is_main: bool) -> None:
    """Library warnings once, from the main process only."""
    import transformers

    if is_main:
        transformers.logging.set_verbosity_warning()
    else:
        transformers.logging.set_verbosity_error()
