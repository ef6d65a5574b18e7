"""Flat registries, one per kind of component.

A component in a config is ``{type: Name, **kwargs}``. ``Name`` is a registered
name or a dotted import path (``my_pkg.losses.MyLoss``). ``Registry.check``
validates such a mapping against the constructor's signature and annotations
without building anything; ``Registry.build`` checks, then constructs.

Built-in components register themselves in their own modules; each registry
imports those modules the first time it is asked for a name, so lookups never
depend on what happened to be imported before.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from seg_accel.config.types import Component, join_key, parse_value, type_hints
from seg_accel.errors import ConfigError, did_you_mean


class Registry:
    """Names -> classes (or factory functions) of one kind of component."""

    def __init__(
        self,
        kind: str,
        builtin_modules: Iterable[str] = (),
        key: str = "type",
        runtime_args: Iterable[str] = (),
        fallback: Callable[[str], Any] | None = None,
        extra_names: Callable[[], Iterable[str]] | None = None,
        case_insensitive: bool = False,
    ):
        self.kind = kind
        self.key = key
        self.runtime_args = tuple(runtime_args)
        self._entries: dict[str, Any] = {}
        self._builtin_modules = tuple(builtin_modules)
        self._builtins_loaded = False
        self._fallback = fallback
        self._extra_names = extra_names
        self.case_insensitive = case_insensitive  # mmcv spells lr policies 'poly' or 'Poly'

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"

    # -- registration -------------------------------------------------------
    def register(self, name: str | Callable | None = None, force: bool = False):
        """Decorator: ``@LOSSES.register()``, ``@LOSSES.register('Name')`` or ``@LOSSES.register``."""
        if callable(name) and not isinstance(name, str):
            return self.register()(name)

        def deco(obj):
            reg_name = name or obj.__name__
            existing = self._entries.get(reg_name)
            reloaded = existing is not None and (getattr(existing, "__module__", None), getattr(
                existing, "__qualname__", None)) == (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
            if existing is not None and existing is not obj and not force and not reloaded:
                raise KeyError(
                    f"{self.kind} '{reg_name}' is already registered by {self._entries[reg_name]!r}; "
                    "pass force=True to replace it"
                )
            self._entries[reg_name] = obj
            return obj

        return deco

    register_module = register  # the mmcv spelling, so tutorial code works as written

    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in self._builtin_modules:
                importlib.import_module(module)

    # -- lookup ---------------------------------------------------------------
    def names(self) -> list[str]:
        self._load_builtins()
        names = set(self._entries)
        if self._extra_names is not None:
            names.update(self._extra_names())
        return sorted(names)

    def registered(self, name: str) -> Any | None:
        """The entry registered as ``name``, or None: nothing is imported or looked up elsewhere
        (what a file from outside, such as an export's config.json, may name)."""
        self._load_builtins()
        return self._entries.get(name)

    def get(self, name: Any, key: str | None = None) -> Any:
        """The class registered as ``name`` (or found at the dotted path ``name``)."""
        self._load_builtins()
        if not isinstance(name, str) or not name:
            raise ConfigError(f"'{self.key}' must be the name of a {self.kind}, got {name!r}", key=key)
        if name in self._entries:
            return self._entries[name]
        if self.case_insensitive:
            folded = {n.lower(): obj for n, obj in self._entries.items()}
            if name.lower() in folded:
                return folded[name.lower()]
        if self._fallback is not None:
            try:
                found = self._fallback(name)
            except ConfigError as exc:
                raise exc.located(key) from None
            if found is not None:
                return found
        if "." in name:
            module_name, _, attr = name.rpartition(".")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise ConfigError(f"cannot import {self.kind} '{name}': {exc}", key=key) from exc
            if not hasattr(module, attr):
                raise ConfigError(f"module '{module_name}' has no attribute '{attr}'", key=key)
            return getattr(module, attr)
        raise ConfigError(f"unknown {self.kind} '{name}'." + did_you_mean(name, self.names()), key=key)

    # -- checking and building -------------------------------------------------
    def signature_info(self, obj: Any) -> tuple[dict[str, inspect.Parameter], bool, dict[str, Any]]:
        """(parameters, accepts **kwargs, type hints) of a registered constructor."""
        target = obj.__init__ if inspect.isclass(obj) else obj
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return {}, True, {}
        params = {}
        var_kw = False
        for p in sig.parameters.values():
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
            elif p.kind is not p.VAR_POSITIONAL:
                params[p.name] = p
        return params, var_kw, type_hints(target)

    def check(self, cfg: Any, key: str | None = None) -> Any:
        """Validate ``{type: ..., **kwargs}`` against the constructor; return the class."""
        if not isinstance(cfg, dict):
            raise ConfigError(
                f"expected a mapping with '{self.key}: <{self.kind} name>', got {cfg!r}", key=key
            )
        if self.key not in cfg:
            raise ConfigError(
                f"missing '{self.key}' (the {self.kind} to use)." + did_you_mean("", self.names()), key=key
            )
        obj = self.get(cfg[self.key], join_key(key, self.key))
        params, var_kw, hints = self.signature_info(obj)
        name = cfg[self.key]
        for arg, value in cfg.items():
            if arg == self.key:
                continue
            arg_key = join_key(key, arg)
            if arg in self.runtime_args:
                raise ConfigError(f"'{arg}' of {self.kind} {name} is set by seg-accel, not in the config", key=arg_key)
            if arg not in params:
                if var_kw:
                    continue
                allowed = [p for p in params if p not in self.runtime_args and p != "self"]
                raise ConfigError(
                    f"{self.kind} {name} has no option '{arg}'." + did_you_mean(str(arg), allowed),
                    key=arg_key,
                )
            tp = hints.get(arg)
            if tp is None:
                tp = _type_from_default(params[arg].default)
            if tp is not None:
                parse_value(value, tp, arg_key)
        missing = [
            p.name
            for p in params.values()
            if p.default is p.empty and p.name not in cfg and p.name not in self.runtime_args and p.name != "self"
        ]
        if missing:
            raise ConfigError(
                f"{self.kind} {name} needs option(s): " + ", ".join(missing), key=key
            )
        return obj

    def build(self, cfg: dict, key: str | None = None, **runtime: Any) -> Any:
        """Check ``cfg`` then construct: ``cls(**kwargs, **runtime)``."""
        obj = self.check(cfg, key)
        kwargs = {k: v for k, v in cfg.items() if k != self.key}
        try:
            return obj(**kwargs, **runtime)
        except ConfigError as exc:
            raise exc.within(key, [*kwargs, *self.signature_info(obj)[0]])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot build {self.kind} {cfg[self.key]}: {exc}", key=key) from exc


def _type_from_default(default: Any) -> Any:
    """For unannotated parameters: a bool default wants a bool, a number wants a number."""
    if isinstance(default, bool):
        return bool
    if isinstance(default, (int, float)):
        return float
    return None


@dataclasses.dataclass(frozen=True)
class Spec:
    """Annotation metadata of a constructor argument: one component (or a list of them) of
    ``registry``. ``Annotated[list, Spec(TRANSFORMS, many=True)]`` lets the config checker
    validate nested components wherever they appear (the config layer's ``Component`` checks
    the shape; this also checks the names and options against the registry)."""

    registry: Registry
    many: bool | str = False  # False: one mapping; True: a list; "either": one or a list

    @property
    def component(self) -> Component:
        return Component(self.registry.kind, self.many, self.registry.key)

    def describe(self) -> str:
        return self.component.describe()

    def check(self, value: Any, key: str | None) -> None:
        self.component.check(value, key)
        for item_key, item in self.component.items(value, key):
            self.registry.check(item, item_key)


def _torch_optimizer(name: str) -> Any:
    import torch

    obj = getattr(torch.optim, name, None)
    if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer:
        return obj
    return None


def _torch_optimizer_names() -> list[str]:
    import torch

    return [n for n in dir(torch.optim) if _torch_optimizer(n) is not None]


# transformers' mask-classification models that seg-accel trains for semantic segmentation
MASK_CLASSIFICATION_MODELS = ("Mask2FormerForUniversalSegmentation", "MaskFormerForInstanceSegmentation")

# segmentation_models_pytorch's architectures, named ``smp.<name>`` in configs (checked against
# smp itself in tests/unit/test_smp.py; listed here so that naming them imports nothing)
SMP_ARCHITECTURES = ("Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus", "Linknet", "MAnet",
                     "PAN", "UPerNet", "Segformer", "DPT")


def _library_model(name: str) -> Any:
    """``smp.<architecture>`` (imports segmentation_models_pytorch only then) or a transformers
    ``*ForSemanticSegmentation`` class (or Mask2Former, MaskFormer)."""
    if name.startswith("smp."):
        if name[4:] not in SMP_ARCHITECTURES:
            raise ConfigError(f"unknown segmentation_models_pytorch architecture '{name}'."
                              + did_you_mean(name, [f"smp.{a}" for a in SMP_ARCHITECTURES]), )
        import segmentation_models_pytorch

        return getattr(segmentation_models_pytorch, name[4:])
    if not (name.endswith("ForSemanticSegmentation") or name in MASK_CLASSIFICATION_MODELS):
        return None
    import transformers

    return getattr(transformers, name, None)


def _library_model_names() -> list[str]:
    import transformers

    return [n for n in dir(transformers) if n.endswith("ForSemanticSegmentation")] + \
        list(MASK_CLASSIFICATION_MODELS) + [f"smp.{a}" for a in SMP_ARCHITECTURES]


LOSSES = Registry(
    "loss",
    builtin_modules=["seg_accel.losses.cross_entropy", "seg_accel.losses.dice", "seg_accel.losses.focal",
                     "seg_accel.losses.lovasz"],
)
SAMPLERS = Registry("pixel sampler", builtin_modules=["seg_accel.losses.ohem"])
HOOKS = Registry("hook", builtin_modules=["seg_accel.engine.loggers", "seg_accel.hub.hook"])
TRANSFORMS = Registry("transform", builtin_modules=["seg_accel.data.transforms"])
DATASETS = Registry("dataset", builtin_modules=["seg_accel.data.synthetic", "seg_accel.data.folder", "seg_accel.data.hub"])
OPTIMIZERS = Registry(
    "optimizer", runtime_args=("params",), fallback=_torch_optimizer, extra_names=_torch_optimizer_names
)
OPTIMIZER_CONSTRUCTORS = Registry("optimizer constructor", builtin_modules=["seg_accel.optim.param_groups"])
LR_POLICIES = Registry(
    "lr policy", builtin_modules=["seg_accel.optim.schedules"], key="policy", runtime_args=("max_iters",),
    case_insensitive=True,
)
MOMENTUM_POLICIES = Registry(
    "momentum policy", builtin_modules=["seg_accel.optim.schedules"], key="policy", runtime_args=("max_iters",),
    case_insensitive=True,
)
MODELS = Registry("model", runtime_args=("num_classes",), fallback=_library_model,
                  extra_names=_library_model_names)


def list_losses() -> list[str]:
    return LOSSES.names()


def list_hooks() -> list[str]:
    return HOOKS.names()


def list_samplers() -> list[str]:
    return SAMPLERS.names()


def list_transforms() -> list[str]:
    return TRANSFORMS.names()


def list_datasets() -> list[str]:
    return DATASETS.names()


def list_optimizers() -> list[str]:
    return OPTIMIZERS.names()


def list_lr_policies() -> list[str]:
    return LR_POLICIES.names()


def list_momentum_policies() -> list[str]:
    return MOMENTUM_POLICIES.names()


def list_optimizer_constructors() -> list[str]:
    return OPTIMIZER_CONSTRUCTORS.names()


def list_models() -> list[str]:
    return MODELS.names()
