"""The training loop's own state: its counters (``LoopState``, written by the loop alone), what a
checkpoint keeps of it with the hooks' states (``TrainingState``), and how the run was made
(``run_info``)."""
from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from seg_accel.runtime import workdir


@dataclass
class LoopState:
    """Counters of the loop, restored on resume. ``iter`` counts finished iterations (optimizer
    steps, or micro-batch groups whose step was skipped); ``optimizer_steps`` the steps the
    optimizer applied; ``samples`` what this process took from its data stream."""

    iter: int = 0
    epoch: int = 0
    optimizer_steps: int = 0
    samples: int = 0
    seconds_before: float = 0.0  # training time of the runs this one resumes
    started: float = field(default_factory=time.perf_counter)
    outputs: dict[str, Any] = field(default_factory=dict)  # this iteration's loss terms
    scheduled: dict[str, float] = field(default_factory=dict)  # this iteration's lr and momentum

    @property
    def train_seconds(self) -> float:
        """Wall time spent training, over every resumed run."""
        return self.seconds_before + time.perf_counter() - self.started


class TrainingState:
    """What a checkpoint holds of the trainer (``runner_state.json``): the loop's counters and the
    state of every hook that has ``state_dict``/``load_state_dict``, as JSON."""

    def __init__(self, loop: LoopState, hooks: Iterable[Any]):
        self.loop, self.hooks = loop, hooks

    def state_dict(self) -> dict[str, Any]:
        hooks = {}
        for hook in self.hooks:
            if hasattr(hook, "state_dict"):
                hooks[hook.name] = hook.state_dict()
                try:
                    json.dumps(hooks[hook.name])
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"hook {hook.name}: state_dict() must return JSON values (numbers, strings, "
                                    f"lists, mappings) to be checkpointed: {exc}") from exc
        loop = self.loop
        return {"iter": loop.iter, "epoch": loop.epoch, "optimizer_steps": loop.optimizer_steps,
                "samples": loop.samples, "train_seconds": loop.train_seconds, "hooks": hooks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loop = self.loop
        loop.iter, loop.epoch = int(state["iter"]), int(state["epoch"])
        loop.optimizer_steps, loop.samples = int(state["optimizer_steps"]), int(state["samples"])
        loop.seconds_before = float(state.get("train_seconds", 0.0))
        for hook in self.hooks:
            if hook.name in state["hooks"] and hasattr(hook, "load_state_dict"):
                hook.load_state_dict(state["hooks"][hook.name])


def epochs_done(loop: LoopState, by_epoch: bool, num_processes: int, dataset_size: int) -> float:
    """Passes over the training data: the epoch counter of an epoch-based run, else the samples
    every process took (each takes the same number) over the dataset's size."""
    if by_epoch:
        return loop.epoch
    return round(loop.samples * num_processes / max(dataset_size, 1), 3)


def run_info(loop: LoopState, accelerator: Any, by_epoch: bool, dataset_size: int) -> dict[str, Any]:
    """How the run was made (for ``run_info.json`` and the model card)."""
    acc = accelerator
    return {**workdir.library_versions(), "num_processes": acc.num_processes,
            "distributed_type": acc.distributed_type.value, "device": acc.device.type,
            "device_name": workdir.device_name(acc.device), "mixed_precision": acc.mixed_precision,
            "iterations": loop.iter, "epochs": epochs_done(loop, by_epoch, acc.num_processes, dataset_size),
            "optimizer_steps": loop.optimizer_steps, "samples": loop.samples * acc.num_processes,
            "train_seconds": round(loop.train_seconds, 1)}


def workflow_phases(workflow: Any, unit: int, iteration: int) -> Iterator[tuple[str, int]]:
    """The workflow as (mode, count) phases from ``iteration`` onwards (a resumed run picks up
    inside its cycle); ``unit``: iterations per train count (``steps_per_epoch`` by epoch, else 1)."""
    phases = [tuple(p) for p in workflow]
    per_cycle = sum(n for mode, n in phases if mode == "train") * unit
    done = iteration % per_cycle
    for mode, count in itertools.cycle(phases):
        if mode == "train":
            span = count * unit
            if done >= span:
                done -= span
                continue
            yield mode, span - done
            done = 0
        elif done == 0:
            yield mode, count
