"""Logger hooks (``log_config.hooks``): text and JSON lines, TensorBoard, Weights & Biases, MLflow.

Every ``log_config.interval`` iterations the runner reduces the interval's means over all
processes once and hands the record to every logger hook; evaluation results go the
same way. TensorBoard, W&B and MLflow are Accelerate trackers (main process only).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seg_accel.engine.hooks import Hook
from seg_accel.engine.log import format_eta
from seg_accel.errors import ConfigError
from seg_accel.registry import HOOKS

if TYPE_CHECKING:
    from seg_accel.engine.trainer import Trainer

logger = logging.getLogger("seg_accel")

PER_CLASS = ("IoU", "Acc", "Dice", "Fscore", "Precision", "Recall")  # per-class columns: the table shows them


class LoggerHook(Hook):
    """Base of the logger hooks: ``log(runner, record)`` for each train/val record."""

    priority = "VERY_LOW"
    tracker: str | None = None  # the Accelerate tracker this hook writes through

    def __init__(self, by_epoch: bool = False):
        self.by_epoch = by_epoch  # accepted as in MMSegmentation configs; records carry both iter and epoch

    def log(self, runner: Trainer, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def after_train_iter(self, runner: Trainer) -> None:
        record = runner.interval_record()
        if record is not None:
            self.log(runner, record)

    def tracker_kwargs(self, runner: Trainer) -> dict[str, Any]:
        """Keyword arguments for ``Accelerator.init_trackers(init_kwargs=...)``."""
        return {}


@HOOKS.register()
class TextLoggerHook(LoggerHook):
    """A console line per record and one JSON object a line in ``<work_dir>/<timestamp>.log.json``."""

    def log(self, runner: Trainer, record: dict[str, Any]) -> None:
        if runner.accelerator.is_main_process:
            with open(runner.json_log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if record["mode"] == "train":
            remaining = runner.max_iters - record["iter"]
            parts = [f"lr: {record['lr']:.3e}"] if "lr" in record else []
            parts += [f"{k}: {v:.3e}" for k, v in record.items() if k.startswith(("lr.", "momentum"))]
            parts.append(f"eta: {format_eta(runner.seconds_per_iter() * remaining)}")
            parts += [f"{k}: {record[k]:.3f}" for k in ("time", "data_time") if k in record]
            if "memory" in record:
                parts.append(f"memory: {record['memory']}")
            skip = {"mode", "iter", "epoch", "lr", "time", "data_time", "memory"}
            parts += [f"{k}: {v:.4f}" for k, v in record.items()
                      if k not in skip and not k.startswith(("lr.", "momentum")) and isinstance(v, float)]
            where = (f"Epoch [{record['epoch']}][{record['iter']}/{runner.max_iters}]" if runner.by_epoch
                     else f"Iter [{record['iter']}/{runner.max_iters}]")
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

    def log(self, runner: Trainer, record: dict[str, Any]) -> None:
        if not runner.accelerator.is_main_process:
            return
        values = {f"{record['mode']}/{k}": v for k, v in record.items()
                  if k not in ("mode", "iter", "epoch") and isinstance(v, (int, float))}
        runner.accelerator.get_tracker(self.tracker, unwrap=False).log(values, step=record["iter"])


@HOOKS.register()
class TensorboardLoggerHook(TrackerLoggerHook):
    """TensorBoard event files in ``<work_dir>/tf_logs`` (or ``log_dir``)."""

    tracker, package = "tensorboard", "tensorboard"

    def __init__(self, log_dir: str | None = None, by_epoch: bool = False):
        super().__init__(by_epoch)
        self.log_dir = log_dir


@HOOKS.register()
class WandbLoggerHook(TrackerLoggerHook):
    """Weights & Biases; ``mode: offline`` writes locally without a network (sync later)."""

    tracker, package = "wandb", "wandb"

    def __init__(self, project: str | None = None, mode: str | None = None, init_kwargs: dict | None = None,
                 by_epoch: bool = False):
        super().__init__(by_epoch)
        self.project, self.mode, self.init_kwargs = project, mode, dict(init_kwargs or {})

    def tracker_kwargs(self, runner: Trainer) -> dict[str, Any]:
        kwargs = dict(self.init_kwargs)
        if self.mode is not None:
            kwargs["mode"] = self.mode
        kwargs.setdefault("dir", str(runner.work_dir))
        return {"wandb": kwargs}


@HOOKS.register()
class MlflowLoggerHook(TrackerLoggerHook):
    """MLflow; without ``MLFLOW_TRACKING_URI`` the runs go to ``<work_dir>/mlruns`` (a local store);
    ``exp_name`` names the experiment (default: the work dir's name)."""

    tracker, package = "mlflow", "mlflow"

    def __init__(self, exp_name: str | None = None, tracking_uri: str | None = None, by_epoch: bool = False):
        super().__init__(by_epoch)
        self.exp_name, self.tracking_uri = exp_name, tracking_uri

    def tracker_kwargs(self, runner: Trainer) -> dict[str, Any]:
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # a local file store needs no server (MLflow 3 asks for this opt-in)
            uri = Path(runner.work_dir, "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if runner.accelerator.is_main_process:
            import mlflow

            mlflow.set_tracking_uri(uri)
        if self.exp_name:  # Accelerate's MLflow tracker reads the experiment name from here first
            os.environ["MLFLOW_EXPERIMENT_NAME"] = self.exp_name
        return {"mlflow": {"run_name": Path(runner.work_dir).name}}


def tracker_project(hooks: list[Hook], work_dir: Path) -> tuple[list[str], str]:
    """The Accelerate trackers the logger hooks need, and the logging directory."""
    names = [h.tracker for h in hooks if isinstance(h, TrackerLoggerHook)]
    log_dir = next((h.log_dir for h in hooks if isinstance(h, TensorboardLoggerHook) and h.log_dir), None)
    return names, log_dir or str(work_dir / "tf_logs")
