"""Hooks: code the runner calls at fixed points, in priority order (SPEC section 7).

A hook subclasses ``Hook`` and overrides any of the ten points; lower priority runs
first, ties keep the order of registration. ``custom_hooks: [{type: MyHook, priority:
NORMAL, ...}]`` builds user hooks (register them with ``@HOOKS.register()`` and load
them with ``custom_imports``). A hook with ``state_dict``/``load_state_dict`` is saved in
checkpoints.
"""
from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import torch

from seg_accel.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from seg_accel.engine.trainer import Trainer

logger = logging.getLogger("seg_accel")

PRIORITIES = {
    "HIGHEST": 0, "VERY_HIGH": 10, "HIGH": 30, "ABOVE_NORMAL": 40, "NORMAL": 50,
    "BELOW_NORMAL": 60, "LOW": 70, "VERY_LOW": 90, "LOWEST": 100,
}
HOOK_POINTS = (
    "before_run", "before_train_epoch", "before_train_iter", "after_train_iter", "after_train_epoch",
    "before_val_epoch", "before_val_iter", "after_val_iter", "after_val_epoch", "after_run",
)


def get_priority(value: int | str, key: str = "priority") -> int:
    if isinstance(value, str):
        if value.upper() not in PRIORITIES:
            raise ConfigError(f"unknown priority {value!r}; use one of {', '.join(PRIORITIES)} or 0-100", key=key)
        return PRIORITIES[value.upper()]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ConfigError(f"a priority is a name ({', '.join(PRIORITIES)}) or an integer 0-100, got {value!r}",
                          key=key)
    return value


class Hook:
    """Base class: every hook point is a no-op; ``priority`` orders hooks (lower first)."""

    priority: int | str = "NORMAL"
    priority_value: int = 50  # set from ``priority`` when the runner registers the hook

    def before_run(self, runner: Trainer) -> None: ...
    def before_train_epoch(self, runner: Trainer) -> None: ...
    def before_train_iter(self, runner: Trainer) -> None: ...
    def after_train_iter(self, runner: Trainer) -> None: ...
    def after_train_epoch(self, runner: Trainer) -> None: ...
    def before_val_epoch(self, runner: Trainer) -> None: ...
    def before_val_iter(self, runner: Trainer) -> None: ...
    def after_val_iter(self, runner: Trainer) -> None: ...
    def after_val_epoch(self, runner: Trainer) -> None: ...
    def after_run(self, runner: Trainer) -> None: ...

    @property
    def name(self) -> str:
        return type(self).__name__


def every_n(count: int, n: int) -> bool:
    return n > 0 and count > 0 and count % n == 0


# --------------------------------------------------------------------------- schedules
class LrUpdaterHook(Hook):
    """Sets every group's lr before each iteration from ``lr_config`` (the step index is the
    number of optimizer steps applied, so a step skipped by fp16 does not advance it)."""

    priority = "VERY_HIGH"

    def __init__(self, scheduler: Any, by_epoch: bool = False):
        self.scheduler, self.by_epoch = scheduler, by_epoch

    def before_train_iter(self, runner: Trainer) -> None:
        progress = runner.epoch if self.by_epoch else runner.optimizer_steps
        self.scheduler.apply(progress, runner.optimizer_steps)


class MomentumUpdaterHook(LrUpdaterHook):
    """Sets every group's momentum (or ``betas[0]``) before each iteration from ``momentum_config``."""

    priority = "HIGH"


