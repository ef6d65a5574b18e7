"""Read MMSegmentation's Python configs (``.py``) without running them.

MMSegmentation executes its config files (``exec``); a config from elsewhere is code. Here a
``.py`` config is parsed with :mod:`ast` and evaluated over a closed subset of Python, the
part that configs use:

- literals (numbers, strings, ``True``/``False``/``None``), lists, tuples (read as lists),
  dict displays with string or integer keys, and calls of ``dict``, ``list`` and ``tuple``
  (``dict(type='Normalize', **img_norm_cfg)``: a mapping's keys, as MMSegmentation 0.x writes);
- names assigned earlier in the same file, then the top-level keys of its bases;
- ``+ - * / // % **`` on numbers, ``+`` on strings, lists and tuples, unary ``-``/``+``,
  indexing (``x[0]``, ``x['key']``, ``x[-1]``) and slicing of those values;
- ``_base_`` (a path or a list of paths), ``_delete_=True``, and the references to a base's
  key of MMSegmentation 1.x: ``{{_base_.key}}`` and ``_base_.key`` (``_base_.a.b[0]`` too).

Every other construct (an ``import``, a call of any other function, a lambda, a
comprehension, an f-string, attribute access, ``with read_base():`` of mmengine's new-style
configs, an ``if``, a ``def``) is a ConfigError naming the file, the line and the construct;
nothing is evaluated before the whole file has been checked. The size and nesting limits are
the YAML reader's.
"""
from __future__ import annotations

import ast
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seg_accel.config.limits import MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES
from seg_accel.errors import ConfigError

BASE_KEY = "_base_"
MAX_INT_BITS = 4096  # an integer larger than this is no config value (and 10**10**10 would not finish)
MAX_STRING = 2**20  # characters in one string built with +
ALLOWED_CALLS = ("dict", "list", "tuple")


@dataclass
class PyConfig:
    """What a ``.py`` config file holds: its bases, its top-level assignments (in file order)
    and the names it reads (assigned names used later, and ``_base_`` references)."""

    bases: list[str]
    values: dict[str, Any]
    names_read: set[str] = field(default_factory=set)
    lines: dict[str, int] = field(default_factory=dict)  # name -> the line of its last assignment


def _construct(node: ast.AST) -> str:
    """How an error names a construct."""
    names = {
        ast.Import: "an import", ast.ImportFrom: "an import", ast.Lambda: "a lambda", ast.ListComp: "a comprehension",
        ast.SetComp: "a comprehension", ast.DictComp: "a comprehension", ast.GeneratorExp: "a generator expression",
        ast.JoinedStr: "an f-string", ast.FormattedValue: "an f-string", ast.Attribute: "attribute access",
        ast.With: "a with block", ast.If: "an if statement", ast.IfExp: "a conditional expression",
        ast.FunctionDef: "a function definition", ast.AsyncFunctionDef: "a function definition",
        ast.ClassDef: "a class definition", ast.For: "a for loop", ast.While: "a while loop",
        ast.Try: "a try block", ast.Await: "await", ast.Yield: "yield", ast.NamedExpr: "an assignment expression",
        ast.Compare: "a comparison", ast.BoolOp: "and/or", ast.Starred: "unpacking (*x)", ast.Set: "a set",
        ast.Global: "global", ast.Nonlocal: "nonlocal", ast.Delete: "del", ast.Assert: "assert",
        ast.Raise: "raise", ast.Return: "return", ast.Subscript: "indexing",
    }
    for kind, name in names.items():
        if isinstance(node, kind):
            return name
    if isinstance(node, ast.Call):
        return f"a call of {ast.unparse(node.func)}()"
    return f"{type(node).__name__} ({ast.unparse(node)[:40]!r})" if hasattr(ast, "unparse") else type(node).__name__


