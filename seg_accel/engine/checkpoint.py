"""Checkpoints: full training state, written atomically, verified, rotated, found again.

A checkpoint is a folder (``iter_4000``, ``epoch_12``, ``best_mIoU_iter_8000``) holding what
``accelerator.save_state`` writes for the model (safetensors), the optimizer and the loss
scaler (``torch.save``, read back with ``weights_only=True``) and the RNG state of every
process (read back through Accelerate's ``weights_only=True`` loader and its allow-list),
the trainer's state as JSON (``runner_state.json``: counters, data position, hook states),
``meta.json`` and, written last, ``manifest.json`` (every file with its size and sha256).
Nothing in a checkpoint is unpickled with code execution. It is written under a temporary
name (marked as seg-accel's) and renamed once every process has finished; a resume first
checks the manifest, so a truncated or corrupted file is found before anything is loaded.
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seg_accel.errors import ConfigError
from seg_accel.models.loading import check_weights_fit
from seg_accel.runtime.checkpoints import (
    CHECKPOINT_CONFIG,
    EXPORT_SUBDIR,
    META,
    PARTIAL,
    RUNNER_STATE,
    checkpoint_age,
    complete_checkpoints,
    is_complete,
    periodic_checkpoints,
)
from seg_accel.runtime.manifest import MANIFEST, verify, write_manifest
from seg_accel.runtime.storage import WRITE_ERRORS, agree_on_write
from seg_accel.version import __version__

if TYPE_CHECKING:
    from seg_accel.engine.export import Exporter

logger = logging.getLogger("seg_accel")

class Checkpointer:
    """Saves (``save``), rotates, removes and restores (``resume``) checkpoints in ``folder``.

    ``state`` (``TrainingState``: counters, data position, hook states) is the trainer's part;
    the rest is what the Accelerator holds (the prepared model, optimizer, scaler, RNG
    states). Listeners in ``before_save`` are called on every process with the hook point
    (``after_train_iter``, ``after_train_epoch``, ``after_run``) before a periodic checkpoint
    is written: an evaluation due at that point runs first, so the checkpoint holds its best
    score whatever the hooks' priorities. Listeners in ``on_saved`` are called on the main
    process with ``(name, path, info)`` after each save (``info``: what the saver said about
    it, e.g. ``{"kind": "best", "metric": "mIoU", "score": 81.2}``, also kept in ``meta.json``)."""

    def __init__(self, accelerator: Any, folder: Path, state: Any, exporter: Exporter | None = None,
                 config_text: str | None = None):
        self.accelerator, self.folder, self.state, self.exporter = accelerator, Path(folder), state, exporter
        self.config_text = config_text  # the run's resolved config, kept in each checkpoint (a resume compares)
        self.before_save: list[Callable[[str], None]] = []
        self.on_saved: list[Callable[[str, Path, dict[str, Any]], None]] = []

    def save(self, name: str, save_optimizer: bool = True, export: bool = False,
             info: dict[str, Any] | None = None, point: str | None = None) -> Path:
        """Every process writes its part into ``.<name>.tmp``; the main process lists the files
        in the manifest and renames the folder. A failed write (a full disk, no permission)
        on any process removes the partial folder and raises ``StorageError`` on every one.
        ``point``: the hook point of a periodic save (the ``before_save`` listeners run first)."""
        if point is not None:
            for listener in self.before_save:
                listener(point)
        info = info or {"kind": "periodic"}
        acc, path = self.accelerator, self.folder / name
        tmp = path.parent / f".{path.name}.tmp"
        error = None
        try:
            if acc.is_main_process:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
                (tmp / PARTIAL).touch()
        except OSError as exc:
            error = exc
        self._agree(error, name, tmp)
        optimizers = acc._optimizers  # Accelerate saves every prepared optimizer; save_optimizer: false leaves it out
        if not save_optimizer:
            acc._optimizers = []
        try:
            acc.save_state(str(tmp))
            if export and self.exporter is not None:
                self.exporter.export(tmp / EXPORT_SUBDIR)  # every process: a sharded model is gathered
            if acc.is_main_process:
                state = self.state.state_dict()
                (tmp / RUNNER_STATE).write_text(json.dumps(state, indent=1))
                meta = {"iter": state["iter"], "epoch": state["epoch"], "optimizer_steps": state["optimizer_steps"],
                        "save_optimizer": save_optimizer, "seg_accel": __version__, "info": info}
                (tmp / META).write_text(json.dumps(meta, indent=2))
                if self.config_text is not None:
                    (tmp / CHECKPOINT_CONFIG).write_text(self.config_text)
        except WRITE_ERRORS as exc:  # safetensors and torch.save wrap ENOSPC in their own errors
            error = exc
        finally:
            acc._optimizers = optimizers
        self._agree(error, name, tmp)
        try:
            if acc.is_main_process:
                write_manifest(tmp, skip=(PARTIAL,))
                (tmp / PARTIAL).unlink()
                if path.exists():
                    shutil.rmtree(path)
                tmp.rename(path)
        except OSError as exc:
            error = exc
        self._agree(error, name, tmp)
        if acc.is_main_process:
            logger.info("saved checkpoint %s", path)
            for listener in self.on_saved:
                listener(name, path, info)
        acc.wait_for_everyone()
        return path

    def _agree(self, error: BaseException | None, name: str, tmp: Path) -> None:
        agree_on_write(self.accelerator, error, f"checkpoint {name} in {self.folder} (the previous checkpoints are "
                       "untouched)", cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))

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

    def best_checkpoints(self, metric: str) -> list[Path]:
        """The complete ``best_<metric>_*`` checkpoints, oldest first."""
        found = [p for p in complete_checkpoints(self.folder) if p.name.startswith(f"best_{metric}_")]
        return sorted(found, key=checkpoint_age)

    def clean_unfinished(self) -> None:
        if self.accelerator.is_main_process:
            remove_unfinished(self.folder)
        self.accelerator.wait_for_everyone()

    def newest_good(self) -> Path | None:
        """``auto_resume``: the newest checkpoint that passes its manifest check; each newer one
        that does not is skipped with one warning naming the file. The main process decides."""
        from accelerate.utils import broadcast_object_list

        chosen: list[str | None] = [None]
        if self.accelerator.is_main_process:
            for path in sorted(complete_checkpoints(self.folder), key=checkpoint_age, reverse=True):
                problem = verify(path)
                if problem is None:
                    chosen[0] = str(path)
                    break
                logger.warning("auto_resume: skipping %s: %s", path.name, problem)
        if self.accelerator.num_processes > 1:
            broadcast_object_list(chosen, from_process=0)
        return Path(chosen[0]) if chosen[0] is not None else None

    def restore(self, resume_from: str | None, auto_resume: bool, model: Any = None) -> Path | None:
        """At the start of a run: remove interrupted saves, then resume from ``resume_from`` or, with
        ``auto_resume``, the newest good checkpoint. Returns the checkpoint resumed from, if any."""
        self.clean_unfinished()
        path, key = (Path(resume_from), "resume_from") if resume_from else (None, "")
        if path is None and auto_resume:
            path, key = self.newest_good(), "auto_resume"
            if path is None:
                logger.info("auto_resume: no checkpoint in %s; starting afresh", self.folder)
        if path is not None:
            self.resume(path, key, model)
        return path

    def resume(self, path: Path, key: str = "resume_from", model: Any = None) -> None:
        """Restore the full state (``resume_from``/``auto_resume``) from a verified checkpoint."""
        if not is_complete(path):
            raise ConfigError(f"not a complete seg-accel checkpoint (no {MANIFEST}): {path}", key=key)
        problem = verify(path)
        if problem is not None:
            raise ConfigError(f"checkpoint {path.name} cannot be resumed: {problem}", key=key)
        if model is not None:
            check_weights_fit(model, path / "model.safetensors", key)
        acc = self.accelerator
        _check_rng_file(path / f"random_states_{acc.process_index}.pkl", key)
        meta = json.loads((path / META).read_text())
        self._compare_configs(path)
        optimizers = acc._optimizers
        # the optimizer's settings (lr, weight decay, betas, the schedules' initial values) follow the
        # config resumed with; its state (moments, step counts) comes from the checkpoint
        settings = [[{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
                    for opt in optimizers]
        if not meta.get("save_optimizer", True):
            acc._optimizers = []
            logger.warning("checkpoint %s has no optimizer state (save_optimizer: false); the optimizer starts "
                           "afresh", path)
        try:
            acc.load_state(str(path))
        except (RuntimeError, ValueError, OSError, EOFError) as exc:  # incl. pickle's refusals (weights_only)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConfigError(f"checkpoint {path.name} cannot be loaded: {type(exc).__name__}: {first[:300]}",
                              key=key) from exc
        finally:
            acc._optimizers = optimizers
        for opt, groups in zip(optimizers, settings):
            for group, setting in zip(opt.param_groups, groups):
                group.update(setting)
        state = json.loads((path / RUNNER_STATE).read_text())
        self.state.load_state_dict(state)
        logger.info("resumed from %s: continuing at iteration %d", path, int(state["iter"]) + 1)


    def _compare_configs(self, path: Path) -> None:
        """One warning listing each key the resumed config changes and what that does."""
        import yaml

        from seg_accel.engine.resume_changes import config_changes, describe_changes

        if self.config_text is None or not self.accelerator.is_main_process:
            return
        saved = path / CHECKPOINT_CONFIG
        if not saved.is_file():  # a checkpoint of an older seg-accel: the work dir's config made it
            saved = path.parent / "config.yaml"
        try:
            before = yaml.safe_load(saved.read_text()) if saved.is_file() else None
        except (OSError, yaml.YAMLError):
            before = None
        if not isinstance(before, dict):
            return
        changes = config_changes(before, yaml.safe_load(self.config_text))
        if changes:
            logger.warning("%s", describe_changes(changes, path.name))


def _check_rng_file(path: Path, key: str) -> None:
    """Accelerate reads the RNG states with its ``weights_only=True`` loader but only logs (at INFO)
    when that fails, and the resume would silently not be exact: read them first."""
    from accelerate.utils import load

    try:
        states = load(path)
        assert isinstance(states, dict) and "torch_manual_seed" in states
    except Exception as exc:  # any failure means the resume would not be exact
        raise ConfigError(f"{path} does not hold the RNG states ({type(exc).__name__}); the resume would not be "
                          "exact", key=key) from exc


def remove_checkpoint(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    logger.info("removed checkpoint %s", path)


def remove_unfinished(folder: Path) -> None:
    """Temporary folders of seg-accel's saves that were interrupted (those holding its marker;
    any other ``.*.tmp`` folder is not ours and stays)."""
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            if tmp.is_dir() and (tmp / PARTIAL).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                logger.warning("removed an interrupted checkpoint save: %s", tmp)


