"""The checkpoint folder format, as every command reads it: the file names, which folders are
complete saves, finding them (newest, periodic) and the weights a work dir offers. Writing and resuming is the trainer's
(``seg_accel.engine.checkpoint``)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from seg_accel.errors import ConfigError
from seg_accel.runtime.manifest import MANIFEST
from seg_accel.runtime.workdir import FINAL_DIR

META = "meta.json"
RUNNER_STATE = "runner_state.json"
CHECKPOINT_CONFIG = "run_config.yaml"  # the resolved config of the run that saved it (not config.yaml: that marks a work dir)
PARTIAL = ".seg_accel_partial"  # marks a checkpoint being written: only such folders are cleaned up
EXPORT_SUBDIR = "pretrained"  # a checkpoint's own export (best checkpoints, Hub pushes)
_PERIODIC = re.compile(r"^(iter|epoch)_(\d+)$")


def checkpoint_age(path: Path) -> tuple[int, bool]:
    """(iteration, not a best one): newest last. A damaged meta.json falls back to the number in
    the name (the manifest check tells whether the checkpoint can be used)."""
    try:
        iteration = int(json.loads((path / META).read_text())["iter"])
    except (OSError, ValueError, KeyError, TypeError):
        numbers = re.findall(r"\d+", path.name)
        iteration = int(numbers[-1]) if numbers else -1
    return iteration, not path.name.startswith("best_")


def is_complete(path: Path) -> bool:
    """A finished save: renamed, with its manifest (written last) and ``meta.json``."""
    return path.is_dir() and (path / MANIFEST).is_file() and (path / META).is_file() and not path.name.startswith(".")


def complete_checkpoints(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if is_complete(p)] if folder.is_dir() else []


def periodic_checkpoints(folder: Path) -> list[Path]:
    """``iter_*``/``epoch_*`` checkpoints, oldest first (by their number)."""
    found = [p for p in complete_checkpoints(folder) if _PERIODIC.match(p.name)]
    return sorted(found, key=lambda p: int(_PERIODIC.match(p.name).group(2)))


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (by its saved iteration), ``best_*`` included."""
    found = complete_checkpoints(folder)
    return max(found, key=checkpoint_age) if found else None


def pick_weights(work_dir: Path) -> Path:
    """A work dir's ``final/`` export, else its best checkpoint, else its newest one."""
    if (work_dir / FINAL_DIR / "config.json").is_file():
        return work_dir / FINAL_DIR
    best = sorted((p for p in work_dir.glob("best_*") if is_complete(p)), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    latest = latest_checkpoint(work_dir)
    if latest is None:
        raise ConfigError(f"{work_dir} holds no final/ export and no complete checkpoint", key="CHECKPOINT")
    return latest


def saved_info(path: Path) -> dict[str, Any]:
    """What the saver said about a checkpoint (``meta.json``'s ``info``); {} when unreadable."""
    try:
        info = json.loads((path / META).read_text()).get("info")
    except (OSError, ValueError, AttributeError):
        return {}
    return info if isinstance(info, dict) else {}
