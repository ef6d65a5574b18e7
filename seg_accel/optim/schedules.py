"""Learning-rate and momentum schedules (``lr_config``, ``momentum_config``), docs/behaviour.md section 3.

A policy gives ``value(b, i)``: the lr (or momentum) of a parameter group whose
initial value is ``b`` at optimizer step ``i`` (0-based; ``T = runner.max_iters``).
Warmup multiplies the policy's value for ``i < warmup_iters`` (mmcv semantics).
``ParamScheduler`` writes the values into every group before each step.

Why not torch.optim.lr_scheduler: its chainable schedulers accumulate rounding,
cannot express mmcv's warmup-times-decay, ``min_lr`` clamps, per-group
``min_lr_ratio`` or mmcv's cyclic phases, and it has no momentum schedules; the
closed forms here match docs/behaviour.md section 3 exactly for every group.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch

from seg_accel.config.types import parse_section
from seg_accel.errors import ConfigError
from seg_accel.registry import LR_POLICIES, MOMENTUM_POLICIES

WARMUP_KEYS = ("warmup", "warmup_iters", "warmup_ratio")


# --------------------------------------------------------------------------- policies
@LR_POLICIES.register("fixed")
@LR_POLICIES.register("constant")
class FixedPolicy:
    """The value stays at each group's initial value."""

    def __init__(self, max_iters: int, by_epoch: bool = False):
        self.by_epoch = by_epoch

    def value(self, base: float, i: int) -> float:
        return base


@LR_POLICIES.register("poly")
class PolyPolicy:
    """``(b - min_lr) * (1 - i/T) ** power + min_lr``."""

    def __init__(self, max_iters: int, power: float = 1.0, min_lr: float = 0.0, by_epoch: bool = False):
        if power < 0:
            raise ConfigError(f"must be >= 0, got {power}", key="power")
        if min_lr < 0:
            raise ConfigError(f"must be >= 0, got {min_lr}", key="min_lr")
        self.max_iters, self.power, self.min_lr, self.by_epoch = max_iters, power, min_lr, by_epoch

    def value(self, base: float, i: int) -> float:
        progress = min(i, self.max_iters) / self.max_iters
        return (base - self.min_lr) * (1 - progress) ** self.power + self.min_lr


@LR_POLICIES.register("step")
class StepPolicy:
    """``b * gamma ** k``: ``k`` milestones of ``step`` (a list) passed, or ``i // step`` (an int);
    then at least ``min_lr`` if given."""

    def __init__(
        self,
        max_iters: int,
        step: int | list[int],
        gamma: float = 0.1,
        min_lr: float | None = None,
        by_epoch: bool = False,
    ):
        if isinstance(step, int):
            if step <= 0:
                raise ConfigError(f"must be a positive integer or a list of them, got {step}", key="step")
        elif not step or any(s <= 0 for s in step) or list(step) != sorted(step):
            raise ConfigError(f"milestones must be positive and increasing, got {step}", key="step")
        if gamma <= 0:
            raise ConfigError(f"must be > 0, got {gamma}", key="gamma")
        self.step, self.gamma, self.min_lr, self.by_epoch = step, gamma, min_lr, by_epoch

    def value(self, base: float, i: int) -> float:
        k = i // self.step if isinstance(self.step, int) else sum(1 for m in self.step if i >= m)
        lr = base * self.gamma**k
        return max(lr, self.min_lr) if self.min_lr is not None else lr


@LR_POLICIES.register("CosineAnnealing")
class CosineAnnealingPolicy:
    """``t + 0.5 * (b - t) * (1 + cos(pi * i/T))`` with ``t = min_lr`` or ``b * min_lr_ratio``."""

    def __init__(
        self,
        max_iters: int,
        min_lr: float | None = None,
        min_lr_ratio: float | None = None,
        by_epoch: bool = False,
    ):
        if (min_lr is None) == (min_lr_ratio is None):
            raise ConfigError(
                "set exactly one of min_lr (absolute) and min_lr_ratio (of each group's initial lr)",
                key="min_lr_ratio" if min_lr is not None else "min_lr",
            )
        self.max_iters, self.min_lr, self.min_lr_ratio, self.by_epoch = max_iters, min_lr, min_lr_ratio, by_epoch

    def value(self, base: float, i: int) -> float:
        target = self.min_lr if self.min_lr is not None else base * self.min_lr_ratio
        progress = min(i, self.max_iters) / self.max_iters
        return target + 0.5 * (base - target) * (1 + math.cos(math.pi * progress))


def anneal_cos(start: float, end: float, fraction: float) -> float:
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * fraction))


def anneal_linear(start: float, end: float, fraction: float) -> float:
    return start + (end - start) * fraction


