"""What a hook sees of a training run: a read-only view, never the trainer (docs/components.md)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seg_accel.engine.checkpoint import Checkpointer
    from seg_accel.engine.export import Exporter
    from seg_accel.engine.hooks import Hook, HookList
    from seg_accel.engine.loggers import RunLog
    from seg_accel.engine.state import LoopState
    from seg_accel.inference.evaluation import Evaluator


class Runner:
    """What every hook point is called with: the run's counters (read from the loop's state, which
    only the loop writes) and the components the trainer built. Nothing on it can be set."""

    __slots__ = ("_loop", "_hooks", "_run_info", "_accelerator", "_model", "_optimizer", "_log", "_checkpointer",
                 "_evaluator", "_exporter", "_work_dir", "_checkpoint_dir", "_max_iters", "_max_epochs", "_by_epoch",
                 "_steps_per_epoch")

    def __init__(self, loop: LoopState, hooks: HookList, run_info: Callable[[], dict[str, Any]], *, accelerator: Any,
                 model: Any, optimizer: Any, log: RunLog, checkpointer: Checkpointer, evaluator: Evaluator | None,
                 exporter: Exporter, work_dir: Path, checkpoint_dir: Path, max_iters: int, max_epochs: int | None,
                 by_epoch: bool, steps_per_epoch: int = 1):
        for name, value in locals().items():
            if name not in ("self", "__class__"):
                object.__setattr__(self, f"_{name}", value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a hook's runner is read-only: '{name}' cannot be set (the loop keeps its own state; "
                             "a hook keeps its own values on itself)")

    # the loop's counters and this iteration's values
    iter = property(lambda self: self._loop.iter, doc="finished iterations")
    epoch = property(lambda self: self._loop.epoch, doc="the epoch, from 0")
    optimizer_steps = property(lambda self: self._loop.optimizer_steps, doc="steps the optimizer applied")
    outputs = property(lambda self: self._loop.outputs, doc="this iteration's loss terms")
    scheduled = property(lambda self: self._loop.scheduled, doc="this iteration's lr and momentum")
    # the run
    max_iters = property(lambda self: self._max_iters)
    max_epochs = property(lambda self: self._max_epochs if self._by_epoch else None,
                          doc="None for an iteration-based run")
    by_epoch = property(lambda self: self._by_epoch)
    steps_per_epoch = property(lambda self: self._steps_per_epoch, doc="iterations of one pass over the data")
    inner_iter = property(lambda self: self._loop.iter - self._loop.epoch * self._steps_per_epoch if self._by_epoch
                          else self._loop.iter, doc="iterations finished in this epoch (epoch-based runs)")
    work_dir = property(lambda self: self._work_dir)
    checkpoint_dir = property(lambda self: self._checkpoint_dir)
    # the components
    accelerator = property(lambda self: self._accelerator)
    model = property(lambda self: self._model, doc="prepared: DDP-wrapped on several processes")
    optimizer = property(lambda self: self._optimizer)
    log = property(lambda self: self._log, doc="log.put(name, value) adds a value to the interval's record")
    checkpointer = property(lambda self: self._checkpointer)
    evaluator = property(lambda self: self._evaluator, doc="None without evaluation")
    exporter = property(lambda self: self._exporter)

    @property
    def hooks(self) -> tuple[Hook, ...]:
        """Every registered hook, in the order they run."""
        return tuple(self._hooks)

    def run_info(self) -> dict[str, Any]:
        """How the run was made (versions, processes, device, iterations, time)."""
        return self._run_info()
