"""Optimizer constructors: parameter groups from ``optimizer.paramwise_cfg`` (docs/behaviour.md section 2).

A constructor is built as ``Constructor(optimizer_cfg, paramwise_cfg)`` and called
with the model; it returns the optimizer. Ours decide lr and weight decay per
parameter by rules, first match wins, then merge parameters with identical
settings into one group (same result, faster multi-tensor steps). Every group
carries a ``rule`` label for the table printed at start.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from seg_accel.config.schema import OPTIMIZER_OWN_KEYS
from seg_accel.config.types import join_key, parse_section
from seg_accel.errors import ConfigError
from seg_accel.registry import OPTIMIZER_CONSTRUCTORS, OPTIMIZERS

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)


@dataclasses.dataclass
class Decision:
    """Where one parameter goes: the rule that decided, its lr and weight decay (None: unset)."""

    name: str
    param: nn.Parameter
    rule: str
    lr: float | None
    weight_decay: float | None


def _optimizer_defaults(optimizer_cfg: dict) -> tuple[float | None, float | None]:
    return optimizer_cfg.get("lr"), optimizer_cfg.get("weight_decay")


def merge_groups(decisions: list[Decision]) -> list[dict[str, Any]]:
    """One optimizer group per distinct (lr, weight_decay), in order of first appearance."""
    groups: dict[tuple, dict[str, Any]] = {}
    for d in decisions:
        key = (d.lr, d.weight_decay)
        if key not in groups:
            group: dict[str, Any] = {"params": [], "rule": []}
            if d.lr is not None:
                group["lr"] = d.lr
            if d.weight_decay is not None:
                group["weight_decay"] = d.weight_decay
            groups[key] = group
        groups[key]["params"].append(d.param)
        if d.rule not in groups[key]["rule"]:
            groups[key]["rule"].append(d.rule)
    names: set[str] = set()
    for group in groups.values():
        name = group_name(group["rule"][0])
        while name in names:
            name += "_"
        names.add(name)
        group["name"] = name  # in logs: lr.<name>
        group["rule"] = ", ".join(group["rule"])
    return list(groups.values())


def group_name(rule: str) -> str:
    """A short name from a rule label: custom_keys['head'] -> head, layer 3 (no decay) -> layer3_no_decay."""
    match = re.fullmatch(r"custom_keys\['(.*)'\]", rule)
    if match:
        rule = match.group(1)
    return re.sub(r"[^0-9A-Za-z_]+", "_", rule.replace("layer ", "layer")).strip("_") or "group"


def check_coverage(model: nn.Module, groups: list[dict[str, Any]]) -> None:
    """Every trainable parameter in exactly one group (a rule set that loses one is a bug)."""
    placed = [id(p) for g in groups for p in g["params"]]
    if len(placed) != len(set(placed)):
        raise AssertionError("a parameter was placed in two optimizer groups")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in set(placed)]
    if missing:
        raise AssertionError(f"parameters left out of every optimizer group: {missing[:5]}")


# --------------------------------------------------------------------------- the default constructor
@dataclasses.dataclass
class CustomKeyConfig:
    lr_mult: float = 1.0
    decay_mult: float | None = None


@dataclasses.dataclass
class ParamwiseConfig:
    """mmcv 1.x ``DefaultOptimizerConstructor`` options."""

    custom_keys: dict[str, CustomKeyConfig] = dataclasses.field(default_factory=dict)
    bias_lr_mult: float | None = None
    bias_decay_mult: float | None = None
    norm_decay_mult: float | None = None
    dwconv_decay_mult: float | None = None
    bypass_duplicate: bool = False


def _module_params(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, nn.Parameter]]:
    """(full name, own name, owning module, parameter), shared parameters once per owner."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        for own, param in module.named_parameters(recurse=False):
            yield (f"{prefix}.{own}" if prefix else own), own, module, param


