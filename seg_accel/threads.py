"""The CPU thread budget: processes x torch threads x DataLoader workers against the cores.

Left alone, every process runs as many torch threads as the machine has cores and every
DataLoader worker inherits that, so 2 processes with 2 workers each on 2 cores run 12
threads on 2 cores: OpenMP threads that wait for each other at every parallel region collapse
when they are preempted (measured: a 2-thread CPU data pipeline fell to 0.3 images/s on a
busy 2-core machine, 11 images/s with 1 thread). seg-accel decides:

- torch threads per process: ``torch_threads`` from the config, else ``OMP_NUM_THREADS`` when
  set (by the user, or by a launcher), else the cores this process may use divided by the
  processes on this machine (at least 1);
- DataLoader workers: 1 thread each (``seg_accel.data.seeds.worker_init``), whatever the process has;

and says it at start, with a warning when the threads exceed the cores.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

logger = logging.getLogger("seg_accel")

USER_THREADS = "SEG_ACCEL_USER_OMP_NUM_THREADS"  # set by `seg-accel train` for its children: the user's own value
BUDGETED = "SEG_ACCEL_THREAD_BUDGET"  # set by `seg-accel train` for its children: OMP_NUM_THREADS is the budget


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def local_processes() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)


@dataclass(frozen=True)
class ThreadBudget:
    threads: int  # torch intra-op threads of each process
    source: str  # where the number came from
    processes: int  # processes on this machine
    workers: int  # DataLoader workers per process
    cores: int

    @property
    def total(self) -> int:
        return self.processes * (self.threads + self.workers)

    @property
    def oversubscribed(self) -> bool:
        return self.processes * self.threads > self.cores or self.total > 2 * self.cores

    def describe(self) -> str:
        text = (f"threads: {self.processes} process(es) x {self.threads} torch thread(s) ({self.source}) + "
                f"{self.workers} DataLoader worker(s) of 1 thread each = {self.total} on {self.cores} core(s)")
        return text


def decide(torch_threads: int | None, workers: int) -> ThreadBudget:
    """The budget for this process (nothing is changed here)."""
    cores, processes = available_cores(), local_processes()
    if torch_threads is not None:
        threads, source = torch_threads, "torch_threads in the config"
    elif os.environ.get(USER_THREADS, "").isdigit():
        threads, source = int(os.environ[USER_THREADS]), "OMP_NUM_THREADS set by you"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and not os.environ.get(BUDGETED):
        threads, source = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS set before seg-accel started"
    else:
        threads, source = max(1, cores // processes), f"{cores} core(s) / {processes} process(es)"
    return ThreadBudget(max(1, threads), source, processes, workers, cores)


def apply(budget: ThreadBudget) -> None:
    """Set this process's torch threads and say the budget (a warning when oversubscribed)."""
    import torch

    torch.set_num_threads(budget.threads)
    if budget.oversubscribed:
        logger.warning("%s: more threads than cores; set torch_threads (or OMP_NUM_THREADS) and workers_per_gpu so "
                       "that processes x (threads + workers) fits the cores", budget.describe())
    else:
        logger.info("%s", budget.describe())


def launcher_environment(num_processes: int | None) -> dict[str, str]:
    """What `seg-accel train --num-processes N` gives its children: the user's OMP_NUM_THREADS
    marked as theirs, else the budget (torchrun would set 1 whatever the cores). With a launch
    config file and no --num-processes the count per machine is the launcher's: its default stays."""
    if "OMP_NUM_THREADS" in os.environ:
        return {USER_THREADS: os.environ["OMP_NUM_THREADS"]}
    if num_processes is None:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, available_cores() // max(num_processes, 1))), BUDGETED: "1"}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch runs one thread inside the block (restored after), for work made of many small
    operations: the data pipeline (``workers_per_gpu: 0`` runs it in the training process) and
    OHEM's blocked pass. Threads that wait for each other at every small operation collapse
    when other work takes the cores (measured with a busy loop per core on 2 cores: OHEM 13 ms
    idle, 608 ms loaded at 2 threads, 22 ms at 1; the CamVid pipeline 0.3 images/s at 2 threads,
    11 at 1). Only the main thread changes the count (it is global to the process)."""
    import torch

    threads = torch.get_num_threads()
    if threads == 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
