"""``scripts/push_to_hub.py``: publish a finished run, a checkpoint or an export.

The source is a work dir (its ``final/`` export, ``eval_results.json``,
``run_info.json``, logs and config), a ``save_pretrained`` folder (``final/``,
``best_*/pretrained``) or a training checkpoint (``iter_4000``: its ``pretrained/``
export if it has one, else the model is rebuilt from the run's config and exported).
"""
from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from seg_accel.runtime.workdir import CONFIG_FILE, EVAL_RESULTS, FINAL_DIR, RUN_INFO
from seg_accel.errors import ConfigError

logger = logging.getLogger("seg_accel")


@dataclass
class Source:
    export_dir: Path  # a save_pretrained folder
    work_dir: Path | None  # where config.yaml and the logs are
    iteration: int | None  # the iteration of the weights, when known
    name: str


def _work_dir_near(path: Path) -> Path | None:
    for folder in (path, *path.parents[:3]):
        if (folder / CONFIG_FILE).is_file():
            return folder
    return None


def resolve_source(path: Path, config: Path | None, scratch: Path) -> Source:
    """What to push from ``path`` (see the module docstring); ``scratch`` holds a fresh export."""
    from seg_accel.runtime.checkpoints import META

    if not path.exists():
        raise ConfigError(f"no such file or folder: {path}", key="WORK_DIR_OR_CHECKPOINT")
    if (path / FINAL_DIR / "config.json").is_file():  # a work dir
        info = path / RUN_INFO
        iteration = json.loads(info.read_text()).get("iterations") if info.is_file() else None
        return Source(path / FINAL_DIR, path, iteration, "final")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):  # an export
        meta = path.parent / META
        iteration = json.loads(meta.read_text())["iter"] if meta.is_file() else None
        work_dir = _work_dir_near(path)
        if iteration is None and path.name == FINAL_DIR and work_dir is not None and (work_dir / RUN_INFO).is_file():
            iteration = json.loads((work_dir / RUN_INFO).read_text()).get("iterations")
        return Source(path, work_dir, iteration, path.parent.name if path.name == "pretrained" else path.name)
    if (path / META).is_file():  # a training checkpoint
        iteration = json.loads((path / META).read_text())["iter"]
        work_dir = _work_dir_near(path.parent)
        if (path / "pretrained" / "config.json").is_file():
            return Source(path / "pretrained", work_dir, iteration, path.name)
        config = config or (work_dir / CONFIG_FILE if work_dir else None)
        if config is None:
            raise ConfigError(f"{path} has no export and no config.yaml was found beside it: pass --config",
                              key="--config")
        _export_checkpoint(path, config, scratch)
        return Source(scratch, work_dir, iteration, path.name)
    raise ConfigError(f"{path} is not a work dir (with final/), a save_pretrained folder or a training checkpoint "
                      f"(with {META})", key="WORK_DIR_OR_CHECKPOINT")


def _export_checkpoint(checkpoint: Path, config: Path, out: Path) -> None:
    from seg_accel.config import load_config
    from seg_accel.models import load_weights
    from seg_accel.validate import validate_train_config
    from seg_accel.models import build_model, export_model
    from seg_accel.models.processor import build_image_processor

    cfg = validate_train_config(load_config(str(config)))
    model = build_model(cfg.model, list(cfg.classes))
    load_weights(model, checkpoint, key="WORK_DIR_OR_CHECKPOINT")
    export_model(model, out, list(cfg.classes), build_image_processor(cfg.data))
    logger.info("exported %s (config %s) for the push", checkpoint, config)


def publish(path: Path, repo_id: str, private: bool | None = None, revision: str | None = None,
            commit_message: str | None = None, config: Path | None = None, retries: int = 3,
            retry_wait: float = 5.0) -> bool:
    """Stage and push synchronously; True when the push went through."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from seg_accel.hub.push import HubPusher, stage_push

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigError(f"not a Hub repo id ('user/name'): {exc}", key="REPO_ID") from exc
    with tempfile.TemporaryDirectory(prefix="seg-accel-push-") as scratch:
        source = resolve_source(Path(path), config, Path(scratch) / "export")
        evaluation = info = None
        if source.work_dir is not None:
            results = source.work_dir / EVAL_RESULTS
            if results.is_file():
                evaluation = json.loads(results.read_text())
                if source.iteration is not None and evaluation.get("iter") != source.iteration:
                    logger.warning("%s is from iteration %s, the weights from iteration %s: the card gets no "
                                   "metrics (score the weights with scripts/evaluate.py)", results,
                                   evaluation.get("iter"), source.iteration)
                    evaluation = None
            if (source.work_dir / RUN_INFO).is_file():
                info = json.loads((source.work_dir / RUN_INFO).read_text())
        folder = stage_push(Path(scratch) / "push", repo_id, source.export_dir, source.work_dir, evaluation, info)
        pusher = HubPusher(repo_id, private, revision, retries, retry_wait, during_training=False)
        pusher.submit(source.name, folder, commit_message or f"seg-accel: {source.name}")
        pusher.close()
        return not pusher.failed
