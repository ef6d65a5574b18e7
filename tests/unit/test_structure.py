"""The package's import structure, read from the source with ``ast`` (no import runs): the config
layer is data only, and the subpackages form layers without cycles."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "seg_accel"
# lower layers first; a module may import from its own layer's package and from lower layers
LAYERS = [["errors", "threads"], ["config"], ["registry"], ["data", "losses", "metrics", "optim"], ["models"], ["engine"],
          ["hub"], ["cli", "train", "evaluate", "predict", "__main__"]]


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
    for path in (PACKAGE / "engine").glob("*.py"):
        assert len(path.read_text().splitlines()) < 400, path.name


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) < 250
