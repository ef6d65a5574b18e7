"""Learning-rate schedules (``lr_config``), SPEC section 3.

A policy gives ``lr(b, i)`` for a group whose initial lr is ``b`` at optimizer
step ``i``; ``LrScheduler`` applies it to every group before each step. We set
the lr from the closed-form formula instead of chaining torch schedulers so
every group follows the formula from its own initial lr exactly (lr_mult
carries through) and the state is one integer.
"""
from __future__ import annotations

from typing import Any

import torch

from seg_accel.errors import ConfigError
from seg_accel.registry import LR_POLICIES


@LR_POLICIES.register("poly")
class PolyPolicy:
    """``(b - min_lr) * (1 - i/T) ** power + min_lr``."""

    def __init__(self, max_iters: int, power: float = 1.0, min_lr: float = 0.0, by_epoch: bool = False):
        if power < 0:
            raise ConfigError(f"must be >= 0, got {power}", key="power")
        if min_lr < 0:
            raise ConfigError(f"must be >= 0, got {min_lr}", key="min_lr")
        self.max_iters = max_iters
        self.power = power
        self.min_lr = min_lr
        self.by_epoch = by_epoch

    def lr(self, base_lr: float, i: int) -> float:
        progress = min(i, self.max_iters) / self.max_iters
        return (base_lr - self.min_lr) * (1 - progress) ** self.power + self.min_lr


class LrScheduler:
    """Sets ``group['lr'] = policy.lr(group['initial_lr'], i)`` for the current step ``i``.

    Not passed to ``accelerator.prepare`` (a prepared scheduler steps once per
    process); ``step()`` is called once per optimizer step that was not skipped.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: Any):
        self.optimizer = optimizer
        self.policy = policy
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.last_iter = 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.policy.lr(group["initial_lr"], self.last_iter)

    def step(self) -> None:
        self.last_iter += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_iter": self.last_iter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_iter = int(state["last_iter"])
        self._apply()


class ConstantPolicy:
    """The lr stays at each group's initial value (no ``lr_config``)."""

    def lr(self, base_lr: float, i: int) -> float:
        return base_lr


def build_lr_scheduler(lr_cfg: dict | None, optimizer: torch.optim.Optimizer, max_iters: int) -> LrScheduler:
    policy = ConstantPolicy() if lr_cfg is None else LR_POLICIES.build(lr_cfg, "lr_config", max_iters=max_iters)
    return LrScheduler(optimizer, policy)