class _Reader:
    def __init__(self, file: str, base_lookup: Callable[[str], Any] | None):
        self.file = file
        self.base_lookup = base_lookup
        self.env: dict[str, Any] = {}
        self.names_read: set[str] = set()

    # ------------------------------------------------------------------ errors
    def fail(self, node: ast.AST, message: str) -> ConfigError:
        line = getattr(node, "lineno", None)
        where = f"line {line}: " if line else ""
        return ConfigError(f"{where}{message}", file=self.file)

    def refuse(self, node: ast.AST, why: str = "") -> ConfigError:
        text = (f"{_construct(node)} is not allowed in a config: seg-accel reads .py configs without running "
                "them (literals, dict(), lists, names assigned above, arithmetic, + on strings and lists, "
                "indexing, _base_)")
        if why:
            text = f"{_construct(node)} is not allowed in a config: {why}"
        return self.fail(node, text)

    # ------------------------------------------------------------------ statements
    def statement(self, node: ast.stmt, index: int) -> tuple[str, Any] | None:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return None  # a docstring or a bare string
        if isinstance(node, ast.Pass):
            return None
        if isinstance(node, ast.With) and any(
                isinstance(item.context_expr, ast.Call) and ast.unparse(item.context_expr.func).endswith("read_base")
                for item in node.items):
            raise self.refuse(node, "`with read_base():` is mmengine's new-style (pure Python) config, which "
                              "imports modules; seg-accel reads the dict style (_base_ = [...], model = dict(...))")
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            raise self.refuse(node, "a config cannot import modules (custom_imports = dict(imports=[...]) "
                              "registers your own components)")
        if isinstance(node, ast.Assign):
            if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
                raise self.fail(node, "only `name = value` assignments are allowed in a config "
                                f"(not {ast.unparse(node.targets[0]) if node.targets else '?'} = ...)")
            name = node.targets[0].id
            value = self.expr(node.value, 0)
            self.env[name] = value
            return name, value
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
            if name not in self.env:
                raise self.fail(node, f"'{name}' is not assigned above")
            self.names_read.add(name)
            value = self.binop(node, self.env[name], node.op, self.expr(node.value, 0))
            self.env[name] = value
            return name, value
        raise self.refuse(node)

    # ------------------------------------------------------------------ expressions
    def expr(self, node: ast.expr, depth: int) -> Any:
        if depth > MAX_CONFIG_DEPTH:
            raise self.fail(node, f"the config nests deeper than {MAX_CONFIG_DEPTH} levels (MAX_CONFIG_DEPTH)")
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (bytes, complex)) or node.value is Ellipsis:
                raise self.refuse(node)
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.expr(item, depth + 1) for item in node.elts if not self._starred(item)]
        if isinstance(node, ast.Dict):
            out = {}
            for key, value in zip(node.keys, node.values):
                if key is None:
                    out.update(self.splat(value, depth))
                    continue
                k = self.expr(key, depth + 1)
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise self.fail(key, f"a key must be a string or an integer, got {k!r}")
                out[k] = self.expr(value, depth + 1)
            return out
        if isinstance(node, ast.Set):
            ref = self._base_reference(node)
            if ref is not None:
                return self.base_value(node, ref)
            raise self.refuse(node, "sets are not config values (use a list)")
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.Attribute):
            ref = self._attribute_path(node)
            if ref is not None and ref[0] == BASE_KEY:
                return self.base_value(node, ".".join(ref[1:]))
            raise self.refuse(node, "attribute access runs code; only `_base_.key` (a base's value) is read")
        if isinstance(node, ast.Call):
            return self.call(node, depth)
        if isinstance(node, ast.BinOp):
            return self.binop(node, self.expr(node.left, depth + 1), node.op, self.expr(node.right, depth + 1))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.expr(node.operand, depth + 1)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.fail(node, f"unary minus/plus needs a number, got {value!r}")
            return -value if isinstance(node.op, ast.USub) else +value
        if isinstance(node, ast.Subscript):
            return self.subscript(node, depth)
        raise self.refuse(node)

    def splat(self, node: ast.expr, depth: int) -> dict:
        """``dict(type='Normalize', **img_norm_cfg)``: the keys of a mapping value."""
        value = self.expr(node, depth + 1)
        if not isinstance(value, dict):
            raise self.fail(node, f"**{ast.unparse(node)} needs a mapping, got {type(value).__name__}")
        return dict(value)

    def _starred(self, node: ast.expr) -> bool:
        if isinstance(node, ast.Starred):
            raise self.refuse(node, "unpacking (*x) is not allowed in a config; write the list out or use +")
        return False

    def name(self, node: ast.Name) -> Any:
        if node.id in self.env:
            self.names_read.add(node.id)
            return self.env[node.id]
        if node.id == BASE_KEY:
            raise self.fail(node, "_base_ is read as `_base_.key` or {{_base_.key}}")
        if self.base_lookup is not None:
            found, value = self.base_lookup(node.id)
            if found:
                self.names_read.add(node.id)
                return value
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        raise self.fail(node, f"name '{node.id}' is not assigned above (in this file or a base)")

    def _attribute_path(self, node: ast.expr) -> list[str] | None:
        parts: list[str] = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            return [node.id, *reversed(parts)]
        return None

    def _base_reference(self, node: ast.Set) -> str | None:
        """``{{_base_.a.b}}`` (MMSegmentation 1.x): a set holding a set holding ``_base_.a.b``."""
        if len(node.elts) == 1 and isinstance(node.elts[0], ast.Set) and len(node.elts[0].elts) == 1:
            inner = node.elts[0].elts[0]
            path = self._attribute_path(inner) if isinstance(inner, ast.Attribute) else None
            if path and path[0] == BASE_KEY and len(path) > 1:
                return ".".join(path[1:])
        return None

    def base_value(self, node: ast.AST, dotted: str) -> Any:
        if self.base_lookup is None:
            raise self.fail(node, f"_base_.{dotted}: this file has no _base_")
        head, *rest = dotted.split(".")
        found, value = self.base_lookup(head)
        if not found:
            raise self.fail(node, f"_base_.{dotted}: the bases have no key '{head}'")
        self.names_read.add(head)
        for i, part in enumerate(rest):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise self.fail(node, f"_base_.{dotted}: '{'.'.join([head, *rest[:i]])}' has no '{part}'")
        import copy

        return copy.deepcopy(value)

    def call(self, node: ast.Call, depth: int) -> Any:
        func = node.func
        if not isinstance(func, ast.Name) or func.id not in ALLOWED_CALLS or func.id in self.env:
            raise self.refuse(node, "a config may call only dict(), list() and tuple(); nothing else runs")
        if func.id == "dict":
            if node.args:
                raise self.fail(node, "write dict(key=value, ...) (positional arguments are not read)")
            out = {}
            for kw in node.keywords:
                if kw.arg is None:
                    out.update(self.splat(kw.value, depth))
                    continue
                out[kw.arg] = self.expr(kw.value, depth + 1)
            return out
        if node.keywords or len(node.args) > 1:
            raise self.fail(node, f"{func.id}() takes one list or tuple here")
        if not node.args:
            return []
        value = self.expr(node.args[0], depth + 1)
        if not isinstance(value, list):
            raise self.fail(node, f"{func.id}() of {type(value).__name__} is not read (a list or tuple only)")
        return list(value)

    def binop(self, node: ast.AST, left: Any, op: ast.operator, right: Any) -> Any:
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
        symbol = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
                  ast.Pow: "**"}.get(type(op))
        if symbol is None:
            raise self.fail(node, f"the operator {type(op).__name__} is not allowed in a config")
        if not numbers:
            same = type(left) is type(right) and isinstance(left, (str, list))
            if symbol != "+" or not same:
                raise self.fail(node, f"{type(left).__name__} {symbol} {type(right).__name__} is not allowed in a "
                                "config (+ - * / // % ** on numbers, + on two strings or two lists)")
            result = left + right
            limit = MAX_STRING if isinstance(result, str) else self._max_values()
            if len(result) > limit:
                unit = "characters" if isinstance(result, str) else "items"
                raise self.fail(node, f"the value grows past {limit:,} {unit}")
            return result
        if symbol == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and \
                max(abs(left).bit_length(), 1) * right > MAX_INT_BITS:
            raise self.fail(node, f"{left} ** {right} is too large for a config value")
        try:
            result = {"+": lambda: left + right, "-": lambda: left - right, "*": lambda: left * right,
                      "/": lambda: left / right, "//": lambda: left // right, "%": lambda: left % right,
                      "**": lambda: left**right}[symbol]()
        except ZeroDivisionError as exc:
            raise self.fail(node, f"division by zero ({left} {symbol} {right})") from exc
        except OverflowError as exc:
            raise self.fail(node, f"{left} {symbol} {right} overflows") from exc
        if isinstance(result, complex):
            raise self.fail(node, f"{left} {symbol} {right} is a complex number")
        if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
            raise self.fail(node, f"{left} {symbol} {right} is too large for a config value")
        if isinstance(result, float) and not math.isfinite(result) and math.isfinite(left) and math.isfinite(right):
            raise self.fail(node, f"{left} {symbol} {right} overflows")
        return result

    def _max_values(self) -> int:
        return MAX_CONFIG_VALUES

    def subscript(self, node: ast.Subscript, depth: int) -> Any:
        value = self.expr(node.value, depth + 1)
        if isinstance(node.slice, ast.Slice):
            parts = [None if p is None else self.expr(p, depth + 1) for p in (node.slice.lower, node.slice.upper,
                                                                               node.slice.step)]
            if any(p is not None and (isinstance(p, bool) or not isinstance(p, int)) for p in parts):
                raise self.fail(node, "a slice takes integers")
            if not isinstance(value, (list, str)):
                raise self.fail(node, f"cannot slice {type(value).__name__}")
            if parts[2] == 0:
                raise self.fail(node, "a slice step cannot be zero")
            return value[slice(*parts)]
        index = self.expr(node.slice, depth + 1)
        try:
            if isinstance(value, dict):
                return value[index]
            if isinstance(value, (list, str)) and isinstance(index, int) and not isinstance(index, bool):
                return value[index]
        except (KeyError, IndexError) as exc:
            raise self.fail(node, f"{ast.unparse(node)}: no item {index!r}") from exc
        raise self.fail(node, f"cannot index {type(value).__name__} with {index!r}")


