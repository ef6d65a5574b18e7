"""Training: the loop, its hooks, the read-only view hooks get, checkpoints, the run log and the
exports (running a trained model is ``seg_accel.inference``).

``Trainer`` is imported on first use, so that a command that fails on its config
(``seg_accel.validate``) never loads the model libraries."""
from __future__ import annotations

from typing import Any

from seg_accel.runtime.workdir import CONFIG_FILE, EVAL_RESULTS, FINAL_DIR, RUN_INFO

__all__ = ["CONFIG_FILE", "EVAL_RESULTS", "FINAL_DIR", "RUN_INFO", "Trainer"]


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from seg_accel.engine.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'seg_accel.engine' has no attribute {name!r}")
