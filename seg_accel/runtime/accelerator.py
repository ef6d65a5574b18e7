"""The Accelerator every command runs on (training, evaluation, prediction), and the settings
that follow from it (pinned memory, the libraries' log levels)."""
from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch

from seg_accel.config.schema import TrainConfig

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


def pin_memory(cfg: TrainConfig, accelerator: Any) -> bool:
    return accelerator.device.type == "cuda" if cfg.data.pin_memory is None else cfg.data.pin_memory


def quiet_libraries(is_main: bool) -> None:
    """Library warnings once, from the main process only."""
    import transformers

    if is_main:
        transformers.logging.set_verbosity_warning()
    else:
        transformers.logging.set_verbosity_error()
