"""Pushing a run to the Hub: stage the files, upload them in the background, retry, never fail
the training.

A push is staged first: the export (``model.safetensors``, ``config.json``,
``preprocessor_config.json``), the model card (``README.md``), the resolved training
config (``training_config.yaml``), the JSON logs (``logs/``), the evaluation
(``eval_results.json``) and ``run_info.json`` are copied into a folder of their own, so
checkpoint rotation or the next export cannot change them while they upload. One
worker thread uploads the staged folders in order (``huggingface_hub``'s
``create_repo``/``upload_folder``, one commit each); when uploads fall behind, at most
``max_waiting`` pushes wait (the oldest waiting one is dropped, with a warning). Failures are retried
with exponential back-off, then logged as a warning naming the push: training and
local files are never affected. The access token is the one ``huggingface_hub`` finds
(``HF_TOKEN`` or ``hf auth login``); seg-accel never writes it anywhere, and every
staged file is checked for it before it leaves the machine.
"""
from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from seg_accel.runtime.workdir import CONFIG_FILE, EVAL_RESULTS, RUN_INFO
from seg_accel.hub.card import build_model_card

logger = logging.getLogger("seg_accel")

TRAINING_CONFIG = "training_config.yaml"  # the work dir's config.yaml, under its name in the repo
REDACTED = "<redacted: access token>"


def current_token() -> str | None:
    """The token ``huggingface_hub`` would send (``HF_TOKEN``, else the stored login)."""
    from huggingface_hub import get_token

    try:
        return get_token()
    except Exception:  # an unreadable token file: nothing to redact
        return None


def scrub_token(folder: Path, token: str | None = None) -> list[str]:
    """Remove the access token from every file under ``folder`` (text: replaced, anything else:
    the file is deleted). Returns the relative paths that held it."""
    token = token if token is not None else current_token()
    if not token or len(token) < 8:
        return []
    needle = token.encode()
    redacted, dropped = [], []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        if needle not in data:
            continue
        name = str(file.relative_to(folder))
        try:
            file.write_text(data.decode("utf-8").replace(token, REDACTED))
            redacted.append(name)
        except UnicodeDecodeError:
            file.unlink()
            dropped.append(name)
    if redacted or dropped:
        logger.warning("the access token was found in %s: %s before the upload. Remove it from where it came "
                       "from (the config, a log message)", ", ".join(redacted + dropped),
                       "; ".join(part for part in (f"redacted in {', '.join(redacted)}" if redacted else "",
                                                   f"left out: {', '.join(dropped)}" if dropped else "") if part))
    return redacted + dropped


def stage_push(
    staging: Path,
    repo_id: str,
    export_dir: Path,
    work_dir: Path | None,
    evaluation: dict | None = None,
    info: dict | None = None,
) -> Path:
    """Copy everything one push uploads into ``staging`` and write the model card there."""
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for file in export_dir.iterdir():
        if file.is_file():
            shutil.copy2(file, staging / file.name)
    cfg: dict[str, Any] = {}
    if work_dir is not None:
        config_file = work_dir / CONFIG_FILE
        if config_file.is_file():
            cfg = without_local_paths(yaml.safe_load(config_file.read_text()) or {}, work_dir)
            (staging / TRAINING_CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None,
                                                                  width=100))
        logs = sorted(work_dir.glob("*.log.json"))
        if logs:
            (staging / "logs").mkdir()
            for log in logs:
                shutil.copy2(log, staging / "logs" / log.name)
    if evaluation is not None:
        (staging / EVAL_RESULTS).write_text(json.dumps(evaluation, indent=2))
    if info is not None:
        (staging / RUN_INFO).write_text(json.dumps(info, indent=2))
    model_config = json.loads((staging / "config.json").read_text())
    card = build_model_card(repo_id, cfg, model_config, evaluation, info)
    card.save(staging / "README.md")
    scrub_token(staging)
    return staging


def without_local_paths(value: Any, work_dir: Path) -> Any:
    """The config as it may leave the machine: an absolute path inside the work dir becomes
    relative to it (the work dir itself ``.``), any other absolute path its file name."""
    if isinstance(value, dict):
        return {k: without_local_paths(v, work_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v, work_dir) for v in value]
    if isinstance(value, str) and value.startswith(("/", "~")) and len(value) > 1:
        path, root = Path(value).expanduser(), Path(work_dir).resolve()
        try:
            return Path(path.resolve().relative_to(root)).as_posix() or "."
        except ValueError:
            return path.name
    return value