def _count_values(value: Any, file: str) -> None:
    """Expanded size of the evaluated values (a name used ten times in ten nested lists is
    10**n values once written out), checked against MAX_CONFIG_VALUES without expanding."""
    sizes: dict[int, int] = {}

    def size(obj: Any, depth: int) -> int:
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"the config nests deeper than {MAX_CONFIG_DEPTH} levels (MAX_CONFIG_DEPTH)", file=file)
        if not isinstance(obj, (dict, list)):
            return 1
        if id(obj) in sizes:
            return sizes[id(obj)]
        children = obj.values() if isinstance(obj, dict) else obj
        total = 1 + sum(size(child, depth + 1) for child in children)
        if total > MAX_CONFIG_VALUES:
            raise ConfigError(f"the config expands to more than {MAX_CONFIG_VALUES:,} values (MAX_CONFIG_VALUES): a "
                              "name used many times repeats its value; a config is far smaller", file=file)
        sizes[id(obj)] = total
        return total

    size(value, 0)


def _parse(path: Path, text: str) -> ast.Module:
    try:
        return ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"line {exc.lineno}: Python syntax error: {exc.msg}", file=str(path)) from exc
    except (RecursionError, MemoryError, ValueError) as exc:
        raise ConfigError(f"the file cannot be parsed ({type(exc).__name__}: it nests too deeply or holds a null "
                          "byte)", file=str(path)) from exc


