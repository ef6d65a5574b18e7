"""The run log and the logger hooks (``log_config.hooks``): text and JSON lines, TensorBoard,
Weights & Biases, MLflow.

``RunLog`` collects the values of each iteration (losses, ``time``, ``data_time``,
``grad_norm``); every ``log_config.interval`` iterations it averages them over the interval
and over all processes once, and hands the record to every logger hook attached to it;
evaluation records go the same way. TensorBoard, W&B and MLflow are Accelerate trackers
(main process only).
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seg_accel.engine.hooks import Hook
from seg_accel.errors import ConfigError
from seg_accel.registry import HOOKS
from seg_accel.runtime.storage import json_safe

if TYPE_CHECKING:
    from seg_accel.engine.runner import Runner

logger = logging.getLogger("seg_accel")

class IntervalMeter:
    """Sums scalars over a log interval; ``averages`` returns the interval means.

    Tensors stay on their device until ``averages`` (no device sync per iteration).
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def update(self, values: dict[str, float | torch.Tensor]) -> None:
        for key, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1

    def averages(self) -> dict[str, float]:
        return {k: float(self.sums[k]) / self.counts[k] for k in self.sums}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


PER_CLASS = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")  # per-class columns: the table shows them


def scheduled_values(groups: list[dict[str, Any]], group_names: list[str], momentum: bool) -> dict[str, float]:
    """The lr (first group, and each group by name when there are several) and, with a momentum
    schedule, the momentum this step uses."""
    values: dict[str, float] = {}
    if "lr" in groups[0]:
        values["lr"] = groups[0]["lr"]
        if len(groups) > 1:
            values.update({f"lr.{name}": g["lr"] for name, g in zip(group_names, groups)})
    if momentum:
        values["momentum"] = groups[0]["betas"][0] if "betas" in groups[0] else groups[0]["momentum"]
    return values


