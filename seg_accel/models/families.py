"""The model-family registry: which family builds a ``model.type``, owns a built model, or
reads an export folder.

A family (``seg_accel.models.interface.ModelFamily``) registers itself by name with
``@register_family()``; ``model_family``, ``family_of_model`` and ``family_of_export`` ask
the registered families in their order (``order``, then registration; lower first) and the
first that recognises the entry, model or export answers. seg-accel registers
``transformers`` (order 50) and ``module`` (order 100: any ``nn.Module`` taking
``num_classes``, asked last), imported with ``seg_accel.models``. Every model a family builds or loads carries its family
(``model.seg_accel_family``), and every export names it in its ``config.json``
(``seg_accel_family``), so a new family is one module plus its registration.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from seg_accel.errors import ConfigError
from seg_accel.models.interface import ModelFamily

FAMILY_ATTRIBUTE = "seg_accel_family"  # on a built model: its family object
EXPORT_FAMILY_KEY = "seg_accel_family"  # in an export's config.json: its family's name

_FAMILIES: list[tuple[int, int, type[ModelFamily]]] = []  # (order, registration number, family)


def register_family(order: int = 50) -> Any:
    """Class decorator: register a ``ModelFamily`` subclass under its ``name``; asked before the
    families of a higher ``order`` (a family registered again under its name replaces the old)."""

    def register(family_cls: type[ModelFamily]) -> type[ModelFamily]:
        if not (isinstance(family_cls, type) and issubclass(family_cls, ModelFamily)):
            raise TypeError(f"register_family takes a ModelFamily subclass, got {family_cls!r}")
        _FAMILIES[:] = [entry for entry in _FAMILIES if entry[2].name != family_cls.name]
        _FAMILIES.append((order, len(_FAMILIES), family_cls))
        _FAMILIES.sort(key=lambda entry: entry[:2])
        return family_cls

    return register


def families() -> list[type[ModelFamily]]:
    """The registered families, in the order they are asked."""
    return [entry[2] for entry in _FAMILIES]


def list_families() -> list[str]:
    return [family.name for family in families()]


def family_named(name: str) -> type[ModelFamily] | None:
    return next((family for family in families() if family.name == name), None)


def model_family(model_type: str, key: str = "model.type") -> ModelFamily:
    """The family of ``model.type`` (a name in ``MODELS`` or a dotted import path)."""
    from seg_accel.registry import MODELS

    entry = MODELS.get(model_type, key)
    for family in families():
        found = family.from_entry(entry, model_type)
        if found is not None:
            return found
    raise ConfigError(f"'{model_type}' is {type(entry).__name__}, which no model family takes (families: "
                      f"{', '.join(list_families())}): register a torch.nn.Module class (or a function returning one) "
                      "taking num_classes", key=key)


def attach_family(model: nn.Module, family: ModelFamily) -> nn.Module:
    """Mark a model with the family that built or loaded it."""
    object.__setattr__(model, FAMILY_ATTRIBUTE, family)
    return model


def family_of_model(model: nn.Module) -> ModelFamily:
    """The family of a built model: the one it carries, else the first that recognises it."""
    family = getattr(model, FAMILY_ATTRIBUTE, None)
    if isinstance(family, ModelFamily):
        return family
    for candidate in families():
        found = candidate.from_model(model)
        if found is not None:
            return found
    raise ValueError(f"{type(model).__name__} belongs to no seg-accel model family ({', '.join(list_families())}): "
                     "build it with seg_accel.models.build_model or load it with seg_accel.load_model")


def family_of_export(config: dict[str, Any], folder: Any = "the export") -> ModelFamily:
    """The family that reads an export whose ``config.json`` is ``config``: the one it names,
    else (an export written before exports named their family) the first that recognises it."""
    name = config.get(EXPORT_FAMILY_KEY, config.get("_" + EXPORT_FAMILY_KEY))
    if name is not None:
        family = family_named(str(name))
        if family is None:
            raise ImportError(f"{folder} was exported by the model family '{name}', which is not registered here "
                              f"(registered: {', '.join(list_families())}): import the package that registers it first")
        found = family.from_export(config)
        if found is None:
            raise ValueError(f"{folder}: the model family '{name}' does not recognise this export's config.json")
        return found
    for family in families():
        found = family.from_export(config)
        if found is not None:
            return found
    raise ValueError(f"{folder} is not an export of any registered model family ({', '.join(list_families())})")