@OPTIMIZER_CONSTRUCTORS.register()
class DefaultOptimizerConstructor:
    """Parameter groups by ``paramwise_cfg`` (mmcv 1.x semantics; frozen parameters left out).

    Per parameter, by full name: the longest matching ``custom_keys`` substring (ties
    alphabetical) sets ``lr_mult``/``decay_mult`` and skips the other rules; otherwise a
    bias outside norm layers gets ``bias_lr_mult``, and weight decay is multiplied by the
    first of ``norm_decay_mult`` (BatchNorm, GroupNorm, LayerNorm, InstanceNorm),
    ``dwconv_decay_mult`` (Conv2d with in_channels == groups), ``bias_decay_mult``.
    """

    def __init__(self, optimizer_cfg: dict, paramwise_cfg: dict | None = None):
        self.optimizer_cfg = dict(optimizer_cfg)
        self.paramwise_cfg = paramwise_cfg or {}
        self.rules = self.check_paramwise(self.paramwise_cfg, optimizer_cfg, "optimizer.paramwise_cfg")
        self.base_lr, self.base_wd = _optimizer_defaults(optimizer_cfg)
        self.notes: list[str] = []  # shown under the parameter-group table

    @staticmethod
    def check_paramwise(paramwise_cfg: dict | None, optimizer_cfg: dict, key: str) -> ParamwiseConfig:
        rules = parse_section(paramwise_cfg or {}, ParamwiseConfig, key)
        if optimizer_cfg.get("weight_decay") is None:
            decay = [(f"custom_keys.{k}.decay_mult", c.decay_mult) for k, c in rules.custom_keys.items()]
            decay += [(n, getattr(rules, n)) for n in ("bias_decay_mult", "norm_decay_mult", "dwconv_decay_mult")]
            for name, value in decay:
                if value is not None:
                    raise ConfigError(
                        "a decay_mult multiplies optimizer.weight_decay, which is not set; "
                        "set weight_decay in the optimizer",
                        key=join_key(key, name),
                    )
        if optimizer_cfg.get("lr") is None:
            mults = [(f"custom_keys.{k}.lr_mult", c.lr_mult) for k, c in rules.custom_keys.items()]
            for name, value in [*mults, ("bias_lr_mult", rules.bias_lr_mult)]:
                if value is not None and value != 1.0:
                    raise ConfigError("an lr_mult multiplies optimizer.lr, which is not set", key=join_key(key, name))
        return rules

    def decide(self, model: nn.Module) -> tuple[list[Decision], list[str]]:
        """The decision for every trainable parameter, and the names of the frozen ones."""
        rules, base_lr, base_wd = self.rules, self.base_lr, self.base_wd
        keys = sorted(sorted(rules.custom_keys), key=len, reverse=True)
        decisions: list[Decision] = []
        frozen: list[str] = []
        placed: dict[int, str] = {}
        for name, own, module, param in _module_params(model):
            if not param.requires_grad:
                if name not in frozen:
                    frozen.append(name)
                continue
            if id(param) in placed:
                if rules.bypass_duplicate:
                    continue
                raise ConfigError(
                    f"parameter {name} is the same tensor as {placed[id(param)]} (shared weights); "
                    "set bypass_duplicate: true to place it once",
                    key="optimizer.paramwise_cfg.bypass_duplicate",
                )
            placed[id(param)] = name
            if not self.paramwise_cfg:
                decisions.append(Decision(name, param, "default", base_lr, base_wd))
                continue
            decisions.append(self._decide_one(name, own, module, param, keys))
        unmatched = [k for k in keys if not any(k in d.name for d in decisions)]
        if unmatched:
            self.notes = [f"custom_keys matching no trainable parameter name: {', '.join(map(repr, unmatched))}"]
        return decisions, frozen

    def _decide_one(self, name: str, own: str, module: nn.Module, param: nn.Parameter, keys: list[str]) -> Decision:
        rules, lr, wd = self.rules, self.base_lr, self.base_wd
        for key in keys:  # longest first, ties alphabetical; the first match wins and ends the decision
            if key in name:
                custom = rules.custom_keys[key]
                lr = None if lr is None else lr * custom.lr_mult
                wd = None if wd is None else wd * _mult(custom.decay_mult)
                return Decision(name, param, f"custom_keys[{key!r}]", lr, wd)
        is_norm = isinstance(module, NORM_TYPES)
        is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
        is_bias = own == "bias"
        applied = []  # labels of the rules that changed something (a mult the config sets)
        if is_bias and not is_norm and lr is not None and rules.bias_lr_mult is not None:
            lr = lr * rules.bias_lr_mult
            applied.append("bias_lr_mult")
        if wd is not None:
            for matches, mult, label in ((is_norm, rules.norm_decay_mult, "norm_decay_mult"),
                                         (is_dwconv, rules.dwconv_decay_mult, "dwconv_decay_mult"),
                                         (is_bias, rules.bias_decay_mult, "bias_decay_mult")):
                if matches:  # the first weight-decay rule that applies decides, set or not (mmcv)
                    wd = wd * _mult(mult)
                    if mult is not None:
                        applied.append(label)
                    break
        return Decision(name, param, " + ".join(applied) or "default", lr, wd)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        decisions, _ = self.decide(model)
        if not decisions:
            raise ConfigError("the model has no trainable parameters", key="optimizer")
        groups = merge_groups(decisions)
        check_coverage(model, groups)
        return groups

    def __call__(self, model: nn.Module) -> torch.optim.Optimizer:
        cfg = {k: v for k, v in self.optimizer_cfg.items() if k not in ("paramwise_cfg", "constructor")}
        return OPTIMIZERS.build(cfg, "optimizer", params=self.param_groups(model))