class RunLog:
    """Values of the current log interval and where records go (``attach``ed logger hooks)."""

    def __init__(self, accelerator: Any, work_dir: Path, json_path: Path, interval: int, max_iters: int,
                 by_epoch: bool, steps_per_epoch: int):
        self.accelerator, self.work_dir, self.json_path = accelerator, Path(work_dir), Path(json_path)
        self.interval, self.max_iters, self.by_epoch, self.steps_per_epoch = interval, max_iters, by_epoch, steps_per_epoch
        self.meter = IntervalMeter()
        self.scheduled: dict[str, float] = {}  # lr and momentum of the current iteration (not averaged)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._record: tuple[int, dict[str, Any] | None] | None = None
        self._started, self._start_iter = time.perf_counter(), 0

    def start(self, iteration: int) -> None:
        """Training (re)starts at ``iteration``: the ETA counts from here."""
        self._started, self._start_iter = time.perf_counter(), iteration

    def seconds_per_iter(self, iteration: int) -> float:
        return (time.perf_counter() - self._started) / max(iteration - self._start_iter, 1)

    def put(self, key: str, value: float | torch.Tensor) -> None:
        """A value of this iteration (a tensor stays on its device until the record is made)."""
        self.meter.update({key: value})

    def put_all(self, values: dict[str, float | torch.Tensor]) -> None:
        self.meter.update(values)

    def is_log_iter(self, iteration: int) -> bool:
        return iteration % self.interval == 0 or iteration == self.max_iters

    def train_record(self, iteration: int, epoch: int) -> dict[str, Any] | None:
        """At a log iteration: the interval's means over all processes (computed once however
        many logger hooks ask); otherwise None. Every process calls it at the same iterations."""
        if self._record is not None and self._record[0] == iteration:
            return self._record[1]
        record = None
        if self.is_log_iter(iteration):
            averages = self.meter.averages()
            self.meter.reset()
            keys = sorted(averages)
            values = torch.tensor([averages[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="mean")
            averages = dict(zip(keys, values.tolist()))
            record = {"mode": "train", "epoch": epoch + 1, "iter": iteration, **self.scheduled}
            record.update({k: averages.pop(k) for k in ("time", "data_time") if k in averages})
            if self.accelerator.device.type == "cuda":
                record["memory"] = torch.cuda.max_memory_allocated(self.accelerator.device) // 2**20
            record.update(averages)
        self._record = (iteration, record)
        return record

    def emit(self, record: dict[str, Any]) -> None:
        """Hand a record (an evaluation, a val phase) to every attached logger hook."""
        for listener in self.listeners:
            listener(record)

    def reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Means over all processes (the same keys on every process)."""
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            tensor = self.accelerator.reduce(tensor, reduction="mean")
        return dict(zip(keys, tensor.tolist()))


class LoggerHook(Hook):
    """Base of the logger hooks: ``log(record)`` for each train/val record of the ``RunLog``
    the trainer attaches it to. ``by_epoch`` (MMSegmentation's): log lines count iterations
    within the epoch (``Epoch [2][40/120]``) rather than overall (``Iter [280/1000]``); left
    out, as the runner counts."""

    priority = "VERY_LOW"
    tracker: str | None = None  # the Accelerate tracker this hook writes through

    def __init__(self, by_epoch: bool | None = None):
        self.by_epoch = by_epoch
        self.run_log: RunLog | None = None

    def attach(self, run_log: RunLog) -> None:
        self.run_log = run_log
        run_log.listeners.append(self.log)

    def log(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def after_train_iter(self, runner: Runner) -> None:
        record = self.run_log.train_record(runner.iter, runner.epoch)
        if record is not None:
            self.log(record)

    def tracker_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Accelerator.init_trackers(init_kwargs=...)``."""
        return {}


@HOOKS.register()
class TextLoggerHook(LoggerHook):
    """A console line per record and one JSON object a line in ``<work_dir>/<timestamp>.log.json``."""

    def log(self, record: dict[str, Any]) -> None:
        run = self.run_log
        if run.accelerator.is_main_process:
            with open(run.json_path, "a") as f:
                f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        if record["mode"] == "train":
            remaining = run.max_iters - record["iter"]
            parts = [f"lr: {record['lr']:.3e}"] if "lr" in record else []
            parts += [f"{k}: {v:.3e}" for k, v in record.items() if k.startswith(("lr.", "momentum"))]
            parts.append(f"eta: {format_eta(run.seconds_per_iter(record['iter']) * remaining)}")
            parts += [f"{k}: {record[k]:.3f}" for k in ("time", "data_time") if k in record]
            if "memory" in record:
                parts.append(f"memory: {record['memory']}")
            skip = {"mode", "iter", "epoch", "lr", "time", "data_time", "memory"}
            parts += [f"{k}: {v:.4f}" for k, v in record.items()
                      if k not in skip and not k.startswith(("lr.", "momentum")) and isinstance(v, float)]
            by_epoch = run.by_epoch if self.by_epoch is None else self.by_epoch
            if by_epoch:
                within = (record["iter"] - 1) % run.steps_per_epoch + 1
                where = f"Epoch [{record['epoch']}][{within}/{run.steps_per_epoch}]"
            else:
                where = f"Iter [{record['iter']}/{run.max_iters}]"
            logger.info("%s\t%s", where, ", ".join(parts))
        else:
            values = "  ".join(f"{k}: {v:.{2 if k[0] in 'am' and '.' not in k else 4}f}" for k, v in record.items()
                               if k not in ("mode", "iter", "epoch") and isinstance(v, float)
                               and not any(k.startswith(f"{c}.") for c in PER_CLASS))
            logger.info("Iter(%s) [%d]\t%s", record["mode"], record["iter"], values)


class TrackerLoggerHook(LoggerHook):
    """Scalars to an Accelerate tracker, keyed ``train/<name>`` and ``val/<name>``."""

    package: str = ""

    def check_package(self) -> None:
        if importlib.util.find_spec(self.package) is None:
            raise ConfigError(
                f"{type(self).__name__} needs the '{self.package}' package (pip install {self.package}); "
                "or remove it from log_config.hooks",
                key="log_config.hooks",
            )

    def log(self, record: dict[str, Any]) -> None:
        accelerator = self.run_log.accelerator
        if not accelerator.is_main_process:
            return
        values = {f"{record['mode']}/{k}": v for k, v in record.items()
                  if k not in ("mode", "iter", "epoch") and isinstance(v, (int, float))}
        accelerator.get_tracker(self.tracker, unwrap=False).log(values, step=record["iter"])


@HOOKS.register()
class TensorboardLoggerHook(TrackerLoggerHook):
    """TensorBoard event files in ``<work_dir>/tf_logs`` (or ``log_dir``)."""

    tracker, package = "tensorboard", "tensorboard"

    def __init__(self, log_dir: str | None = None, by_epoch: bool | None = None):
        super().__init__(by_epoch)
        self.log_dir = log_dir


@HOOKS.register()
class WandbLoggerHook(TrackerLoggerHook):
    """Weights & Biases; ``mode: offline`` writes locally without a network (sync later)."""

    tracker, package = "wandb", "wandb"

    def __init__(self, project: str | None = None, mode: str | None = None, init_kwargs: dict | None = None,
                 by_epoch: bool | None = None):
        super().__init__(by_epoch)
        self.project, self.mode, self.init_kwargs = project, mode, dict(init_kwargs or {})

    def tracker_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.init_kwargs)
        if self.mode is not None:
            kwargs["mode"] = self.mode
        kwargs.setdefault("dir", str(self.run_log.work_dir))
        return {"wandb": kwargs}


@HOOKS.register()
class MlflowLoggerHook(TrackerLoggerHook):
    """MLflow; without ``MLFLOW_TRACKING_URI`` the runs go to ``<work_dir>/mlruns`` (a local store);
    ``exp_name`` names the experiment (default: the work dir's name)."""

    tracker, package = "mlflow", "mlflow"

    def __init__(self, exp_name: str | None = None, tracking_uri: str | None = None, by_epoch: bool | None = None):
        super().__init__(by_epoch)
        self.exp_name, self.tracking_uri = exp_name, tracking_uri

    def tracker_kwargs(self) -> dict[str, Any]:
        run = self.run_log
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # a local file store needs no server (MLflow 3 asks for this opt-in)
            uri = Path(run.work_dir, "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if run.accelerator.is_main_process:
            import mlflow

            mlflow.set_tracking_uri(uri)
        if self.exp_name:  # Accelerate's MLflow tracker reads the experiment name from here first
            os.environ["MLFLOW_EXPERIMENT_NAME"] = self.exp_name
        return {"mlflow": {"run_name": run.work_dir.name}}


def tracker_project(hooks: list[Hook], work_dir: Path) -> tuple[list[str], str]:
    """The Accelerate trackers the logger hooks need, and the logging directory."""
    names = [h.tracker for h in hooks if isinstance(h, TrackerLoggerHook)]
    log_dir = next((h.log_dir for h in hooks if isinstance(h, TensorboardLoggerHook) and h.log_dir), None)
    return names, log_dir or str(work_dir / "tf_logs")
