"""Check YAML values against Python type annotations, naming the config key on failure.

Used for the sections of our own schema (dataclasses) and for the keyword
arguments of registered components (their ``__init__`` annotations).
"""
from __future__ import annotations

import collections.abc as cabc
import dataclasses
import os
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from seg_accel.errors import ConfigError, did_you_mean

_NONE = type(None)


def join_key(prefix: str | None, name: str | int) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


@dataclasses.dataclass(frozen=True)
class Component:
    """Annotation metadata of a config field that holds a component (``{type: Name, ...}``) of
    some ``kind`` (or a list of them). Parsing checks only the shape; what the name means and
    which options it takes is checked against the registry of that kind by the builders
    (``seg_accel.validate``), so this layer needs no registry.

    ``many``: False, one mapping; True, a list; "either", one or a list. ``key``: the field
    naming the component (``policy`` for schedules)."""

    kind: str
    many: bool | str = False
    key: str = "type"

    def describe(self) -> str:
        one = f"a {self.kind} mapping ({{{self.key}: ...}})"
        if self.many is True:
            return f"a list of {self.kind} mappings"
        if self.many == "either":
            return f"{one} or a list of them"
        return one

    def items(self, value: Any, key: str | None) -> list[tuple[str | None, dict]]:
        """``(key, mapping)`` of each component in ``value`` (none for null)."""
        if value is None:
            return []
        if isinstance(value, (list, tuple)) and self.many:
            return [(join_key(key, i), item) for i, item in enumerate(value)]
        return [(key, value)]

    def check(self, value: Any, key: str | None) -> None:
        if value is None:
            return
        if isinstance(value, (list, tuple)) and not self.many or self.many is True and not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected {self.describe()}, got {_short(value)}", key=key)
        for item_key, item in self.items(value, key):
            if not isinstance(item, dict):
                raise ConfigError(f"expected a mapping with '{self.key}: <{self.kind} name>', got {_short(item)}",
                                  key=item_key)


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def components(section: Any, key: str | None = None) -> list[tuple[str | None, Any, Component]]:
    """Every ``Component`` field in a parsed section (recursively): ``(key, value, marker)``."""
    found = []
    if not dataclasses.is_dataclass(section):
        return found
    hints = typing.get_type_hints(type(section), include_extras=True)
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        field_key = join_key(key, f.name)
        tp = hints.get(f.name)
        if get_origin(tp) is typing.Annotated:
            found += [(field_key, value, m) for m in tp.__metadata__ if isinstance(m, Component)]
        if dataclasses.is_dataclass(value):
            found += components(value, field_key)
    return found


def describe(tp: Any) -> str:
    """A readable name for an annotation: 'float', 'list of int', "one of 'no', 'fp16'"."""
    origin = get_origin(tp)
    if tp is Any or tp is object:
        return "anything"
    if tp is _NONE or tp is None:
        return "null"
    if origin is typing.Annotated:
        meta = [m for m in tp.__metadata__ if hasattr(m, "describe")]
        return meta[0].describe() if meta else describe(get_args(tp)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        members = [a for a in get_args(tp) if not _yaml_cannot_make(a)] or list(get_args(tp))
        return " or ".join(dict.fromkeys(describe(a) for a in members))
    if origin in (list, tuple, cabc.Sequence, cabc.Iterable):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return "a list" + (f" of {_plural(args[0])}" if len(set(args)) == 1 else "")
    if origin in (dict, cabc.Mapping) or tp in (dict, cabc.Mapping):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if isinstance(tp, type):
        return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, tp.__name__)
    return str(tp)


def _plural(tp: Any) -> str:
    names = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
    return names.get(tp, describe(tp))


def _yaml_cannot_make(tp: Any) -> bool:
    """Classes like torch.Tensor that a YAML value can never be (left out of messages)."""
    return isinstance(tp, type) and tp.__module__.split(".")[0] in {"torch", "numpy"}


def type_hints(obj: Any) -> dict[str, Any]:
    """Annotations of ``obj`` resolved one by one: a name that does not resolve in
    third-party code costs only the check of that one parameter."""
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:  # fall back to resolving each annotation separately
        pass
    raw = getattr(obj, "__annotations__", {}) or {}
    namespace = dict(getattr(obj, "__globals__", {}) or {})
    namespace.update(vars(typing))
    hints = {}
    for name, annotation in raw.items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # noqa: S307 - annotations of installed code
            except Exception:
                continue
        hints[name] = annotation
    return hints


def _fail(value: Any, tp: Any, key: str | None) -> ConfigError:
    shown = _short(value)
    vtype = "null" if value is None else type(value).__name__
    return ConfigError(f"expected {describe(tp)}, got {shown} ({vtype})", key=key)


