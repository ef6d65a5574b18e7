"""Load YAML configs: ``_base_`` inheritance, ``_delete_``, ``--cfg-options``, ``custom_imports``.

Every resolved key remembers the file it came from (``Config.origin``), so
that errors later on can name both the dotted key and the file.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seg_accel.config import pyconfig
from seg_accel.config.limits import (  # noqa: F401  (MAX_*: part of this module's interface)
    DELETE_KEY,
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    MAX_CONFIG_VALUES,
    PACKAGED_CONFIGS,
    forget_origins,
    record_origins,
)
from seg_accel.config.vocabulary import translate
from seg_accel.errors import ConfigError

BASE_KEY = "_base_"
PACKAGE_PREFIX = "seg_accel::"  # `_base_: seg_accel::_base_/models/segformer_tiny.yaml`: a config shipped with seg-accel
CFG_OPTIONS = "--cfg-options"

logger = logging.getLogger("seg_accel")


@dataclass
class Config:
    """A resolved config: the plain nested dict plus where each key came from."""

    dict: dict[str, Any]
    filename: str
    origins: dict[str, str] = field(default_factory=dict)
    # what was translated from MMSegmentation's vocabulary (1.x keys, .py variables), and notices
    mapped: Any = None
    notices: list[str] = field(default_factory=list)

    def origin(self, key: str | None) -> str:
        """The file that set ``key`` (or its closest parent); the main file otherwise."""
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return self.filename

    def get(self, key: str, default: Any = None) -> Any:
        return self.dict.get(key, default)

    def dump(self, **overrides: Any) -> str:
        """The config as YAML, with top-level ``overrides`` (e.g. the resolved ``work_dir``)."""
        data = {**self.dict, **overrides}
        return yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=None, width=100)

    def save(self, path: str | os.PathLike, **overrides: Any) -> None:
        Path(path).write_text(self.dump(**overrides))

    @contextlib.contextmanager
    def errors_located(self) -> Iterator[None]:
        """Give every ConfigError raised inside the file its key came from."""
        try:
            yield
        except ConfigError as exc:
            if exc.file is None:
                exc.file = self.origin(exc.key)
            raise


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj




class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when installed
    """safe_load that refuses duplicate keys in one mapping (YAML would keep the last silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _expanded_size(root: yaml.Node, file: str) -> int:
    """How many values the document has once its aliases are expanded (an alias names a node that
    is composed once but stands in several places: nine levels of ten aliases make 10**9 values
    out of a few hundred bytes). Counted on the composed graph, each node once; a cycle or a
    nesting deeper than ``MAX_CONFIG_DEPTH`` is an error."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 0, False)]
    active: set[int] = set()
    while stack:
        node, depth, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children = [x for pair in node.value for x in pair] if isinstance(node, yaml.MappingNode) else \
            list(node.value) if isinstance(node, yaml.SequenceNode) else []
        if not children_done:
            if depth > MAX_CONFIG_DEPTH:
                raise ConfigError(f"the YAML nests deeper than {MAX_CONFIG_DEPTH} levels (MAX_CONFIG_DEPTH)", file=file)
            if id(node) in active:
                raise ConfigError(f"the YAML refers to itself (a recursive alias at line {node.start_mark.line + 1})",
                                  file=file)
            active.add(id(node))
            stack.append((node, depth, True))
            stack.extend((child, depth + 1, False) for child in children if id(child) not in sizes)
            continue
        active.discard(id(node))
        sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
        if sizes[id(node)] > MAX_CONFIG_VALUES:
            raise ConfigError(f"the YAML expands to more than {MAX_CONFIG_VALUES:,} values (MAX_CONFIG_VALUES): "
                              "aliases (*name) repeat their anchor's content; a config is far smaller", file=file)
    return sizes[id(root)]


def load_yaml(text: str, file: str) -> Any:
    """``text`` parsed safely (no duplicate keys, aliases and nesting within the limits)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, file)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"the file is {size / 2**20:.1f} MiB; a config may be at most "
                              f"{MAX_CONFIG_BYTES // 2**20} MiB (MAX_CONFIG_BYTES)", file=str(path))
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", file=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not a text file ({exc.reason} at byte {exc.start})", file=str(path)) from exc


