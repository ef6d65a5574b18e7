"""The tutorial's custom hook (MMSegmentation's "customize runtime"), registered with seg-accel:
``custom_hooks.yaml`` imports this module with ``custom_imports``."""
from __future__ import annotations

from seg_accel.engine.hooks import Hook
from seg_accel.registry import HOOKS


@HOOKS.register()
class MyHook(Hook):
    """Logs, every ``a`` iterations, the learning rate of the first parameter group times ``b``
    (``my_hook.scaled_lr`` in the log)."""

    priority = "NORMAL"

    def __init__(self, a: int = 1, b: float = 1.0):
        if a < 1:
            raise ValueError(f"a must be >= 1, got {a}")
        self.a, self.b = a, b

    def after_train_iter(self, runner):
        if runner.iter % self.a == 0:
            runner.log.put("my_hook.scaled_lr", runner.optimizer.param_groups[0]["lr"] * self.b)
