"""Checkpoints: full training state through Accelerate, written atomically, rotated, found again.

A checkpoint is a folder (``iter_4000``, ``epoch_12``, ``best_mIoU_iter_8000``) holding
what ``accelerator.save_state`` writes (model weights in safetensors, optimizer, loss
scaler, the RNG state of every process, registered objects: the runner's state with the
data position and the hooks' states) plus ``meta.json``. It is written under a
temporary name and renamed once every process has finished, so an interrupted save
never leaves a folder that looks complete.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seg_accel import __version__
from seg_accel.errors import ConfigError

if TYPE_CHECKING:
    from seg_accel.engine.export import Exporter

logger = logging.getLogger("seg_accel")

META = "meta.json"
EXPORT_SUBDIR = "pretrained"  # a checkpoint's own export (best checkpoints, Hub pushes)
_PERIODIC = re.compile(r"^(iter|epoch)_(\d+)$")


class RunnerState:
    """What the trainer needs to continue exactly: counters, data position, hook states.
    Registered with ``accelerator.register_for_checkpointing``."""

    def __init__(self, runner: Any):
        self.runner = runner

    def state_dict(self) -> dict[str, Any]:
        r = self.runner
        return {
            "iter": r.iter, "epoch": r.epoch, "optimizer_steps": r.optimizer_steps, "samples": r.samples,
            "train_seconds": r.train_seconds,
            "hooks": {h.name: h.state_dict() for h in r.hooks if hasattr(h, "state_dict")},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        r = self.runner
        r.iter, r.epoch = int(state["iter"]), int(state["epoch"])
        r.optimizer_steps, r.samples = int(state["optimizer_steps"]), int(state["samples"])
        r.seconds_before = float(state.get("train_seconds", 0.0))
        for hook in r.hooks:
            if hook.name in state["hooks"] and hasattr(hook, "load_state_dict"):
                hook.load_state_dict(state["hooks"][hook.name])


class Checkpointer:
    """Saves (``save``), rotates, removes and restores (``resume``) checkpoints in ``folder``.

    ``progress()`` gives the counters written to ``meta.json``; everything else is what
    the Accelerator holds (the prepared model, optimizer, scaler, RNG states and the objects
    registered with ``register_for_checkpointing``). Listeners in ``on_saved`` are called
    on the main process with ``(name, path, info)`` after each save (``info``: what the saver
    said about it, e.g. ``{"kind": "best", "metric": "mIoU", "score": 81.2}``)."""

    def __init__(self, accelerator: Any, folder: Path, progress: Callable[[], dict[str, int]],
                 exporter: Exporter | None = None):
        self.accelerator, self.folder, self.progress, self.exporter = accelerator, Path(folder), progress, exporter
        self.on_saved: list[Callable[[str, Path, dict[str, Any]], None]] = []

    def save(self, name: str, save_optimizer: bool = True, export: bool = False,
             info: dict[str, Any] | None = None) -> Path:
        """Every process writes its part into ``.<name>.tmp``; the main process renames it.
        With ``export`` the checkpoint also holds the model's export in ``pretrained/``."""
        acc, path = self.accelerator, self.folder / name
        tmp = path.parent / f".{path.name}.tmp"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        optimizers = acc._optimizers  # Accelerate saves every prepared optimizer; save_optimizer: false leaves it out
        if not save_optimizer:
            acc._optimizers = []
        try:
            acc.save_state(str(tmp))
        finally:
            acc._optimizers = optimizers
        if export and self.exporter is not None:
            self.exporter.export(tmp / EXPORT_SUBDIR)  # every process: a sharded model is gathered
        if acc.is_main_process:
            meta = {**self.progress(), "save_optimizer": save_optimizer, "seg_accel": __version__}
            (tmp / META).write_text(json.dumps(meta, indent=2))
        acc.wait_for_everyone()
        if acc.is_main_process:
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
            logger.info("saved checkpoint %s", path)
            for listener in self.on_saved:
                listener(name, path, info or {"kind": "periodic"})
        acc.wait_for_everyone()
        return path

    def rotate(self, max_keep: int) -> None:
        """Keep the newest ``max_keep`` periodic checkpoints (best ones are never touched)."""
        if self.accelerator.is_main_process and max_keep > 0:
            for old in periodic_checkpoints(self.folder)[:-max_keep]:
                remove_checkpoint(old)
        self.accelerator.wait_for_everyone()

    def remove(self, name: str) -> None:
        if self.accelerator.is_main_process:
            remove_checkpoint(self.folder / name)
        self.accelerator.wait_for_everyone()

    def clean_unfinished(self) -> None:
        if self.accelerator.is_main_process:
            remove_unfinished(self.folder)
        self.accelerator.wait_for_everyone()

    def resume(self, path: Path, key: str = "resume_from") -> None:
        """Restore the full state (``resume_from``/``auto_resume``)."""
        if not is_complete(path):
            raise ConfigError(f"not a complete seg-accel checkpoint (no {META}): {path}", key=key)
        meta = json.loads((path / META).read_text())
        acc = self.accelerator
        optimizers = acc._optimizers
        if not meta.get("save_optimizer", True):
            acc._optimizers = []
            logger.warning("checkpoint %s has no optimizer state (save_optimizer: false); the optimizer starts "
                           "afresh", path)
        try:
            acc.load_state(str(path))
        finally:
            acc._optimizers = optimizers
        logger.info("resumed from %s: continuing at iteration %d", path, self.progress()["iter"] + 1)


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / META).is_file() and not path.name.startswith(".")


def periodic_checkpoints(folder: Path) -> list[Path]:
    """``iter_*``/``epoch_*`` checkpoints, oldest first (by their number)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _PERIODIC.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(_PERIODIC.match(p.name).group(2)))


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (by its saved iteration), ``best_*`` included."""
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if is_complete(p)]
    if not found:
        return None
    return max(found, key=lambda p: (json.loads((p / META).read_text())["iter"], not p.name.startswith("best_")))


def remove_checkpoint(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    logger.info("removed checkpoint %s", path)


def remove_unfinished(folder: Path) -> None:
    """Temporary folders of saves that were interrupted."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
            logger.warning("removed an interrupted checkpoint save: %s", tmp)


def load_weights(model: Any, path: Path, key: str = "load_from") -> None:
    """Weights only (``load_from``): a checkpoint folder or an export folder."""
    from safetensors.torch import load_file

    from seg_accel.models import family_of_model, load_model
    from seg_accel.models.modules import EXPORT_KEY

    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise ConfigError(f"no .safetensors weights in {path}", key=key)
    config_file = path / "config.json"
    if config_file.is_file() and EXPORT_KEY not in json.loads(config_file.read_text()) \
            and family_of_model(model).name == "transformers":
        state = load_model(path).state_dict()  # a save_pretrained export: transformers maps its key names
    else:  # an Accelerate checkpoint or a module export: the model's own state dict
        state = {}
        for file in files:
            state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        logger.warning("load_from %s: %d missing and %d unexpected keys (e.g. %s)", path, len(missing),
                       len(unexpected), (missing or unexpected)[:3])
    logger.info("loaded weights from %s", path)
