"""Writing files so that a crash or a full disk never leaves half of one: atomic writes, the
errors a failed write of weights raises, and every process agreeing on a failed write."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a reader
    (or a crash) never sees half a file."""
    with atomic_file(path, wrap=False) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, wrap: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends
    without an error, removed when it fails, so ``path`` is either the old file or the whole new
    one. With ``wrap``, a failed write (a full disk, no permission) becomes a ``StorageError``
    naming ``path`` and the reason."""
    from seg_accel.errors import StorageError

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if wrap and isinstance(exc, WRITE_ERRORS) and not isinstance(exc, StorageError):
            raise StorageError(f"could not write {path}: {write_failure(exc)}") from exc
        raise


def _write_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (OSError, RuntimeError, ValueError, SafetensorError)


WRITE_ERRORS = _write_errors()  # what a failed write of weights raises (torch.save: RuntimeError)


def write_failure(exc: BaseException) -> str:
    """What a failed write says, in one line: an OSError's reason and file; safetensors' and
    torch's own errors (which wrap "No space left on device") by their first line."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc.strerror or exc)
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "unexpected pos" in text or "PytorchStreamWriter failed writing" in text:
        # torch.save's short write ("[enforce fail at inline_container.cc] . unexpected pos N vs M"):
        # what a full disk looks like from inside its zip writer
        return "No space left on device (torch.save could not write the whole file)"
    return first.removeprefix("Error while serializing: ")


def agree_on_write(accelerator: Any, error: BaseException | None, what: str, cleanup: Any = None) -> None:
    """After every process tried to write its part of ``what``: when any failed, all of them raise
    the same ``StorageError`` (none is left waiting for another that gave up) and the main process
    runs ``cleanup`` (removing the partial output)."""
    import torch

    from seg_accel.errors import StorageError

    failed = torch.tensor([1.0 if error is not None else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if failed.item() == 0:
        return
    if accelerator.is_main_process and cleanup is not None:
        cleanup()
    reason = write_failure(error) if error is not None else "another process could not write its part"
    raise StorageError(f"could not write {what}: {reason}") from error


def json_safe(value: Any) -> Any:
    """``value`` with every NaN and infinity as None: JSON has no NaN (``json.dumps`` writes a
    ``NaN`` token that JSON readers refuse); a metric that is undefined (a class absent from
    labels and predictions) is null."""
    import math

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
