"""What a hook sees of a training run: a read-only view, never the trainer (docs/components.md)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from seg_accel.engine.state import LoopState


class Runner:
    """What a hook sees of the training run, read-only (the loop alone writes its counters).

    ``iter`` (finished iterations), ``epoch`` (from 0), ``optimizer_steps``, ``max_iters``,
    ``max_epochs`` (None for an iteration-based run), ``by_epoch``, ``outputs`` (this
    iteration's loss terms), ``scheduled`` (its lr and momentum), ``accelerator``, ``model``
    (prepared: DDP-wrapped on several processes), ``optimizer``, ``log`` (``log.put(name,
    value)`` adds a value to the interval's record), ``checkpointer``, ``evaluator`` (None
    without evaluation), ``exporter``, ``hooks`` (every registered hook, in order),
    ``work_dir``, ``checkpoint_dir`` and ``run_info()`` (how the run was made)."""

    __slots__ = ("_loop", "_parts")

    def __init__(self, loop: LoopState, **parts: Any):
        object.__setattr__(self, "_loop", loop)
        object.__setattr__(self, "_parts", parts)

    def __getattr__(self, name: str) -> Any:
        parts = object.__getattribute__(self, "_parts")
        if name in parts and not name.startswith("_"):
            return parts[name]
        if name in _LOOP_FIELDS:
            return getattr(object.__getattribute__(self, "_loop"), name)
        raise AttributeError(f"a hook's runner has no '{name}' (it has: {', '.join(dir(self))})")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a hook's runner is read-only: '{name}' cannot be set (the loop keeps its own state; "
                             "a hook keeps its own values on itself)")

    @property
    def hooks(self) -> tuple[Any, ...]:
        return tuple(object.__getattribute__(self, "_parts")["_hooks"])

    def __dir__(self) -> list[str]:
        parts = object.__getattribute__(self, "_parts")
        return sorted([*_LOOP_FIELDS, *(k for k in parts if not k.startswith("_")), "hooks"])


_LOOP_FIELDS = ("iter", "epoch", "optimizer_steps", "outputs", "scheduled")
