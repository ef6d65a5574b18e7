"""MMEngine's parameter schedulers (MMSegmentation 1.x's ``param_scheduler``), value for value.

``lr_config: {policy: chain, schedulers: [...]}`` (and ``momentum_config`` alike) runs a list of
MMEngine schedulers as MMEngine chains them: each is active on the steps ``begin <= t < end``
and changes the value the schedulers before it left, in list order, once per iteration (or
epoch, ``by_epoch``). MMEngine computes most of them recursively from the current value (its
"chainable form"), so the values here are computed the same way, in the same order, which
makes them equal to MMEngine's bit for bit (tests/unit/test_pyconfig_schedules.py runs
mmengine 0.10 beside them). The 1.x vocabulary of seg_accel.config.vocabulary writes these
sections from ``param_scheduler``.

Supported: ``LinearLR``, ``ConstantLR``, ``ExponentialLR``, ``PolyLR``, ``CosineAnnealingLR``,
``MultiStepLR``, ``StepLR``, ``OneCycleLR`` and the momentum schedulers of the same names
(``LinearMomentum``, ...), each with ``begin``, ``end`` (default: the run's length) and
``by_epoch`` (MMEngine's default is true; all schedulers of a chain must agree).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

from seg_accel.errors import ConfigError, did_you_mean
from seg_accel.registry import LR_POLICIES, MOMENTUM_POLICIES

INF = 10**18  # MMEngine's INF end, as an integer step


class _Step:
    """One scheduler's state within a chain for one parameter group."""

    def __init__(self, spec: dict[str, Any], key: str, length: int, target: str):
        self.kind = spec["type"]
        self.begin = spec.get("begin", 0)
        self.end = spec.get("end", length)
        for name in ("begin", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be a step index (an integer >= 0), got {value!r}", key=f"{key}.{name}")
        if self.end <= self.begin:
            raise ConfigError(f"end should be larger than begin, got begin={self.begin}, end={self.end}",
                              key=f"{key}.end")
        self.spec, self.key, self.target = spec, key, target
        self.last_step = -1
        self.global_step = -1
        self.base = 0.0


def _number(spec: dict, name: str, default: Any, key: str) -> Any:
    value = spec.get(name, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"must be a number, got {value!r}", key=f"{key}.{name}")
    return value


# the options each scheduler takes (besides type, begin, end, by_epoch), with MMEngine's defaults
OPTIONS: dict[str, dict[str, Any]] = {
    "Linear": {"start_factor": 1.0 / 3, "end_factor": 1.0},
    "Constant": {"factor": 1.0 / 3},
    "Exponential": {"gamma": None},
    "Poly": {"eta_min": 0, "power": 1.0},
    "CosineAnnealing": {"T_max": None, "eta_min": None, "eta_min_ratio": None},
    "MultiStep": {"milestones": None, "gamma": 0.1},
    "Step": {"step_size": None, "gamma": 0.1},
    "OneCycle": {"eta_max": 0, "total_steps": None, "pct_start": 0.3, "anneal_strategy": "cos", "div_factor": 25.0,
                 "final_div_factor": 1e4, "three_phase": False},
}
COMMON = ("type", "begin", "end", "by_epoch", "verbose")


def scheduler_kind(name: str, target: str) -> str | None:
    suffix = "LR" if target == "lr" else "Momentum"
    if name.endswith(suffix) and name[: -len(suffix)] in OPTIONS:
        kind = name[: -len(suffix)]
        return None if kind == "OneCycle" and target != "lr" else kind
    return None


def scheduler_names(target: str) -> list[str]:
    suffix = "LR" if target == "lr" else "Momentum"
    return [k + suffix for k in OPTIONS if target == "lr" or k != "OneCycle"]


class ChainPolicy:
    """``value(b, i)``: the value MMEngine's chain gives a group whose initial value is ``b``
    after ``i`` steps (the value used by iteration, or epoch, ``i``)."""

    target = "lr"

    def __init__(self, max_iters: int, schedulers: list[dict], by_epoch: bool = False):
        if not isinstance(schedulers, list) or not schedulers:
            raise ConfigError("expected a list of schedulers ({type: PolyLR, ...})", key="schedulers")
        self.by_epoch = by_epoch
        self.length = max_iters
        self.specs = []
        for i, spec in enumerate(schedulers):
            key = f"schedulers.{i}"
            if not isinstance(spec, dict) or "type" not in spec:
                raise ConfigError(f"expected a mapping with a type, got {spec!r}", key=key)
            kind = scheduler_kind(str(spec["type"]), self.target)
            if kind is None:
                raise ConfigError(f"unknown {self.target} scheduler {spec['type']!r}."
                                  + did_you_mean(str(spec["type"]), scheduler_names(self.target)), key=f"{key}.type")
            unknown = sorted(set(spec) - set(COMMON) - set(OPTIONS[kind]))
            if unknown:
                raise ConfigError(f"{spec['type']} has no option(s) {unknown}; it takes "
                                  f"{', '.join([*OPTIONS[kind], 'begin', 'end', 'by_epoch'])}", key=key)
            if bool(spec.get("by_epoch", True)) != by_epoch:
                raise ConfigError(f"by_epoch is {spec.get('by_epoch', True)} here but {by_epoch} for the chain: "
                                  "all schedulers of one chain count the same unit (iterations or epochs)",
                                  key=f"{key}.by_epoch")
            self._check(kind, spec, key)
            self.specs.append((kind, spec, key))
        self._cache: dict[float, list[float]] = {}
        self._states: dict[float, tuple[list[_Step], dict[str, float]]] = {}

    def _check(self, kind: str, spec: dict, key: str) -> None:
        for name, default in OPTIONS[kind].items():
            if name not in ("milestones", "anneal_strategy", "three_phase"):
                _number(spec, name, default, key)
        if kind == "Linear":
            for name in ("start_factor", "end_factor"):
                if not 0 <= spec.get(name, OPTIONS[kind][name]) <= 1:
                    raise ConfigError(f"must be between 0 and 1, got {spec[name]}", key=f"{key}.{name}")
        if kind == "Constant" and not 0 <= spec.get("factor", 1 / 3) <= 1:
            raise ConfigError(f"must be between 0 and 1, got {spec['factor']}", key=f"{key}.factor")
        if kind == "Exponential" and spec.get("gamma") is None:
            raise ConfigError("ExponentialLR needs gamma", key=f"{key}.gamma")
        if kind == "Step" and (not isinstance(spec.get("step_size"), int) or spec["step_size"] < 1):
            raise ConfigError(f"needs step_size, a positive integer, got {spec.get('step_size')!r}",
                              key=f"{key}.step_size")
        if kind == "MultiStep":
            milestones = spec.get("milestones")
            if not isinstance(milestones, list) or not all(isinstance(m, int) for m in milestones):
                raise ConfigError(f"needs milestones, a list of step indices, got {milestones!r}",
                                  key=f"{key}.milestones")
        if kind == "CosineAnnealing" and spec.get("eta_min") is not None and spec.get("eta_min_ratio") is not None:
            raise ConfigError("set either eta_min or eta_min_ratio", key=f"{key}.eta_min_ratio")
        if kind == "OneCycle":
            if isinstance(spec.get("eta_max"), list):
                raise ConfigError("one eta_max for every group (a number)", key=f"{key}.eta_max")
            if spec.get("anneal_strategy", "cos") not in ("cos", "linear"):
                raise ConfigError(f"must be cos or linear, got {spec['anneal_strategy']!r}",
                                  key=f"{key}.anneal_strategy")
            pct = spec.get("pct_start", 0.3)
            if not isinstance(pct, float) or not 0 <= pct <= 1:
                raise ConfigError(f"must be a float in [0, 1], got {pct!r}", key=f"{key}.pct_start")
            total = spec.get("total_steps")
            if total is not None and (not isinstance(total, int) or total <= 0):
                raise ConfigError(f"must be a positive integer, got {total!r}", key=f"{key}.total_steps")
        _Step(spec, key, self.length, self.target)  # begin/end

    # ------------------------------------------------------------------ simulation
    def _start(self, base: float) -> tuple[list[float], tuple[list[_Step], dict[str, float]]]:
        group = {"value": base, "initial": base}
        steps = []
        for kind, spec, key in self.specs:  # built in order; each steps once when built
            step = _Step(spec, key, self.length, self.target)
            step.kind = kind
            if kind == "OneCycle":
                self._init_one_cycle(step, group)
            step.base = group["initial"]
            self._prepare(step)
            steps.append(step)
            self._advance(step, group)
        return [group["value"]], (steps, group)

    def _init_one_cycle(self, step: _Step, group: dict[str, float]) -> None:
        spec = step.spec
        div = spec.get("div_factor", 25.0)
        step.total_steps = spec.get("total_steps") or (step.end - step.begin)
        pct = spec.get("pct_start", 0.3)
        step.max_value = spec.get("eta_max", 0)
        group["initial"] = step.max_value / div
        step.min_value = group["initial"] / spec.get("final_div_factor", 1e4)
        if spec.get("three_phase", False):
            step.phases = [(float(pct * step.total_steps) - 1, "initial", "max"),
                           (float(2 * pct * step.total_steps) - 2, "max", "initial"),
                           (step.total_steps - 1, "initial", "min")]
        else:
            step.phases = [(float(pct * step.total_steps) - 1, "initial", "max"), (step.total_steps - 1, "max", "min")]
        step.anneal = spec.get("anneal_strategy", "cos")

    def _prepare(self, step: _Step) -> None:
        spec, kind = step.spec, step.kind
        if kind in ("Linear", "Constant", "Poly"):
            step.total_iters = step.end - step.begin - 1
        if kind == "CosineAnnealing":
            step.T_max = spec.get("T_max") or (step.end - step.begin)
            if spec.get("eta_min") is None and spec.get("eta_min_ratio") is None:
                step.eta_min, step.eta_min_ratio = 0.0, None
            else:
                step.eta_min, step.eta_min_ratio = spec.get("eta_min"), spec.get("eta_min_ratio")
        if kind == "MultiStep":
            step.milestones = Counter(spec["milestones"])

    def _advance(self, step: _Step, group: dict[str, float]) -> None:
        step.global_step += 1
        if step.begin <= step.global_step < step.end:
            step.last_step += 1
            group["value"] = self._value(step, group)

    def _value(self, step: _Step, group: dict[str, float]) -> float:  # noqa: C901 (one branch per scheduler)
        kind, spec, t, v = step.kind, step.spec, step.last_step, group["value"]
        if kind == "Linear":
            start, end = spec.get("start_factor", 1.0 / 3), spec.get("end_factor", 1.0)
            if t == 0:
                return v * start
            return v * (1. + (end - start) / (step.total_iters * start + (t - 1) * (end - start)))
        if kind == "Constant":
            factor = spec.get("factor", 1.0 / 3)
            if t == 0:
                return v * factor
            if t > step.total_iters or t != step.total_iters:
                return v
            return v * (1.0 / factor)
        if kind == "Exponential":
            return v if t == 0 else v * spec["gamma"]
        if kind == "Poly":
            if t == 0:
                return v
            eta_min, power = spec.get("eta_min", 0), spec.get("power", 1.0)
            return (v - eta_min) * (1 - 1 / (step.total_iters - t + 1))**power + eta_min
        if kind == "CosineAnnealing":
            eta_min = step.eta_min if step.eta_min_ratio is None else step.base * step.eta_min_ratio
            if t == 0:
                return v
            if (t - 1 - step.T_max) % (2 * step.T_max) == 0:
                return v + (step.base - eta_min) * (1 - math.cos(math.pi / step.T_max)) / 2
            return (1 + math.cos(math.pi * t / step.T_max)) / (1 + math.cos(math.pi * (t - 1) / step.T_max)) * \
                (v - eta_min) + eta_min
        if kind == "MultiStep":
            if t not in step.milestones:
                return v
            return v * spec.get("gamma", 0.1)**step.milestones[t]
        if kind == "Step":
            if t == 0 or t % spec["step_size"] != 0:
                return v
            return v * spec.get("gamma", 0.1)
        # OneCycle (not chainable: from its own start, peak and end values)
        if t > step.total_steps:
            raise ConfigError(f"OneCycleLR stepped {t + 1} times; its total_steps is {step.total_steps}",
                              key=step.key)
        values = {"initial": group["initial"], "max": step.max_value, "min": step.min_value}
        start_step = 0
        for i, (end_step, first, last) in enumerate(step.phases):
            if t <= end_step or i == len(step.phases) - 1:
                pct = (t - start_step) / (end_step - start_step)
                a, b = values[first], values[last]
                if step.anneal == "cos":
                    return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)
                return (b - a) * pct + a
            start_step = end_step
        raise AssertionError("unreachable")

    def values(self, base: float, upto: int) -> list[float]:
        """The values for steps 0..upto of a group starting at ``base``."""
        if base not in self._cache:
            self._cache[base], self._states[base] = self._start(base)
        out = self._cache[base]
        steps, group = self._states[base]
        while len(out) <= upto:
            for step in steps:
                self._advance(step, group)
            out.append(group["value"])
        return out

    def value(self, base: float, i: int) -> float:
        return self.values(base, i)[i]

    def initial_value(self, base: float) -> float:
        """The group's value MMEngine writes as ``initial_*`` (OneCycle rewrites it)."""
        self.values(base, 0)
        return self._states[base][1]["initial"]


@LR_POLICIES.register("chain")
class LrChainPolicy(ChainPolicy):
    target = "lr"


@MOMENTUM_POLICIES.register("chain")
class MomentumChainPolicy(ChainPolicy):
    target = "momentum"