# --------------------------------------------------------------------------- the optimizer step
class OptimizerHook(Hook):
    """After the iteration's micro-batches: clip (``grad_clip``), check the gradients are finite,
    step, zero. ``grad_norm`` (before clipping) goes to the log."""

    priority = "ABOVE_NORMAL"

    def __init__(self, grad_clip: Any = None, skip_nonfinite_steps: int = 0):
        self.grad_clip = grad_clip
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.skipped = 0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state["skipped"])

    def after_train_iter(self, runner: Trainer) -> None:
        acc, optimizer = runner.accelerator, runner.optimizer
        params = [p for p in runner.trainable_params if p.grad is not None]
        if self.grad_clip is not None:
            norm = acc.clip_grad_norm_(params, self.grad_clip.max_norm, self.grad_clip.norm_type)
            runner.log_buffer["grad_norm"] = norm
        elif acc.scaler is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        else:
            norm = None  # fp16: the loss scaler finds and skips non-finite gradients itself
        # the gradients are the same on every process after DDP's all-reduce: so is this decision
        if norm is not None and not torch.isfinite(norm):
            self._nonfinite(runner)
            return
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not optimizer.step_was_skipped:
            runner.optimizer_steps += 1

    def _nonfinite(self, runner: Trainer) -> None:
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in runner.outputs.items()
                          if torch.is_tensor(v) and v.numel() == 1) or "none logged"
        where = f"iteration {runner.iter}"
        if self.skipped >= self.skip_nonfinite_steps:
            raise TrainingError(
                f"non-finite gradients at {where} (loss terms on this process: {terms}); nothing was saved over "
                f"the existing checkpoints. Lower the lr, clip gradients (optimizer_config.grad_clip), or allow "
                f"skipping with skip_nonfinite_steps (now {self.skip_nonfinite_steps}, used {self.skipped})"
            )
        self.skipped += 1
        runner.optimizer.zero_grad(set_to_none=True)
        logger.warning("skipped %s: non-finite gradients (loss terms: %s); %d of %d skips used", where, terms,
                       self.skipped, self.skip_nonfinite_steps)


# --------------------------------------------------------------------------- timing
class IterTimerHook(Hook):
    """Iteration time (``time``) for the log; ``data_time`` is measured while fetching."""

    priority = "LOW"

    def before_run(self, runner: Trainer) -> None:
        import time

        self._clock = time.perf_counter
        self._last = self._clock()

    def before_train_iter(self, runner: Trainer) -> None:
        self._last = self._clock()

    def after_train_iter(self, runner: Trainer) -> None:
        runner.log_buffer["time"] = self._clock() - self._last


# --------------------------------------------------------------------------- checkpoints
class CheckpointHook(Hook):
    """Saves full training state every ``interval`` iterations (or epochs, ``by_epoch``) and,
    with ``save_last``, at the end; keeps the newest ``max_keep_ckpts`` (-1: all)."""

    priority = "NORMAL"

    def __init__(self, cfg: Any, export: bool = False):
        self.cfg = cfg
        self.export = export  # also a save_pretrained export in <checkpoint>/pretrained (Hub pushes use it)
        self.last_saved: int | None = None

    def _save(self, runner: Trainer, name: str) -> None:
        from seg_accel.engine.checkpoint import rotate, save_checkpoint

        path = runner.checkpoint_dir / name
        save_checkpoint(runner, path, save_optimizer=self.cfg.save_optimizer,
                        export=path / "pretrained" if self.export else None)
        self.last_saved = runner.iter
        if runner.accelerator.is_main_process:
            rotate(runner.checkpoint_dir, self.cfg.max_keep_ckpts)
        runner.accelerator.wait_for_everyone()

    def after_train_iter(self, runner: Trainer) -> None:
        if not self.cfg.by_epoch and every_n(runner.iter, self.cfg.interval):
            self._save(runner, f"iter_{runner.iter}")

    def after_train_epoch(self, runner: Trainer) -> None:
        finished = runner.epoch + 1  # runner.epoch counts from 0 and moves on after this hook point
        if self.cfg.by_epoch and every_n(finished, self.cfg.interval):
            self._save(runner, f"epoch_{finished}")

    def after_run(self, runner: Trainer) -> None:
        if self.cfg.save_last and self.last_saved != runner.iter:
            self._save(runner, f"epoch_{runner.epoch}" if self.cfg.by_epoch else f"iter_{runner.iter}")


# --------------------------------------------------------------------------- evaluation
LESS_IS_BETTER = ("loss",)