def redact(text: str, token: str | None = None) -> str:
    """``text`` without the access token (commit messages and other strings sent to the Hub)."""
    token = token if token is not None else current_token()
    return text.replace(token, REDACTED) if token and len(token) >= 8 else text


def _retryable(exc: Exception) -> bool:
    """Client errors other than rate limits (401 bad token, 403 no rights, 404, 422) will fail
    again: no retry."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status is None or status >= 500 or status in (408, 429)


class HubPusher:
    """Uploads staged folders to one repo from a single background thread."""

    def __init__(self, repo_id: str, private: bool | None = None, revision: str | None = None,
                 retries: int = 3, retry_wait: float = 5.0, max_waiting: int = 3, during_training: bool = True):
        from huggingface_hub import HfApi

        self.repo_id, self.private, self.revision = repo_id, private, revision
        self.during_training = during_training  # what a failure message says comes next
        self.retries, self.retry_wait, self.max_waiting = retries, retry_wait, max_waiting
        self.api = HfApi()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seg-accel-hub")
        self._pending: list[tuple[str, Path, Future]] = []
        self._lock = threading.Lock()
        self._repo_ready = False
        self.pushed: list[str] = []
        self.failed: list[str] = []
        self.dropped: list[str] = []

    def submit(self, name: str, folder: Path, message: str) -> Future:
        """Queue an upload of ``folder`` (removed once uploaded or given up on). When more than
        ``max_waiting`` pushes are waiting, the oldest waiting one is dropped: the newer ones
        hold newer versions of the same files."""
        with self._lock:
            self._pending = [p for p in self._pending if not p[2].done()]
            waiting = [p for p in self._pending if not p[2].running()]
            while len(waiting) >= self.max_waiting:
                old_name, old_folder, future = waiting.pop(0)
                if future.cancel():
                    shutil.rmtree(old_folder, ignore_errors=True)
                    self.dropped.append(old_name)
                    logger.warning("hub: push of %s dropped: %d newer pushes are waiting (uploads are slower than "
                                   "the checkpoints; raise checkpoint_config.interval)", old_name, self.max_waiting)
            future = self._executor.submit(self._push, name, folder, redact(message))
            self._pending.append((name, folder, future))
        return future

    def _ensure_repo(self) -> None:
        if self._repo_ready:
            return
        url = self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
        if self.revision and self.revision != "main":
            self.api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        self._repo_ready = True
        logger.info("hub: pushing to %s%s", url, f" (branch {self.revision})" if self.revision else "")

    def _push(self, name: str, folder: Path, message: str) -> Any:
        try:
            for attempt in range(1, self.retries + 1):
                try:
                    self._ensure_repo()
                    info = self.api.upload_folder(repo_id=self.repo_id, folder_path=folder, commit_message=message,
                                                  revision=self.revision)
                    self.pushed.append(name)
                    logger.info("hub: pushed %s to %s (%s)", name, self.repo_id, getattr(info, "oid", "")[:12])
                    return info
                except Exception as exc:  # network, server or auth: reported, never raised into training
                    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    if attempt < self.retries and _retryable(exc):
                        wait = self.retry_wait * 2 ** (attempt - 1)
                        logger.warning("hub: push of %s to %s failed (attempt %d of %d: %s); retrying in %.0f s",
                                       name, self.repo_id, attempt, self.retries, reason, wait)
                        time.sleep(wait)
                        continue
                    self.failed.append(name)
                    status = getattr(getattr(exc, "response", None), "status_code", None)
                    hint = (" (no valid access token: set HF_TOKEN or run `hf auth login`, with write access to "
                            f"{self.repo_id})") if status == 401 else ""
                    after = (". Training goes on; the files are still in the work dir (push them later with "
                             "`seg-accel push WORK_DIR REPO_ID`)") if self.during_training else ""
                    logger.warning("hub: push of %s to %s failed after %d attempt(s): %s%s%s", name, self.repo_id,
                                   attempt, redact(reason), hint, after)
                    return None
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def wait(self) -> None:
        """Block until every queued push has finished (or given up)."""
        with self._lock:
            pending = list(self._pending)
        if any(not f.done() for _, _, f in pending):
            logger.info("hub: waiting for %d pending push(es) to %s", sum(not f.done() for *_, f in pending),
                        self.repo_id)
        for _, _, future in pending:
            if not future.cancelled():
                future.result()

    def close(self) -> None:
        self.wait()
        self._executor.shutdown(wait=True)