@LR_POLICIES.register("cyclic")
class CyclicPolicy:
    """mmcv's cyclic schedule: per cycle of ``P = T // cyclic_times`` steps, rise from ``b`` to
    ``b * target_ratio[0]`` over ``step_ratio_up * P`` steps, then fall to ``b * target_ratio[1]``;
    the peak of cycle ``c`` is damped by ``gamma ** c``. Iteration-based only."""

    default_target_ratio: tuple[float, float] = (10.0, 1e-4)

    def __init__(
        self,
        max_iters: int,
        target_ratio: float | list[float] | None = None,
        cyclic_times: int = 1,
        step_ratio_up: float = 0.4,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        gamma: float = 1.0,
        by_epoch: bool = False,
    ):
        if by_epoch:
            raise ConfigError("the cyclic policy is iteration-based only; set by_epoch: false", key="by_epoch")
        if target_ratio is None:
            target_ratio = list(self.default_target_ratio)
        elif isinstance(target_ratio, (int, float)):
            target_ratio = [target_ratio, target_ratio / 1e5]
        if len(target_ratio) != 2:
            raise ConfigError(f"must be a number or two numbers, got {target_ratio}", key="target_ratio")
        if cyclic_times < 1:
            raise ConfigError(f"must be >= 1, got {cyclic_times}", key="cyclic_times")
        if not 0 <= step_ratio_up < 1:
            raise ConfigError(f"must be in [0, 1), got {step_ratio_up}", key="step_ratio_up")
        if not 0 < gamma <= 1:
            raise ConfigError(f"must be in (0, 1], got {gamma}", key="gamma")
        self.period = max_iters // cyclic_times
        if self.period < 1:
            raise ConfigError(f"{cyclic_times} cycles do not fit in {max_iters} iterations", key="cyclic_times")
        self.up = int(step_ratio_up * self.period)
        self.r0, self.r1 = float(target_ratio[0]), float(target_ratio[1])
        self.anneal = anneal_cos if anneal_strategy == "cos" else anneal_linear
        self.gamma = gamma

    def value(self, base: float, i: int) -> float:
        j = i % self.period
        scale = self.gamma ** (i // self.period)
        peak = base * (1 - scale + scale * self.r0)
        if j < self.up:
            return self.anneal(base, peak, j / self.up)
        if self.up == 0:
            # mmcv 1.7.2 damps the end of the phase that starts a cycle, the start of any other: with
            # no rise phase the fall starts each cycle, from the undamped peak to a damped end
            return self.anneal(base * self.r0, base * (1 - scale + scale * self.r1), j / self.period)
        return self.anneal(peak, base * self.r1, (j - self.up) / (self.period - self.up))


@MOMENTUM_POLICIES.register("cyclic")
class CyclicMomentumPolicy(CyclicPolicy):
    """The cyclic phases applied to momentum (``betas[0]`` for Adam-type optimizers);
    momentum falls while the lr rises: ``target_ratio`` defaults to (0.85/0.95, 1)."""

    default_target_ratio = (0.85 / 0.95, 1.0)


# --------------------------------------------------------------------------- warmup
@dataclasses.dataclass
class WarmupConfig:
    """``lr_config.warmup*``: multiplies the policy's lr ``r`` for ``i < warmup_iters``."""

    warmup: Literal["linear", "constant", "exp"] | None = None
    warmup_iters: int = 0
    warmup_ratio: float = 0.1

    def validate(self, key: str | None) -> None:
        prefix = f"{key}." if key else ""
        if not 0 < self.warmup_ratio <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.warmup_ratio}", key=f"{prefix}warmup_ratio")
        if self.warmup is not None and self.warmup_iters < 1:
            raise ConfigError(f"warmup: {self.warmup} needs warmup_iters >= 1", key=f"{prefix}warmup_iters")

    def factor(self, i: int) -> float:
        if self.warmup is None or i >= self.warmup_iters:
            return 1.0
        progress = i / self.warmup_iters
        if self.warmup == "linear":
            return 1 - (1 - progress) * (1 - self.warmup_ratio)
        if self.warmup == "constant":
            return self.warmup_ratio
        return self.warmup_ratio ** (1 - progress)


def split_lr_config(lr_cfg: dict, key: str = "lr_config") -> tuple[dict, WarmupConfig]:
    """The policy's own keys, and the warmup (checked)."""
    warmup = parse_section({k: lr_cfg[k] for k in WARMUP_KEYS if k in lr_cfg}, WarmupConfig, key)
    return {k: v for k, v in lr_cfg.items() if k not in WARMUP_KEYS}, warmup