class EvalHook(Hook):
    """Evaluates on ``data.val`` every ``interval`` iterations (epochs with an epoch-based
    runner) and at the end; with ``save_best`` keeps the best checkpoint as
    ``best_<metric>_iter_<n>`` with its ``save_pretrained`` export in ``pretrained/``."""

    priority = "LOW"

    def __init__(self, cfg: Any, by_epoch: bool):
        self.cfg, self.by_epoch = cfg, by_epoch
        self.best_score: float | None = None
        self.best_dir: str | None = None
        self.last_iter: int | None = None
        key = cfg.save_best
        if key == "auto":
            key = "m" + ("IoU" if cfg.metrics()[0] == "mIoU" else cfg.metrics()[0][1:])
        self.key = key
        rule = cfg.rule or ("less" if key and any(w in key for w in LESS_IS_BETTER) else "greater")
        self.better = (lambda a, b: a > b) if rule == "greater" else (lambda a, b: a < b)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_dir": self.best_dir}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_dir = state["best_score"], state["best_dir"]

    def _evaluate(self, runner: Trainer, epoch: int | None = None) -> None:
        if self.last_iter == runner.iter:
            return
        self.last_iter = runner.iter
        self.epoch = runner.epoch if epoch is None else epoch
        results = runner.evaluate(self.cfg.metrics())
        if self.key is None:
            return
        if self.key not in results:
            raise ConfigError(f"save_best '{self.key}' is not among the results {sorted(results)}",
                              key="evaluation.save_best")
        score = float(results[self.key])
        if self.best_score is None or (not math.isnan(score) and self.better(score, self.best_score)):
            self._save_best(runner, score)

    def _save_best(self, runner: Trainer, score: float) -> None:
        from seg_accel.engine.checkpoint import remove_checkpoint, save_checkpoint

        name = f"best_{self.key}_{'epoch' if self.by_epoch else 'iter'}_{self.epoch if self.by_epoch else runner.iter}"
        previous = self.best_dir
        save_checkpoint(runner, runner.checkpoint_dir / name, save_optimizer=True,
                        export=runner.checkpoint_dir / name / "pretrained")
        self.best_score, self.best_dir = score, name
        if runner.accelerator.is_main_process:
            if previous and previous != name:
                remove_checkpoint(runner.checkpoint_dir / previous)
            logger.info("best %s %.2f at %s: saved %s", self.key, score,
                        f"epoch {self.epoch}" if self.by_epoch else f"iter {runner.iter}", runner.checkpoint_dir / name)
        runner.accelerator.wait_for_everyone()

    def after_train_iter(self, runner: Trainer) -> None:
        if not self.by_epoch and every_n(runner.iter, self.cfg.interval):
            self._evaluate(runner)

    def after_train_epoch(self, runner: Trainer) -> None:
        if self.by_epoch and every_n(runner.epoch + 1, self.cfg.interval):
            self._evaluate(runner, runner.epoch + 1)

    def after_run(self, runner: Trainer) -> None:
        self._evaluate(runner)


# --------------------------------------------------------------------------- the final model
class FinalExportHook(Hook):
    """At the end: the final evaluation (unless EvalHook ran one) and the ``save_pretrained`` export
    in ``<work_dir>/final`` with ``run_info.json`` (processes, device, time) beside it. Hooks
    with a lower priority (the Hub push) find the export there."""

    priority = 80

    def after_run(self, runner: Trainer) -> None:
        import json

        from seg_accel.engine.trainer import FINAL_DIR, RUN_INFO

        results = runner.last_results  # EvalHook evaluates at the end itself
        if results is None and runner.val_loader is not None:
            results = runner.evaluate()
        runner.final_results = results
        runner.export(runner.work_dir / FINAL_DIR)
        if runner.accelerator.is_main_process:
            (runner.work_dir / RUN_INFO).write_text(json.dumps(runner.run_info(), indent=2))


def describe_hooks(hooks: list[Hook]) -> str:
    """The order in which hooks run at each point (printed at start)."""
    lines = ["hooks (priority), in the order they run:"]
    for point in HOOK_POINTS:
        active = [h for h in hooks if getattr(type(h), point) is not getattr(Hook, point)]
        if active:
            lines.append(f"  {point}: " + ", ".join(f"{h.name} ({h.priority_value})" for h in active))
    return "\n".join(lines)
