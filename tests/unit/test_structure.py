"""The package's import structure, read from the source with ``ast`` (no import runs): the config
layer is data only, the subpackages form layers, and no module imports itself through others
(imports inside functions count; those under ``if TYPE_CHECKING:`` do not)."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "seg_accel"
# lower layers first; a module may import from its own layer's package and from lower layers
LAYERS = [["errors", "threads", "version", "logits"], ["config"], ["registry"], ["data", "losses", "metrics", "optim", "runtime"],
          ["models"], ["validate"], ["inference"], ["engine"], ["hub"], ["cli", "train", "evaluate", "predict", "__main__"]]


def unit_of(path: Path) -> str:
    """``config`` for seg_accel/config/*.py, ``registry`` for seg_accel/registry.py."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_units(path: Path) -> set[str]:
    """The seg_accel subpackages/modules a file imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            # `from seg_accel import __version__` names the root package, which imports nothing itself
            if parts[0] == "seg_accel" and len(parts) > 1 and ((PACKAGE / parts[1]).is_dir()
                                                               or (PACKAGE / f"{parts[1]}.py").is_file()):
                found.add(parts[1])
    return found


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if "configs" in path.relative_to(PACKAGE).parts or path.name == "__init__.py" and path.parent == PACKAGE:
            continue
        unit = unit_of(path)
        edges.setdefault(unit, set()).update(u for u in imported_units(path) if u != unit)
    return edges


def test_the_config_layer_imports_nothing_above_it():
    for path in (PACKAGE / "config").rglob("*.py"):
        above = imported_units(path) - {"config", "errors"}
        assert not above, f"{path.relative_to(REPO)} imports seg_accel.{sorted(above)}"


def test_no_import_cycle_among_config_engine_models_hub():
    edges = graph()
    core = {"config", "engine", "models", "hub"}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == target:
                return True
            if nxt not in seen:
                seen.add(nxt)
                if reaches(nxt, target, seen):
                    return True
        return False

    cycles = [unit for unit in sorted(core) if reaches(unit, unit, set())]
    assert not cycles, f"import cycles through {cycles}: {edges}"


def test_every_import_goes_down_the_layers():
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    edges = graph()
    assert set(edges) <= set(layer), f"units without a layer: {set(edges) - set(layer)}"
    upward = [(a, b) for a, targets in edges.items() for b in targets if layer[b] > layer[a]]
    assert not upward, f"imports that go up a layer: {upward}"


def test_the_checker_sees_function_level_imports(tmp_path):
    """The walk finds imports inside functions too (lazy imports are still dependencies)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from seg_accel.engine.trainer import Trainer\n    import seg_accel.hub.push\n")
    assert imported_units(probe) == {"engine", "hub"}


def test_the_loop_is_short_and_the_engine_files_small():
    """The training loop (Trainer.train and Trainer.train_iter) fits on a screen; no engine file
    grows into a 600-line runner again."""
    tree = ast.parse((PACKAGE / "engine" / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    methods = {n.name: n for n in trainer.body if isinstance(n, ast.FunctionDef)}
    loop = sum(methods[name].end_lineno - methods[name].lineno + 1 for name in ("train", "train_iter"))
    assert loop < 80, loop
    for path in [*(PACKAGE / "engine").glob("*.py"), *(PACKAGE / "inference").glob("*.py")]:
        assert len(path.read_text().splitlines()) < 400, path.name


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) < 250


# --------------------------------------------------------------------------- module-level cycles
def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "configs" not in p.relative_to(PACKAGE).parts}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """The nodes under ``if TYPE_CHECKING:`` (imports for annotations only, never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def module_imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The seg_accel modules a file imports at run time, anywhere in it: ``from P import name``
    counts as an import of ``P.name`` when that is a module, else of ``P``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped, name = _type_checking_only(tree), module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in known:
                    found.add(target)
                elif base in known:
                    found.add(base)
    return found - {name}


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others_at_run_time():
    known = modules()
    edges = {name: module_imports(path, known) for name, path in known.items()}
    assert "seg_accel.inference.predict" in edges["seg_accel"] and "seg_accel.models" in edges["seg_accel"]
    assert not import_cycles(edges), import_cycles(edges)


def test_the_cycle_checker_finds_cycles_through_function_level_imports_and_skips_type_checking(tmp_path):
    probe = tmp_path / "seg_accel" / "pkg"
    probe.mkdir(parents=True)
    (probe / "__init__.py").write_text("")
    (probe / "a.py").write_text("def f():\n    from seg_accel.pkg import b\n")
    (probe / "b.py").write_text("from seg_accel.pkg.a import f\n")
    (probe / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from seg_accel.pkg import a\n")
    known = {f"seg_accel.pkg.{n}": probe / f"{n}.py" for n in "abc"}
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        edges = {name: module_imports(path, known) for name, path in known.items()}
    finally:
        REPO = saved
    assert edges == {"seg_accel.pkg.a": {"seg_accel.pkg.b"}, "seg_accel.pkg.b": {"seg_accel.pkg.a"},
                     "seg_accel.pkg.c": set()}
    assert import_cycles(edges) == [["seg_accel.pkg.a", "seg_accel.pkg.b"]]


def test_the_architecture_page_draws_these_layers():
    """docs/architecture.md's picture of the layers stacks the units as LAYERS does (top layer first)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    picture = text.split("```text\n", 1)[1].split("```", 1)[0].splitlines()

    def row(unit: str) -> int:
        rows = [i for i, line in enumerate(picture) if f"{unit}/" in line.split("   ")[0] or f"{unit}.py" in line]
        assert rows, f"{unit} is not in the picture"
        return rows[0]

    rows = [{row(unit) for unit in units} for units in LAYERS]
    assert all(len(r) == 1 for r in rows), rows  # a layer's units share one row
    order = [min(r) for r in rows]
    assert order == sorted(order, reverse=True), order  # lowest layer at the bottom
