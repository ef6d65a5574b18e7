"""Hooks: code the loop calls at fixed points, in priority order (docs/behaviour.md section 7).

A hook subclasses ``Hook`` and overrides any of the ten points, each called with a ``Runner``:
a read-only view of the run (counters, the accelerator, model, optimizer, run log,
checkpointer, evaluator, exporter), never the trainer itself. Lower priority runs first,
ties keep the order of registration. ``custom_hooks: [{type: MyHook, priority: NORMAL,
...}]`` builds user hooks (register them with ``@HOOKS.register()`` and load them with
``custom_imports``). A hook with ``state_dict``/``load_state_dict`` is saved in checkpoints.

The built-in hooks keep MMSegmentation's names and priorities, so users' hooks order
themselves against them as in mmcv (a hook at priority 30 sees the gradients before the
optimizer step at 40, one at 45 sees the stepped weights). Each built-in gets the
components it works with when it is made (the checkpointer, the evaluator, the exporter,
the run log) and depends on no other hook's priority.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seg_accel.config.schema import PRIORITIES, get_priority  # noqa: F401 (part of this module's API)
from seg_accel.engine.mmcv_helpers import MmcvHookHelpers
from seg_accel.errors import ConfigError, TrainingError
from seg_accel.runtime.checkpoints import checkpoint_age, saved_info
from seg_accel.runtime.storage import agree_on_write, write_text_atomic

if TYPE_CHECKING:
    from seg_accel.engine.checkpoint import Checkpointer
    from seg_accel.inference.evaluation import Evaluator
    from seg_accel.engine.export import Exporter
    from seg_accel.engine.loggers import RunLog
    from seg_accel.engine.runner import Runner

logger = logging.getLogger("seg_accel")

HOOK_POINTS = (
    "before_run", "before_train_epoch", "before_train_iter", "after_train_iter", "after_train_epoch",
    "before_val_epoch", "before_val_iter", "after_val_iter", "after_val_epoch", "after_run",
)


class Hook(MmcvHookHelpers):
    """Base class: every hook point is a no-op; ``priority`` orders hooks (lower first); mmcv's
    helpers (``every_n_iters``, ``end_of_epoch``, ...) answer as in mmcv."""

    priority: int | str = "NORMAL"
    priority_value: int = 50  # set from ``priority`` when the hook is registered

    def before_run(self, runner: Runner) -> None: ...
    def before_train_epoch(self, runner: Runner) -> None: ...
    def before_train_iter(self, runner: Runner) -> None: ...
    def after_train_iter(self, runner: Runner) -> None: ...
    def after_train_epoch(self, runner: Runner) -> None: ...
    def before_val_epoch(self, runner: Runner) -> None: ...
    def before_val_iter(self, runner: Runner) -> None: ...
    def after_val_iter(self, runner: Runner) -> None: ...
    def after_val_epoch(self, runner: Runner) -> None: ...
    def after_run(self, runner: Runner) -> None: ...

    @property
    def name(self) -> str:
        return type(self).__name__


class HookList:
    """Hooks in priority order; ``call(point, runner)`` runs one hook point."""

    def __init__(self) -> None:
        self._hooks: list[Hook] = []

    def register(self, hook: Hook, priority: int | str | None = None) -> Hook:
        """Insert by priority (the hook's own when not given); equal priorities keep registration order."""
        hook.priority_value = get_priority(hook.priority if priority is None else priority)
        index = len(self._hooks)
        while index > 0 and self._hooks[index - 1].priority_value > hook.priority_value:
            index -= 1
        self._hooks.insert(index, hook)
        return hook

    def call(self, point: str, runner: Runner) -> None:
        for hook in self._hooks:
            getattr(hook, point)(runner)

    def __iter__(self) -> Iterator[Hook]:
        return iter(self._hooks)

    def __len__(self) -> int:
        return len(self._hooks)

    def __getitem__(self, index: int) -> Hook:
        return self._hooks[index]

    def describe(self) -> str:
        """The order in which hooks run at each point (printed at start)."""
        lines = ["hooks (priority), in the order they run:"]
        for point in HOOK_POINTS:
            active = [h for h in self._hooks if getattr(type(h), point) is not getattr(Hook, point)]
            if active:
                lines.append(f"  {point}: " + ", ".join(f"{h.name} ({h.priority_value})" for h in active))
        return "\n".join(lines)


def every_n(count: int, n: int | None) -> bool:
    return bool(n) and count > 0 and count % n == 0


# --------------------------------------------------------------------------- schedules
class LrUpdaterHook(Hook):
    """Sets every group's lr before each iteration from ``lr_config`` (the step index is the
    number of optimizer steps applied, so a step skipped by fp16 does not advance it)."""

    priority = "VERY_HIGH"

    def __init__(self, scheduler: Any, by_epoch: bool = False):
        self.scheduler, self.by_epoch = scheduler, by_epoch

    def before_train_iter(self, runner: Runner) -> None:
        progress = runner.epoch if self.by_epoch else runner.optimizer_steps
        self.scheduler.apply(progress, runner.optimizer_steps)


class MomentumUpdaterHook(LrUpdaterHook):
    """Sets every group's momentum (or ``betas[0]``) before each iteration from ``momentum_config``."""

    priority = "HIGH"


# --------------------------------------------------------------------------- the optimizer step
class OptimizerHook(Hook):
    """After the iteration's micro-batches: clip (``grad_clip``, only with synced gradients),
    check the gradients are finite, step, zero. ``grad_norm`` (before clipping) goes to the log.
    Each applied step is reported to ``on_applied`` (the trainer counts its optimizer steps)."""

    priority = "ABOVE_NORMAL"

    def __init__(self, accelerator: Any, optimizer: Any, params: list[torch.nn.Parameter], log: RunLog,
                 grad_clip: Any = None, skip_nonfinite_steps: int = 0, on_applied: Callable[[], None] | None = None):
        self.accelerator, self.optimizer, self.params, self.log = accelerator, optimizer, params, log
        self.grad_clip, self.skip_nonfinite_steps = grad_clip, skip_nonfinite_steps
        self.on_applied = on_applied
        self.skipped = 0

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state["skipped"])

    def after_train_iter(self, runner: Runner) -> None:
        if self.step(runner.iter, runner.outputs) and self.on_applied is not None:
            self.on_applied()

    def step(self, iteration: int, outputs: dict[str, Any]) -> bool:
        """Clip, check, step; True when the optimizer applied the step."""
        acc, optimizer = self.accelerator, self.optimizer
        params = [p for p in self.params if p.grad is not None]
        if self.grad_clip is not None:
            norm = acc.clip_grad_norm_(params, self.grad_clip.max_norm, self.grad_clip.norm_type)
            self.log.put("grad_norm", norm)
        elif acc.scaler is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        else:
            norm = None  # fp16: the loss scaler finds and skips non-finite gradients itself
        # the gradients are the same on every process after DDP's all-reduce: so is this decision.
        # fp16: an overflow is the loss scaler's to skip (it lowers its scale), not an error
        if norm is not None and acc.scaler is None and not torch.isfinite(norm):
            self._nonfinite(iteration, outputs)
            return False
        scale = acc.scaler.get_scale() if acc.scaler is not None else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scale is not None and acc.scaler.get_scale() < scale:
            # the scaler skipped the step: a fused optimizer takes the step call and skips inside its
            # kernel, so Accelerate's step_was_skipped stays False; the lowered scale says it
            return False
        return not optimizer.step_was_skipped

    def _nonfinite(self, iteration: int, outputs: dict[str, Any]) -> None:
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in outputs.items()
                          if torch.is_tensor(v) and v.numel() == 1) or "none logged"
        where = f"iteration {iteration}"
        if self.skipped >= self.skip_nonfinite_steps:
            raise TrainingError(
                f"non-finite gradients at {where} (loss terms on this process: {terms}); nothing was saved over "
                f"the existing checkpoints. Lower the lr, clip gradients (optimizer_config.grad_clip), or allow "
                f"skipping with skip_nonfinite_steps (now {self.skip_nonfinite_steps}, used {self.skipped})"
            )
        self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        logger.warning("skipped %s: non-finite gradients (loss terms: %s); %d of %d skips used", where, terms,
                       self.skipped, self.skip_nonfinite_steps)


