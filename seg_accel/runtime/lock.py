"""One training run per work dir: a lock file (``.seg_accel.lock``) taken before the run writes
anything there, holding who holds it (host, pid, start time, command).

A second run on the same work dir stops with one line naming the holder. A lock whose holder
is gone (a process of this host that no longer exists: a run killed with SIGKILL or a power
cut) is taken over with one warning. The lock is removed when the run ends, however it ends
(short of SIGKILL)."""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from seg_accel.errors import ConfigError

logger = logging.getLogger("seg_accel")

LOCK_FILE = ".seg_accel.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def read_holder(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "an unreadable lock"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command', '?')})")


class WorkDirLock:
    """``acquire()`` the work dir for this process (the main process of a run); ``release()``."""

    def __init__(self, work_dir: Path):
        self.path = Path(work_dir) / LOCK_FILE
        self.held = False
        self.note: str | None = None  # what acquiring had to say (a lock taken over), logged by the caller

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)[:300]}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = read_holder(self.path)
                if holder is not None and holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
                    self.path.unlink(missing_ok=True)  # an earlier trainer of this very process (the Python API)
                    continue
                if holder is not None and holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                        and not _alive(holder["pid"]):
                    self.note = (f"work dir {self.path.parent}: taking over the lock of a run that is gone "
                                 f"({describe(holder)})")
                    self.path.unlink(missing_ok=True)
                    continue
                if holder is None and not self.path.exists():  # released meanwhile
                    continue
                raise ConfigError(f"{self.path.parent} is in use by another training run ({describe(holder)}): wait "
                                  f"for it to end, or train into another --work-dir (a lock left by a run on "
                                  f"another host: remove {self.path} if that run has ended)", key="work_dir")
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            atexit.register(self.release)
            return
        raise ConfigError(f"could not take the lock {self.path}", key="work_dir")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = read_holder(self.path)
        if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


def lock_work_dir(accelerator: Any, work_dir: Path) -> WorkDirLock | None:
    """The main process takes the lock; every process learns whether it did and raises the same
    one-line error when it did not (none is left waiting). Returns the main process's lock."""
    lock, error = (WorkDirLock(work_dir), None) if accelerator.is_main_process else (None, None)
    if lock is not None:
        try:
            lock.acquire()
        except ConfigError as exc:
            error = exc
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = [str(error.message) if error is not None else None]
        broadcast_object_list(message, from_process=0)
        if message[0] is not None and error is None:
            error = ConfigError(message[0], key="work_dir")
    if error is not None:
        raise error
    return lock
