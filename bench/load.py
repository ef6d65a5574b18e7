"""A competing CPU load for the benchmarks' "loaded machine" rows: one busy-loop process per
core (the usual state of a shared server or a laptop with other work), started by the bench
itself so every run sees the same load, and stopped when the block ends.

    with competing_load():
        ...  # timed here
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

BUSY_LOOP = "while True:\n    pass\n"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@contextlib.contextmanager
def competing_load(processes: int | None = None) -> Iterator[int]:
    """Run ``processes`` busy loops (default: one per core) for the duration of the block."""
    count = processes or cores()
    loops = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them start spinning
        yield count
    finally:
        for loop in loops:
            loop.kill()
        for loop in loops:
            loop.wait()


def describe(loaded: bool) -> str:
    return f"loaded ({cores()} busy loops)" if loaded else "idle"