# --------------------------------------------------------------------------- timing
class IterTimerHook(Hook):
    """Iteration time (``time``) for the log; ``data_time`` is measured by the loop while fetching."""

    priority = "LOW"

    def __init__(self, log: RunLog):
        self.log = log
        self._last = time.perf_counter()

    def before_run(self, runner: Runner) -> None:
        self._last = time.perf_counter()

    def before_train_iter(self, runner: Runner) -> None:
        self._last = time.perf_counter()

    def after_train_iter(self, runner: Runner) -> None:
        self.log.put("time", time.perf_counter() - self._last)


# --------------------------------------------------------------------------- checkpoints
class CheckpointHook(Hook):
    """Saves full training state every ``interval`` iterations (or epochs, ``by_epoch``) and,
    with ``save_last``, at the end; keeps the newest ``max_keep_ckpts`` (-1: all)."""

    priority = "NORMAL"

    def __init__(self, checkpointer: Checkpointer, cfg: Any, by_epoch: bool, export: bool = False):
        self.checkpointer, self.cfg, self.by_epoch = checkpointer, cfg, by_epoch
        self.export = export  # also a save_pretrained export in <checkpoint>/pretrained (Hub pushes use it)
        self.last_saved: int | None = None

    def _save(self, runner: Runner, name: str, point: str) -> None:
        self.checkpointer.save(name, save_optimizer=self.cfg.save_optimizer, export=self.export, point=point)
        self.last_saved = runner.iter
        self.checkpointer.rotate(self.cfg.max_keep_ckpts)

    def after_train_iter(self, runner: Runner) -> None:
        if not self.by_epoch and every_n(runner.iter, self.cfg.interval):
            self._save(runner, f"iter_{runner.iter}", "after_train_iter")

    def after_train_epoch(self, runner: Runner) -> None:
        finished = runner.epoch + 1  # runner.epoch counts from 0 and moves on after this hook point
        if self.by_epoch and every_n(finished, self.cfg.interval):
            self._save(runner, f"epoch_{finished}", "after_train_epoch")

    def after_run(self, runner: Runner) -> None:
        if self.cfg.save_last and self.last_saved != runner.iter:
            self._save(runner, f"epoch_{runner.epoch}" if self.by_epoch else f"iter_{runner.iter}", "after_run")