def _mult(value: float | None) -> float:
    return 1.0 if value is None else value


# --------------------------------------------------------------------------- layer-wise lr decay
_NO_DECAY_NAMES = ("cls_token", "mask_token", "position_embeddings", "pos_embed")


@dataclasses.dataclass
class LayerDecayConfig:
    num_layers: int
    decay_rate: float
    decay_type: Literal["layer_wise", "stage_wise"] = "layer_wise"

    def validate(self, key: str | None) -> None:
        if self.num_layers < 1:
            raise ConfigError(f"must be >= 1, got {self.num_layers}", key=join_key(key, "num_layers"))
        if not 0 < self.decay_rate <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.decay_rate}", key=join_key(key, "decay_rate"))


@OPTIMIZER_CONSTRUCTORS.register()
class LearningRateDecayOptimizerConstructor(DefaultOptimizerConstructor):
    """Layer-wise lr decay for BEiT/ViT-style and ConvNeXt backbones (MMSegmentation 0.x):
    ``lr = base_lr * decay_rate ** (num_layers + 2 - layer_id - 1)``; 1-D parameters,
    biases and position/class tokens get no weight decay.
    ``paramwise_cfg: {num_layers, decay_rate, decay_type: layer_wise|stage_wise}``."""

    rate_key = "decay_rate"

    @classmethod
    def check_paramwise(cls, paramwise_cfg: dict | None, optimizer_cfg: dict, key: str) -> LayerDecayConfig:
        values = dict(paramwise_cfg or {})
        if cls.rate_key != "decay_rate":
            if "decay_type" in values:
                raise ConfigError(f"{cls.__name__} is layer-wise only; remove decay_type", key=join_key(key, "decay_type"))
            if cls.rate_key in values:
                values["decay_rate"] = values.pop(cls.rate_key)
            elif "decay_rate" in values:
                raise ConfigError(f"{cls.__name__} calls it '{cls.rate_key}'", key=join_key(key, "decay_rate"))
        try:
            rules = parse_section(values, LayerDecayConfig, key)
        except ConfigError as exc:
            if exc.key == join_key(key, "decay_rate"):
                exc.key = join_key(key, cls.rate_key)
                exc.message = exc.message.replace("decay_rate", cls.rate_key)
            raise
        if optimizer_cfg.get("lr") is None:
            raise ConfigError("layer-wise lr decay needs optimizer.lr", key="optimizer.lr")
        return rules

    def decide(self, model: nn.Module) -> tuple[list[Decision], list[str]]:
        rules = self.rules
        total = rules.num_layers + 2
        # the model's family numbers its layers (seg_accel.models: every model it builds carries it)
        family = getattr(model, "seg_accel_family", None)
        layer_ids = family.layer_ids(model, rules.num_layers, rules.decay_type) if family is not None else None
        if layer_ids is None:
            raise ConfigError(
                f"{type(self).__name__} needs a model whose family numbers its layers (BEiT/ViT-style: BEiT, "
                f"Data2Vec-Vision, DPT; ConvNeXt backbones); {type(model).__name__} has neither"
                + (f" ({family.name} family)" if family is not None else ""),
                key="optimizer.constructor",
            )
        decisions, frozen = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                frozen.append(name)
                continue
            lid = layer_ids(name)
            scale = rules.decay_rate ** (total - lid - 1)
            no_decay = param.ndim == 1 or name.endswith(".bias") or name.split(".")[-1] in _NO_DECAY_NAMES
            wd = None if self.base_wd is None else (0.0 if no_decay else self.base_wd)
            rule = f"layer {lid} ({'no decay' if no_decay else 'decay'})"
            decisions.append(Decision(name, param, rule, self.base_lr * scale, wd))
        return decisions, frozen


@OPTIMIZER_CONSTRUCTORS.register()
class LayerDecayOptimizerConstructor(LearningRateDecayOptimizerConstructor):
    """MMSegmentation's BEiT spelling: ``paramwise_cfg: {num_layers, layer_decay_rate}`` (layer-wise)."""

    rate_key = "layer_decay_rate"


