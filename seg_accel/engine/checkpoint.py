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
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seg_accel import __version__
from seg_accel.engine.manifest import MANIFEST, verify, write_manifest
from seg_accel.engine.workdir import WRITE_ERRORS, agree_on_write
from seg_accel.errors import ConfigError

if TYPE_CHECKING:
    from seg_accel.engine.export import Exporter

logger = logging.getLogger("seg_accel")

META = "meta.json"
RUNNER_STATE = "runner_state.json"
PARTIAL = ".seg_accel_partial"  # marks a checkpoint being written: only such folders are cleaned up
EXPORT_SUBDIR = "pretrained"  # a checkpoint's own export (best checkpoints, Hub pushes)
_PERIODIC = re.compile(r"^(iter|epoch)_(\d+)$")


class RunnerState:
    """What the trainer needs to continue exactly: counters, data position, hook states (JSON)."""

    def __init__(self, runner: Any):
        self.runner = runner

    def state_dict(self) -> dict[str, Any]:
        r = self.runner
        hooks = {}
        for hook in r.hooks:
            if hasattr(hook, "state_dict"):
                hooks[hook.name] = hook.state_dict()
                try:
                    json.dumps(hooks[hook.name])
                except (TypeError, ValueError) as exc:
                    raise TypeError(f"hook {hook.name}: state_dict() must return JSON values (numbers, strings, "
                                    f"lists, mappings) to be checkpointed: {exc}") from exc
        return {"iter": r.iter, "epoch": r.epoch, "optimizer_steps": r.optimizer_steps, "samples": r.samples,
                "train_seconds": r.train_seconds, "hooks": hooks}

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

    ``state`` (``RunnerState``) is the trainer's part; the rest is what the Accelerator holds
    (the prepared model, optimizer, scaler, RNG states). Listeners in ``on_saved`` are called
    on the main process with ``(name, path, info)`` after each save (``info``: what the saver
    said about it, e.g. ``{"kind": "best", "metric": "mIoU", "score": 81.2}``)."""

    def __init__(self, accelerator: Any, folder: Path, state: RunnerState, exporter: Exporter | None = None):
        self.accelerator, self.folder, self.state, self.exporter = accelerator, Path(folder), state, exporter
        self.on_saved: list[Callable[[str, Path, dict[str, Any]], None]] = []

    def save(self, name: str, save_optimizer: bool = True, export: bool = False,
             info: dict[str, Any] | None = None) -> Path:
        """Every process writes its part into ``.<name>.tmp``; the main process lists the files
        in the manifest and renames the folder. A failed write (a full disk, no permission)
        on any process removes the partial folder and raises ``StorageError`` on every one."""
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
                        "save_optimizer": save_optimizer, "seg_accel": __version__}
                (tmp / META).write_text(json.dumps(meta, indent=2))
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
                listener(name, path, info or {"kind": "periodic"})
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
            for path in sorted(complete_checkpoints(self.folder), key=_age, reverse=True):
                problem = verify(path)
                if problem is None:
                    chosen[0] = str(path)
                    break
                logger.warning("auto_resume: skipping %s: %s", path.name, problem)
        if self.accelerator.num_processes > 1:
            broadcast_object_list(chosen, from_process=0)
        return Path(chosen[0]) if chosen[0] is not None else None

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
        optimizers = acc._optimizers
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
        self.state.load_state_dict(json.loads((path / RUNNER_STATE).read_text()))
        logger.info("resumed from %s: continuing at iteration %d", path, self.state.runner.iter + 1)


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


def _age(path: Path) -> tuple[int, bool]:
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
    return max(found, key=_age) if found else None


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


def _shape_summary(problems: list[str], total: int) -> str:
    shown = "; ".join(problems[:3]) + (f"; ... ({len(problems) - 3} more)" if len(problems) > 3 else "")
    return f"{len(problems)} of {total} tensors differ ({shown})"


def check_weights_fit(model: Any, file: Path, key: str) -> None:
    """Every tensor of ``file`` (safetensors) has the name and shape of the model's: one line
    naming what differs otherwise (another class count, another architecture)."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(file), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = [f"{k} {found[k]} vs the model's {expected[k]}" for k in found if k in expected
                and found[k] != expected[k]]
    problems += [f"{k} is not in the model" for k in found if k not in expected]
    problems += [f"the model's {k} is not in the checkpoint" for k in expected if k not in found]
    if problems:
        raise ConfigError(f"{file.parent.name} was made with another model: {_shape_summary(problems, len(expected))}"
                          ". Another class count or architecture? (load_from takes the matching weights only)",
                          key=key)