def _read_yaml(path: Path) -> dict:
    text = _read_text(path)
    try:
        data = load_yaml(text, str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"YAML syntax error{where}: {problem}", file=str(path)) from exc
    except RecursionError as exc:
        raise ConfigError("the YAML nests too deeply to read", file=str(path)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config file must be a YAML mapping, got {type(data).__name__}", file=str(path))
    return data


_record = record_origins
_forget = forget_origins


def _strip_delete(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_delete(v) for k, v in obj.items() if k != DELETE_KEY}
    if isinstance(obj, list):
        return [_strip_delete(v) for v in obj]
    return obj


def _merge(base: dict, child: dict, prefix: str, file: str, origins: dict[str, str]) -> None:
    """Merge ``child`` (raw, from ``file``) into ``base`` in place.

    Dicts merge recursively unless the child dict has ``_delete_: true``;
    everything else, lists included, replaces the base value whole (so does a
    dict over a null base value).
    """
    for k, v in child.items():
        if k == DELETE_KEY:
            continue
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and base.get(k) is not None and not v.get(DELETE_KEY, False):
            if not isinstance(base[k], dict):
                raise ConfigError(
                    f"'{k}' is a mapping here but {base[k]!r} ({type(base[k]).__name__}) in the base config "
                    f"({origins.get(key, 'base')}); set '{DELETE_KEY}: true' in it to replace the base value",
                    key=key,
                    file=file,
                )
            origins[key] = file
            _merge(base[k], v, key, file, origins)
        else:
            _forget(key, origins)
            base[k] = _strip_delete(v)
            _record(v, key, file, origins)


def packaged_config(name: str) -> Path:
    """A config shipped with seg-accel: by its path under ``configs/`` (``segformer/x.yaml``) or
    by its name alone (``pspnet_r50-d8_512x1024_40k_cityscapes``, MMSegmentation's file names)."""
    for candidate in (PACKAGED_CONFIGS / name, PACKAGED_CONFIGS / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    if "/" not in name:
        found = sorted(PACKAGED_CONFIGS.rglob(f"{name.removesuffix('.yaml')}.yaml"))
        if len(found) == 1:
            return found[0]
    return PACKAGED_CONFIGS / name


CONFIG_SUFFIXES = (".yaml", ".yml", ".py")
# seg-accel's own top-level keys: --cfg-options on them apply after the 1.x translation
_OWN_KEYS = ("model", "data", "optimizer", "runner", "lr_config", "momentum_config", "optimizer_config", "log_config",
             "checkpoint_config", "evaluation", "custom_hooks", "workflow")


@dataclass
class _Reading:
    """What reading a config and its bases found beside the values: the top-level names that
    ``.py`` files assigned (MMSegmentation's variables among them), the names they read, and
    notices."""

    py_names: dict[str, str] = field(default_factory=dict)  # name -> the .py file that assigned it last
    names_read: set[str] = field(default_factory=set)
    notices: list[str] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # "<file>:<name>" -> line of the assignment


def _base_path(base: str, path: Path, reading: _Reading) -> Path:
    if base.startswith(PACKAGE_PREFIX):
        return packaged_config(base[len(PACKAGE_PREFIX):]).resolve()
    found = (path.parent / base).resolve()
    if not found.is_file() and path.suffix == ".py":
        # MMSegmentation's `_base_ = './pspnet_r50-d8_512x1024_40k_cityscapes.py'`: a config seg-accel ships
        # under that file name, when the user's folder has no such file
        stem = Path(base).name.removesuffix(".py").removesuffix(".yaml")
        shipped = packaged_config(stem)
        if shipped.is_file():
            reading.notices.append(f"{path.name}: _base_ '{base}' is not beside the file; using seg-accel's "
                                   f"seg_accel::{stem}")
            return shipped.resolve()
    return found


def _load_file(path: Path, stack: tuple[Path, ...], reading: _Reading | None = None) -> tuple[dict, dict[str, str]]:
    reading = reading if reading is not None else _Reading()
    path = path.resolve()
    file = str(path)
    if path.suffix == ".py":
        text = _read_text(path)
        bases = pyconfig.read_bases(path, text)
        raw = None
    else:
        raw = _read_yaml(path)
        bases = raw.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"'{BASE_KEY}' must be a path or a list of paths, got {bases!r}", key=BASE_KEY, file=file)

    merged: dict = {}
    origins: dict[str, str] = {}
    base_of_key: dict[str, str] = {}
    for base in bases:
        base_path = _base_path(base, path, reading)
        if base_path in stack or base_path == path:
            chain = " -> ".join(str(p) for p in (*stack, path, base_path))
            raise ConfigError(f"_base_ cycle: {chain}", key=BASE_KEY, file=file)
        if not base_path.is_file():
            raise ConfigError(
                f"base config '{base}' not found (looked for {base_path})", key=BASE_KEY, file=file
            )
        if base_path.suffix not in CONFIG_SUFFIXES:
            raise ConfigError(f"base config '{base}': config files are YAML (.yaml/.yml) or Python (.py)",
                              key=BASE_KEY, file=file)
        base_dict, base_origins = _load_file(base_path, (*stack, path), reading)
        for k in base_dict:
            if k in merged:
                raise ConfigError(
                    f"top-level key '{k}' is set by two sibling bases, {base_of_key[k]} and {base_path}; "
                    "a key may come from only one base of the same file",
                    key=BASE_KEY,
                    file=file,
                )
            base_of_key[k] = str(base_path)
        merged.update(base_dict)
        origins.update(base_origins)

    if raw is None:
        def lookup(name: str) -> tuple[bool, Any]:
            return (name in merged, merged.get(name))

        py = pyconfig.read_py_config(path, text, lookup if bases else None)
        raw = py.values
        reading.py_names.update({name: file for name in raw})
        reading.names_read |= py.names_read
        reading.lines.update({f"{file}:{name}": line for name, line in py.lines.items()})
    if raw.get(DELETE_KEY, False):
        merged, origins = {}, {}
    _merge(merged, raw, "", file, origins)
    return merged, origins


# --------------------------------------------------------------------------- --cfg-options
def _split_top_level(text: str, option: str) -> list[str]:
    parts, depth, start = [], 0, 0
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"unbalanced brackets in '{option}'", key=CFG_OPTIONS)
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0 or quote:
        raise ConfigError(f"unbalanced {'quotes' if quote else 'brackets'} in '{option}'", key=CFG_OPTIONS)
    parts.append(text[start:])
    return parts