# --------------------------------------------------------------------------- building


def check_optimizer_config(value: Any, key: str = "optimizer") -> None:
    """The ``optimizer`` section: the constructor, its ``paramwise_cfg``, then the optimizer's
    own kwargs against its signature."""
    if not isinstance(value, dict):
        raise ConfigError(f"expected an optimizer mapping ({{type: ..., lr: ...}}), got {value!r}", key=key)
    constructor = OPTIMIZER_CONSTRUCTORS.get(
        value.get("constructor", "DefaultOptimizerConstructor"), join_key(key, "constructor")
    )
    checker = getattr(constructor, "check_paramwise", None)
    if checker is not None:
        checker(value.get("paramwise_cfg"), value, join_key(key, "paramwise_cfg"))
    elif value.get("paramwise_cfg") is not None and not isinstance(value["paramwise_cfg"], dict):
        raise ConfigError("expected a mapping", key=join_key(key, "paramwise_cfg"))
    OPTIMIZERS.check(optimizer_kwargs(value), key)


def optimizer_kwargs(optimizer_cfg: dict) -> dict:
    """The optimizer's own ``{type, kwargs}`` (without the constructor's keys)."""
    return {k: v for k, v in optimizer_cfg.items() if k not in OPTIMIZER_OWN_KEYS}


def build_constructor(optimizer_cfg: dict) -> Any:
    name = optimizer_cfg.get("constructor", "DefaultOptimizerConstructor")
    constructor_cls = OPTIMIZER_CONSTRUCTORS.get(name, "optimizer.constructor")
    return constructor_cls(optimizer_kwargs(optimizer_cfg), optimizer_cfg.get("paramwise_cfg"))


FUSED_OPTIMIZERS = ("Adam", "AdamW", "SGD")  # torch's optimizers with a fused kernel on CPU and CUDA


def with_fused_kernel(optimizer_cfg: dict, device_type: str) -> tuple[dict, str | None]:
    """``optimizer_cfg`` with ``fused: true`` when the optimizer has a fused kernel for the device
    and the config chose neither ``fused`` nor ``foreach``: one kernel per step instead of a loop
    over the tensors (measured on the CamVid SegFormer's 205 tensors on CPU: AdamW's step 7.2 ms
    -> 1.8 ms; results equal to a few float32 ulps). ``fused: false`` keeps torch's default.
    Returns (config, a note for the log or None)."""
    if (optimizer_cfg.get("type") not in FUSED_OPTIMIZERS or "fused" in optimizer_cfg or "foreach" in optimizer_cfg
            or device_type not in ("cpu", "cuda")):
        return optimizer_cfg, None
    return {**optimizer_cfg, "fused": True}, f"{optimizer_cfg['type']}: fused kernel (optimizer.fused: false for torch's default)"


def build_optimizer(model: nn.Module, optimizer_cfg: dict) -> torch.optim.Optimizer:
    """``constructor(optimizer_cfg, paramwise_cfg)(model)``; DefaultOptimizerConstructor by default."""
    return build_constructor(optimizer_cfg)(model)


def param_group_table(model: nn.Module, optimizer: torch.optim.Optimizer, notes: list[str] | None = None) -> str:
    """A table of the optimizer's groups: rule, tensors, parameters, lr, weight decay (plus notes)."""
    rows = []
    for i, group in enumerate(optimizer.param_groups):
        params = group["params"]
        rows.append([
            str(i),
            str(group.get("rule", "-")),
            str(len(params)),
            f"{sum(p.numel() for p in params):,}",
            f"{group['lr']:.3e}" if "lr" in group else "-",
            f"{group['weight_decay']:g}" if "weight_decay" in group else "-",
        ])
    frozen = [p for p in model.parameters() if not p.requires_grad]
    if frozen:
        rows.append(["-", "frozen (not optimized)", str(len(frozen)), f"{sum(p.numel() for p in frozen):,}", "-", "-"])
    headers = ["group", "rule", "tensors", "parameters", "lr", "weight_decay"]
    widths = [max(len(r[j]) for r in [headers, *rows]) for j in range(len(headers))]
    sep = "+-" + "-+-".join("-" * w for w in widths) + "-+"

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if j == 1 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths))) + " |"

    title = f"{type(optimizer).__name__} parameter groups"
    return "\n".join([title, sep, line(headers), sep, *(line(r) for r in rows), sep, *(notes or [])])