def load_weights(model: Any, path: Path, key: str = "load_from", strict: bool = False) -> None:
    """Weights only: a checkpoint folder, an export folder or a ``.safetensors`` file.

    ``load_from`` (``strict=False``) loads what matches in name and shape and says in one line
    what it leaves (a new head for other classes is the usual case); nothing matching is an
    error. ``strict`` (evaluating a checkpoint): anything that does not match is an error."""
    from safetensors.torch import load_file

    from seg_accel.models import family_of_model, load_model
    from seg_accel.models.modules import EXPORT_KEY

    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        files = [path]
    else:
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise ConfigError(f"no weights at {path} (expected a checkpoint or export folder, or a .safetensors file)",
                          key=key)
    if path.is_dir() and (path / MANIFEST).is_file() and (problem := verify(path)) is not None:
        raise ConfigError(f"checkpoint {path.name} is damaged: {problem}", key=key)
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is not None and config_file.is_file() and EXPORT_KEY not in json.loads(config_file.read_text()) \
            and family_of_model(model).name == "transformers":
        state = load_model(path).state_dict()  # a save_pretrained export: transformers maps its key names
    else:  # an Accelerate checkpoint, a module export or a file: the model's own state dict
        state = {}
        for file in files:
            state.update(load_file(str(file)))
    expected = model.state_dict()
    fits = {k: v for k, v in state.items() if k in expected and tuple(v.shape) == tuple(expected[k].shape)}
    problems = [f"{k} {tuple(v.shape)} vs the model's {tuple(expected[k].shape)}" for k, v in state.items()
                if k in expected and k not in fits]
    problems += [f"{k} is not in the model" for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    if not fits:
        raise ConfigError(f"none of the {len(expected)} tensors of the model is in {path} with its name and shape "
                          f"(e.g. the file has {next(iter(state), 'nothing')}, the model {next(iter(expected))}): "
                          "weights of another architecture?", key=key)
    if strict and (problems or missing):
        problems += [f"the model's {k} is not in it" for k in missing]
        raise ConfigError(f"{path} does not fit the model: {_shape_summary(problems, len(expected))}. Another class "
                          "count or architecture?", key=key)
    model.load_state_dict(fits, strict=False)
    if problems or missing:
        logger.warning("%s %s: loaded %d of the model's %d tensors; not loaded: %s%s", key, path, len(fits),
                       len(expected), _shape_summary(problems, len(state)) if problems else "",
                       f"{'; ' if problems else ''}{len(missing)} kept at their initialisation (e.g. {missing[0]})"
                       if missing else "")
    logger.info("loaded weights from %s", path)


def pick_weights(work_dir: Path) -> Path:
    """A work dir's ``final/`` export, else its best checkpoint, else its newest one."""
    from seg_accel.engine.workdir import FINAL_DIR

    if (work_dir / FINAL_DIR / "config.json").is_file():
        return work_dir / FINAL_DIR
    best = sorted((p for p in work_dir.glob("best_*") if is_complete(p)), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    latest = latest_checkpoint(work_dir)
    if latest is None:
        raise ConfigError(f"{work_dir} holds no final/ export and no complete checkpoint", key="CHECKPOINT")
    return latest