def _parse_atom(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    low = text.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low in ("null", "none", "~"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_option_value(text: str, option: str = "") -> Any:
    """'1' -> 1, '1e-4' -> 1e-4, 'true' -> True, 'null' -> None, '[1,(2,3)]' -> [1, [2, 3]], 'a,b' -> ['a', 'b'],
    and YAML flow mappings: '{type: DiceLoss, loss_weight: 3}' (also inside lists)."""
    option = option or text
    text = text.strip()
    if text[:1] == "{":
        if text[-1:] != "}":
            raise ConfigError(f"malformed mapping in '{option}': '{text}' does not end with '}}'", key=CFG_OPTIONS)
        _split_top_level(text, option)  # balance check
        try:
            value = load_yaml(text, CFG_OPTIONS)
        except yaml.YAMLError as exc:
            raise ConfigError(f"malformed mapping in '{option}': {getattr(exc, 'problem', None) or exc}",
                              key=CFG_OPTIONS) from exc
        if not isinstance(value, dict):
            raise ConfigError(f"malformed mapping in '{option}': '{text}'", key=CFG_OPTIONS)
        return value
    if text[:1] in "[(":
        close = "]" if text[0] == "[" else ")"
        if text[-1:] != close:
            raise ConfigError(f"malformed list in '{option}': '{text}' does not end with '{close}'", key=CFG_OPTIONS)
        inner = text[1:-1].strip()
        if not inner:
            return []
        _split_top_level(text, option)  # balance check of the whole value
        return [parse_option_value(p, option) for p in _split_top_level(inner, option) if p.strip() != ""]
    if text[:1] in "])}":
        raise ConfigError(f"unbalanced brackets in '{option}'", key=CFG_OPTIONS)
    parts = _split_top_level(text, option)
    if len(parts) > 1:
        return [parse_option_value(p, option) for p in parts if p.strip() != ""]
    return _parse_atom(text)


def parse_cfg_options(options: list[str] | None) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; a malformed one is a ConfigError naming it."""
    parsed = []
    for option in options or []:
        if "=" not in option:
            raise ConfigError(f"malformed option '{option}': expected KEY=VALUE (e.g. optimizer.lr=0.01)", key=CFG_OPTIONS)
        key, _, value = option.partition("=")
        key = key.strip()
        if not key or any(part == "" for part in key.split(".")):
            raise ConfigError(f"malformed option '{option}': empty key or key part", key=CFG_OPTIONS)
        if value.strip() == "":
            raise ConfigError(f"malformed option '{option}': missing value after '='", key=CFG_OPTIONS)
        parsed.append((key, parse_option_value(value, option)))
    return parsed


def apply_option(cfg: dict, key: str, value: Any, origins: dict[str, str], origin: str = CFG_OPTIONS) -> None:
    parts = key.split(".")
    node: Any = cfg
    walked: list[str] = []
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(walked) or "<root>"
        if isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise ConfigError(f"'{here}' is a list; use a number to index it, not '{part}'", key=CFG_OPTIONS)
            idx = int(part)
            if not -len(node) <= idx < len(node):
                raise ConfigError(f"index {idx} out of range for '{here}' (length {len(node)})", key=CFG_OPTIONS)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if part not in node or node[part] is None:
                    node[part] = {}
                    origins[".".join([*walked, part])] = origin  # a mapping the option created
                node = node[part]
        else:
            raise ConfigError(
                f"cannot set '{key}': '{here}' is {node!r} ({type(node).__name__}), not a mapping or list",
                key=CFG_OPTIONS,
            )
        walked.append(part)
    _forget(key, origins)
    _record(value, key, origin, origins)


# --------------------------------------------------------------------------- custom_imports
def import_custom_modules(cfg: Config) -> list[str]:
    """Import ``custom_imports.imports`` so that their ``@register`` decorators run."""
    section = cfg.dict.get("custom_imports")
    if section is None:
        return []
    file = cfg.origin("custom_imports")
    if not isinstance(section, dict):
        raise ConfigError("expected a mapping {imports: [...], allow_failed_imports: false}", key="custom_imports", file=file)
    unknown = set(section) - {"imports", "allow_failed_imports"}
    if unknown:
        raise ConfigError(
            f"unknown key(s) {sorted(unknown)}; expected 'imports' and 'allow_failed_imports'",
            key="custom_imports",
            file=file,
        )
    imports = section.get("imports", [])
    if isinstance(imports, str):
        imports = [imports]
    allow_failed = section.get("allow_failed_imports", False)
    if not isinstance(imports, list) or not all(isinstance(m, str) for m in imports):
        raise ConfigError(f"expected a module name or a list of them, got {imports!r}", key="custom_imports.imports", file=file)
    if not isinstance(allow_failed, bool):
        raise ConfigError(f"expected true/false, got {allow_failed!r}", key="custom_imports.allow_failed_imports", file=file)
    cwd = os.getcwd()
    if cwd not in sys.path:  # modules next to where the user runs the command are importable
        sys.path.append(cwd)
    imported = []
    for i, module in enumerate(imports):
        key = f"custom_imports.imports.{i}"
        try:
            importlib.import_module(module)
            imported.append(module)
        except Exception as exc:  # the user's module: ImportError, but also a SyntaxError or any error it raises
            if allow_failed:
                logger.warning("custom_imports: could not import %s (%s); continuing (allow_failed_imports)", module, exc)
                continue
            if isinstance(exc, ImportError):
                reason = f"{exc}. It must be importable from the current directory or PYTHONPATH"
            elif isinstance(exc, SyntaxError):
                reason = f"SyntaxError in {exc.filename}, line {exc.lineno}: {exc.msg}"
            else:
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                reason = f"it raised {type(exc).__name__}: {exc} ({frame.filename}, line {frame.lineno})"
            raise ConfigError(f"cannot import module '{module}': {reason}", key=key, file=cfg.origin(key)) from exc
    return imported


# --------------------------------------------------------------------------- entry point
def load_config(path: str | os.PathLike, cfg_options: list[str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Read ``path`` with its bases, apply ``--cfg-options``, then ``overrides`` (typed values
    of top-level keys set by command-line flags such as ``--load-from``), and run
    ``custom_imports``. ``seg_accel::NAME`` is a config shipped with seg-accel."""
    text = str(path)
    path = packaged_config(text[len(PACKAGE_PREFIX):]) if text.startswith(PACKAGE_PREFIX) else Path(path)
    if not path.is_file():
        from seg_accel.errors import did_you_mean

        hint = did_you_mean(text[len(PACKAGE_PREFIX):], [p.stem for p in PACKAGED_CONFIGS.rglob("*.yaml")],
                            list_all=False) if text.startswith(PACKAGE_PREFIX) else ""
        raise ConfigError(f"config file not found: {text}" + hint)
    if path.suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"config files are YAML (.yaml/.yml) or MMSegmentation's Python (.py), got '{path.name}'",
                          file=str(path))
    reading = _Reading()
    data, origins = _load_file(path, (), reading)
    data = copy.deepcopy(data)
    options = parse_cfg_options(cfg_options)
    # an option on a key the file has (a 1.x key of a 1.x config too) applies before the translation,
    # any other (seg-accel's keys) after it
    early = [(k, v) for k, v in options if k.split(".")[0] in data and k.split(".")[0] not in _OWN_KEYS]
    for key, value in early:
        apply_option(data, key, value, origins)
    data, origins, mapped = translate(data, origins, reading.py_names, reading.names_read, str(path.resolve()),
                                      reading.lines)
    for key, value in options:
        if (key, value) not in early:
            apply_option(data, key, value, origins)
    for key, value in (overrides or {}).items():
        apply_option(data, key, value, origins, origin="--" + key.replace("_", "-"))
    cfg = Config(dict=data, filename=str(path.resolve()), origins=origins, mapped=mapped,
                 notices=reading.notices + mapped.notices)
    for line in cfg.notices:
        logger.info("config: %s", line)
    import_custom_modules(cfg)
    return cfg


def default_work_dir(config_path: str | os.PathLike) -> str:
    return str(Path("work_dirs") / Path(config_path).stem)


def resolve_work_dir(cfg: Config, cli_work_dir: str | None) -> str:
    """``--work-dir`` beats the ``work_dir`` key, which beats ``work_dirs/<config name>``."""
    if cli_work_dir:
        return cli_work_dir
    value = cfg.dict.get("work_dir")
    if value is not None:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"expected a directory path, got {value!r}", key="work_dir", file=cfg.origin("work_dir"))
        return value
    return default_work_dir(cfg.filename)