def _check_tree(tree: ast.Module, reader: _Reader) -> None:
    """Refuse any construct outside the subset before anything is evaluated (so that nothing of
    a refused file is used, not even the lines above the refused one)."""
    allowed = (ast.Module, ast.Assign, ast.AugAssign, ast.Expr, ast.Pass, ast.Name, ast.Load, ast.Store, ast.Constant,
               ast.List, ast.Tuple, ast.Dict, ast.Call, ast.keyword, ast.BinOp, ast.UnaryOp, ast.Subscript,
               ast.Slice, ast.operator, ast.unaryop, ast.Set, ast.Attribute)
    operators = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.With)):
            reader.statement(stmt, 0)  # raises its own message
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            raise reader.refuse(node)
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and not isinstance(node.op, operators):
            raise reader.fail(node, f"the operator {type(node.op).__name__} is not allowed in a config "
                              "(+ - * / // % ** on numbers, + on strings and lists)")
        if isinstance(node, ast.UnaryOp) and not isinstance(node.op, (ast.USub, ast.UAdd)):
            raise reader.fail(node, f"the operator {type(node.op).__name__} is not allowed in a config "
                              "(unary - and + on numbers)")
        if isinstance(node, ast.Call) and (not isinstance(node.func, ast.Name) or node.func.id not in ALLOWED_CALLS):
            raise reader.refuse(node, "a config may call only dict(), list() and tuple(); nothing else runs")
        if isinstance(node, ast.Attribute):
            path = reader._attribute_path(node)
            if path is None or path[0] != BASE_KEY:
                raise reader.refuse(node, "attribute access runs code; only `_base_.key` (a base's value) is read")
        if isinstance(node, ast.Expr) and not (isinstance(node.value, ast.Constant) and isinstance(node.value.value,
                                                                                                    str)):
            raise reader.refuse(node.value, "a config holds assignments only (`name = value`)")


def read_bases(path: Path, text: str) -> list[str]:
    """The file's ``_base_`` (a literal path or list of paths), read before anything else."""
    tree = _parse(path, text)
    reader = _Reader(str(path), None)
    _check_tree(tree, reader)
    bases: Any = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
                and stmt.targets[0].id == BASE_KEY:
            bases = reader.expr(stmt.value, 0)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"'{BASE_KEY}' must be a path or a list of paths, got {bases!r}", key=BASE_KEY,
                          file=str(path))
    return bases


def read_py_config(path: Path, text: str, base_lookup: Callable[[str], tuple[bool, Any]] | None) -> PyConfig:
    """Evaluate the file's assignments; ``base_lookup(name)`` gives ``(found, value)`` for a
    top-level key of the merged bases."""
    tree = _parse(path, text)
    reader = _Reader(str(path), base_lookup)
    _check_tree(tree, reader)
    values: dict[str, Any] = {}
    bases: list[str] = []
    lines: dict[str, int] = {}
    for index, stmt in enumerate(tree.body):
        assigned = reader.statement(stmt, index)
        if assigned is None:
            continue
        name, value = assigned
        lines[name] = stmt.lineno
        if name == BASE_KEY:
            bases = [value] if isinstance(value, str) else value
            continue
        values.pop(name, None)
        values[name] = value
    _count_values(values, str(path))
    return PyConfig(bases=bases, values=_fresh(values), names_read=reader.names_read, lines=lines)


def _fresh(value: Any) -> Any:
    """A tree copy: a name used in two places becomes two values (later merges edit one only)."""
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    return value