# --------------------------------------------------------------------------- evaluation
LESS_IS_BETTER = ("loss",)


class EvalHook(Hook):
    """Evaluates on ``data.val`` every ``interval`` iterations (epochs with an epoch-based
    runner) and, with ``final``, at the end; with ``save_best`` keeps the best checkpoint as
    ``best_<metric>_iter_<n>`` with its export in ``pretrained/``.

    Whatever the priorities, an evaluation due at the point where a periodic checkpoint is
    written runs before it (the checkpointer asks), and a best checkpoint records itself as
    the best: a resume from any checkpoint knows the best score and folder of every
    evaluation up to it. Saving a new best removes every other ``best_<metric>_*`` folder,
    and a resume removes those its state has superseded (left by a run killed between the
    save of a best and the removal of the one before): at most one exists."""

    priority = "LOW"

    def __init__(self, evaluator: Evaluator, checkpointer: Checkpointer, cfg: Any, by_epoch: bool):
        self.evaluator, self.checkpointer, self.cfg, self.by_epoch = evaluator, checkpointer, cfg, by_epoch
        self.best_score: float | None = None
        self.best_dir: str | None = None
        self.key = cfg.best_key
        rule = cfg.rule or ("less" if self.key and any(w in self.key for w in LESS_IS_BETTER) else "greater")
        self.better = (lambda a, b: a > b) if rule == "greater" else (lambda a, b: a < b)
        self._runner: Runner | None = None
        self._done: tuple[str, int] | None = None  # (hook point, iteration) evaluated last
        checkpointer.before_save.append(self._before_checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_dir": self.best_dir}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_dir = state["best_score"], state["best_dir"]

    def _reconcile(self, iteration: int) -> None:
        """At the start of a run: the best checkpoints on disk up to ``iteration`` against the
        state. The newest of them is the best so far (each new best replaces the one before);
        it is adopted when the state missed it (a checkpoint written before the evaluation of
        its iteration by an older seg-accel), the others are removed. Those after
        ``iteration`` (a resume from an older checkpoint) are kept until a new best is saved."""
        if self.key is None:
            return
        found = self.checkpointer.best_checkpoints(self.key)
        upto = [p for p in found if checkpoint_age(p)[0] <= iteration]
        later = [p.name for p in found if checkpoint_age(p)[0] > iteration]
        if upto and upto[-1].name != self.best_dir:
            info = saved_info(upto[-1])
            known = next((p for p in upto if p.name == self.best_dir), None)
            if info.get("kind") == "best" and isinstance(info.get("score"), (int, float)) and \
                    (known is None or checkpoint_age(known) < checkpoint_age(upto[-1])):
                self.best_score, self.best_dir = float(info["score"]), upto[-1].name
        for path in upto:
            if path.name != self.best_dir:
                self.checkpointer.remove(path.name)
        if self.best_score is not None:
            logger.info("best %s so far: %.2f (%s)", self.key, self.best_score, self.best_dir)
        if later:
            logger.warning("best checkpoints from after iteration %d are kept until this run saves a new best: %s",
                           iteration, ", ".join(later))

    def _due(self, point: str, runner: Runner) -> int | None:
        """The epoch to report when an evaluation is due at ``point`` now, else None."""
        if point == "after_train_iter" and not self.by_epoch and every_n(runner.iter, self.cfg.interval):
            return runner.epoch
        if point == "after_train_epoch" and self.by_epoch and every_n(runner.epoch + 1, self.cfg.interval):
            return runner.epoch + 1
        if point == "after_run" and self.cfg.final:
            return runner.epoch
        return None

    def _run(self, point: str, runner: Runner) -> None:
        epoch = self._due(point, runner)
        if epoch is None or self._done == (point, runner.iter):
            return
        self._done = (point, runner.iter)
        self._evaluate(runner, epoch)

    def _before_checkpoint(self, point: str) -> None:
        if self._runner is not None:
            self._run(point, self._runner)

    def _evaluate(self, runner: Runner, epoch: int) -> None:
        results = self.evaluator.evaluate(runner.iter, epoch, self.cfg.metrics())
        if self.key is None or results is None:
            return
        if self.key not in results:
            raise ConfigError(f"save_best '{self.key}' is not among the results {sorted(results)}",
                              key="evaluation.save_best")
        score = float(results[self.key])
        if self.best_score is None or (not math.isnan(score) and self.better(score, self.best_score)):
            name = f"best_{self.key}_" + (f"epoch_{epoch}" if self.by_epoch else f"iter_{runner.iter}")
            before = self.best_score, self.best_dir
            self.best_score, self.best_dir = score, name  # the checkpoint records itself as the best
            try:
                self.checkpointer.save(name, save_optimizer=True, export=True,
                                       info={"kind": "best", "metric": self.key, "score": score})
            except BaseException:
                self.best_score, self.best_dir = before
                raise
            for old in self.checkpointer.best_checkpoints(self.key):
                if old.name != name:
                    self.checkpointer.remove(old.name)
            logger.info("best %s %.2f at %s: saved %s", self.key, score,
                        f"epoch {epoch}" if self.by_epoch else f"iter {runner.iter}", self.checkpointer.folder / name)

    def before_run(self, runner: Runner) -> None:
        self._runner = runner
        self._reconcile(runner.iter)

    def after_train_iter(self, runner: Runner) -> None:
        self._run("after_train_iter", runner)

    def after_train_epoch(self, runner: Runner) -> None:
        self._run("after_train_epoch", runner)

    def after_run(self, runner: Runner) -> None:
        self._run("after_run", runner)


# --------------------------------------------------------------------------- the final model
class FinalExportHook(Hook):
    """At the end: the export in ``<work_dir>/final`` (the model's family format and the image
    processor) with ``run_info.json`` (processes, device, time) beside it."""

    priority = 80

    def __init__(self, exporter: Exporter, folder: Path, info_file: Path, run_info: Callable[[], dict[str, Any]]):
        self.exporter, self.folder, self.info_file, self.run_info = exporter, folder, info_file, run_info

    def after_run(self, runner: Runner) -> None:
        self.exporter.export(self.folder, final=True)
        info, error = self.run_info(), None
        if self.exporter.accelerator.is_main_process:
            try:
                write_text_atomic(self.info_file, json.dumps(info, indent=2))
            except OSError as exc:
                error = exc
        agree_on_write(self.exporter.accelerator, error, f"the run information {self.info_file}")