def check_lr_config(value: Any, key: str = "lr_config") -> None:
    """``lr_config``: the warmup keys, then the policy and its own options."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigError(f"expected an lr schedule mapping ({{policy: ..., warmup: ...}}), got {value!r}", key=key)
    policy_cfg, _ = split_lr_config(value, key)
    LR_POLICIES.check(policy_cfg, key)


# --------------------------------------------------------------------------- schedulers
def _get_momentum(group: dict) -> float:
    return group["betas"][0] if "betas" in group else group["momentum"]


def _set_momentum(group: dict, value: float) -> None:
    if "betas" in group:
        group["betas"] = (value, *tuple(group["betas"])[1:])
    else:
        group["momentum"] = value


def has_momentum(optimizer: torch.optim.Optimizer) -> bool:
    return all("betas" in g or "momentum" in g for g in optimizer.param_groups)


class ParamScheduler:
    """Sets every group's ``lr`` (or momentum) from its own initial value before each step.

    Not passed to ``accelerator.prepare`` (a prepared scheduler steps once per
    process); ``step()`` is called once per optimizer step that was not skipped.
    State: the number of steps taken.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: Any, target: str = "lr",
                 warmup: WarmupConfig | None = None):
        self.optimizer, self.policy, self.target = optimizer, policy, target
        self.warmup = warmup or WarmupConfig()
        self._get = (lambda g: g["lr"]) if target == "lr" else _get_momentum
        self._set = (lambda g, v: g.__setitem__("lr", v)) if target == "lr" else _set_momentum
        for group in optimizer.param_groups:
            group.setdefault(f"initial_{target}", self._get(group))
        self.last_iter = 0
        self._apply()

    def value(self, base: float, i: int, warmup_i: int | None = None) -> float:
        return self.warmup.factor(i if warmup_i is None else warmup_i) * self.policy.value(base, i)

    def _apply(self, warmup_i: int | None = None) -> None:
        for group in self.optimizer.param_groups:
            self._set(group, self.value(group[f"initial_{self.target}"], self.last_iter, warmup_i))

    def apply(self, i: int, warmup_i: int | None = None) -> None:
        """Set the values for step (or epoch, for by_epoch policies) ``i``; the warmup counts
        optimizer steps ``warmup_i`` (default ``i``)."""
        self.last_iter = i
        self._apply(warmup_i)

    def step(self) -> None:
        self.last_iter += 1
        self._apply()

    def get_last_values(self) -> list[float]:
        return [self._get(group) for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_iter": self.last_iter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_iter = int(state["last_iter"])
        self._apply()


def build_lr_scheduler(lr_cfg: dict | None, optimizer: torch.optim.Optimizer, max_iters: int) -> ParamScheduler | None:
    """None when there is nothing to schedule (no ``lr_config``)."""
    if lr_cfg is None:
        return None
    if not all("lr" in g for g in optimizer.param_groups):
        raise ConfigError(f"{type(optimizer).__name__} has no 'lr' to schedule; remove lr_config", key="lr_config")
    policy_cfg, warmup = split_lr_config(lr_cfg)
    policy = LR_POLICIES.build(policy_cfg, "lr_config", max_iters=max_iters)
    return ParamScheduler(optimizer, policy, "lr", warmup)


def build_momentum_scheduler(momentum_cfg: dict | None, optimizer: torch.optim.Optimizer,
                             max_iters: int) -> ParamScheduler | None:
    if momentum_cfg is None:
        return None
    if not has_momentum(optimizer):
        raise ConfigError(
            f"{type(optimizer).__name__} has neither 'momentum' nor 'betas' to schedule", key="momentum_config"
        )
    policy = MOMENTUM_POLICIES.build(momentum_cfg, "momentum_config", max_iters=max_iters)
    return ParamScheduler(optimizer, policy, "momentum")


def schedule_warnings(section_cfg: dict | None, length: int, section: str = "lr_config",
                      unit: str = "iterations") -> list[str]:
    """What a schedule cannot do in a run of ``length`` steps (iterations, or epochs for a
    ``by_epoch`` schedule), one line each: a warmup that never ends, step milestones past the end
    (a shipped config shortened with ``runner.max_iters`` keeps its 1500-iteration warmup)."""
    if not section_cfg:
        return []
    notes = []
    warmup = section_cfg.get("warmup")
    warmup_iters = int(section_cfg.get("warmup_iters", 0) or 0)
    if warmup and warmup_iters >= length:
        ratio = float(section_cfg.get("warmup_ratio", 0.1))
        reached = {"linear": 1 - (1 - ratio) * (1 - (length - 1) / warmup_iters), "constant": ratio,
                   "exp": ratio ** (1 - (length - 1) / warmup_iters)}.get(str(warmup), ratio)
        notes.append(f"{section}.warmup_iters {warmup_iters} is not below the run's {length} {unit}: the schedule never "
                     f"leaves its warmup and reaches at most {reached:.3g} of its value (lower warmup_iters, or train "
                     "longer)")
    step = section_cfg.get("step")
    if str(section_cfg.get("policy", "")).lower() == "step" and step is not None:
        milestones = [step] if isinstance(step, int) else list(step)
        late = [m for m in milestones if m >= length]
        if late and isinstance(step, int):
            notes.append(f"{section}.step {step} is not below the run's {length} {unit}: the value never decays")
        elif late:
            notes.append(f"{section}.step milestone(s) {late} at or past the run's end ({length} {unit}): never applied")
    return notes