def _accepts_shape(value: Any, tp: Any) -> bool:
    """Whether ``tp`` is the kind of annotation that a value of this shape is meant for
    (used to pick the union member whose detailed error is worth showing)."""
    origin = get_origin(tp)
    if origin is typing.Annotated:
        return _accepts_shape(value, get_args(tp)[0]) or any(hasattr(m, "check") for m in tp.__metadata__)
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp) or origin in (dict, cabc.Mapping) or tp in (dict, cabc.Mapping)
    if isinstance(value, (list, tuple)):
        return origin in (list, tuple, cabc.Sequence, cabc.Iterable) or tp in (list, tuple)
    return False


def parse_value(value: Any, tp: Any, key: str | None) -> Any:
    """Return ``value`` (dataclass sections become instances) or raise ConfigError(key)."""
    if tp is Any or tp is object or tp is dataclasses.MISSING:
        return value
    origin = get_origin(tp)

    if origin is typing.Annotated:
        checkers = [m for m in tp.__metadata__ if hasattr(m, "check")]
        if checkers:
            for checker in checkers:
                checker.check(value, key)
            return value
        return parse_value(value, get_args(tp)[0], key)

    if origin in (Union, types.UnionType):
        members = get_args(tp)
        if value is None:
            if _NONE in members:
                return None
            raise _fail(value, tp, key)
        shaped = [m for m in members if m is not _NONE and _accepts_shape(value, m)]
        if len(shaped) == 1:  # the one member meant for a dict/list: its error is the useful one
            return parse_value(value, shaped[0], key)
        for member in members:
            try:
                return parse_value(value, member, key)
            except ConfigError:
                continue
        raise _fail(value, tp, key)

    if origin is Literal:
        choices = get_args(tp)
        if any(value == c and type(value) is type(c) for c in choices):
            return value
        hint = did_you_mean(str(value), [str(c) for c in choices], list_all=False) if isinstance(value, str) else ""
        raise ConfigError(f"expected {describe(tp)}, got {value!r}.{hint}".rstrip("."), key=key)

    if tp is _NONE or tp is None:
        if value is None:
            return None
        raise _fail(value, tp, key)

    if dataclasses.is_dataclass(tp):
        return parse_section(value, tp, key)

    if origin in (list, tuple, cabc.Sequence, cabc.Iterable, cabc.Collection) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(value, tp, key)
        args = get_args(tp)
        if origin is tuple and args and Ellipsis not in args:
            if len(value) != len(args):
                raise ConfigError(
                    f"expected a list of {len(args)} items ({describe(tp)}), got {len(value)}: {value!r}", key=key
                )
            return [parse_value(v, a, join_key(key, i)) for i, (v, a) in enumerate(zip(value, args))]
        elem = args[0] if args else Any
        return [parse_value(v, elem, join_key(key, i)) for i, v in enumerate(value)]

    if origin in (dict, cabc.Mapping, cabc.MutableMapping) or tp in (dict, cabc.Mapping):
        if not isinstance(value, dict):
            raise _fail(value, tp, key)
        args = get_args(tp)
        if len(args) == 2:
            return {k: parse_value(v, args[1], join_key(key, k)) for k, v in value.items()}
        return value

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(value, tp, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(value, tp, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise _fail(value, tp, key)
    if tp is str or tp is os.PathLike:
        if isinstance(value, str):
            return value
        raise _fail(value, tp, key)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if _yaml_cannot_make(tp):  # torch.Tensor, np.ndarray, ...: a YAML value is never one
            raise _fail(value, tp, key)
        return value
    return value  # annotations we do not understand are not held against the user


def parse_section(value: Any, cls: type, key: str | None) -> Any:
    """Parse a mapping into the dataclass ``cls``: unknown keys, missing keys and
    wrong types are errors naming the key."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"expected a mapping, got {value!r} ({type(value).__name__})", key=key)
    hints = typing.get_type_hints(cls, include_extras=True)
    # fields marked `resolved` are filled in by validation (e.g. the data's class names), not by the user
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("resolved")}
    # a field marked `extra` collects the keys the section does not know (a model's own options,
    # checked against its constructor by the builders)
    extra = next((f.name for f in fields.values() if f.metadata.get("extra")), None)
    for name in value:
        if name not in fields and extra is None or name == extra:
            where = f"'{key}'" if key else "the config"
            raise ConfigError(
                f"unknown key '{name}' in {where}." + did_you_mean(str(name), [f for f in fields if f != extra]),
                key=join_key(key, name),
            )
    kwargs = {}
    if extra is not None:
        kwargs[extra] = {k: v for k, v in value.items() if k not in fields}
    for name, field in fields.items():
        if name == extra:
            continue
        if name in value:
            kwargs[name] = parse_value(value[name], hints[name], join_key(key, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{name}'", key=join_key(key, name))
    instance = cls(**kwargs)
    post = getattr(instance, "validate", None)
    if post is not None:
        post(key)
    return instance
