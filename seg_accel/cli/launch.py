"""Start a command on several processes through Accelerate's launcher, from a parent process that
checks the config while the launcher starts (the launcher's start-up and the check each take
seconds of imports; done one after the other they delayed the first iteration): a config error
stops the launcher before its processes do anything and is reported once, by the parent.

The launcher runs in a session of its own with its output passed through, so that Ctrl-C
reaches only this parent: it stops every process (SIGINT, then SIGTERM, then SIGKILL),
drops the teardown chatter (one traceback per process), and prints one line instead.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO

from seg_accel.cli.common import INTERRUPTED


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_arguments(num_processes: int | None, config_file: str | None, port: int | None) -> list[str]:
    """``accelerate launch`` options: a launch config file (``--config-file``) or N processes on
    this machine (one per GPU; on a machine without GPUs, N CPU processes over gloo)."""
    args: list[str] = []
    if config_file is not None:
        args += ["--config_file", config_file]
        if num_processes is not None:
            args += ["--num_processes", str(num_processes)]
    else:
        n = num_processes or 1
        args += ["--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
                 "--dynamo_backend", "no"]
        if n > 1:
            args.append("--multi_gpu")  # seg-accel switches Accelerate to the CPU itself when there is no GPU
    args += ["--main_process_port", str(port or free_port())]
    return args


class _Pump(threading.Thread):
    """Copies a child's output to ours as it comes (progress bars included) until muted."""

    def __init__(self, source: IO[bytes], target: IO[bytes]):
        super().__init__(daemon=True)
        self.source, self.target, self.muted = source, target, False

    def run(self) -> None:
        fd = self.source.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            if not self.muted:
                self.target.write(chunk)
                self.target.flush()


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop the launcher and everything it started (they share its process group)."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # the group may outlive its leader for a moment (DataLoader workers): make sure
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def launch(module: str, argv: list[str], launch_args: list[str], on_interrupt: Callable[[], str],
           num_processes: int | None = None, check: Callable[[], object] | None = None) -> int:
    """``python -m accelerate.commands.launch <launch_args> -m <module> <argv>``; returns its exit code.
    The processes get the thread budget (torchrun would give each 1 thread whatever the cores).
    ``check()`` runs here while the launcher starts; if it raises, the launcher and its processes
    are stopped (their output dropped) and the error goes on up."""
    from seg_accel.threads import launcher_environment

    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", module, *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **launcher_environment(num_processes)}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    pumps = [_Pump(proc.stdout, sys.stdout.buffer), _Pump(proc.stderr, sys.stderr.buffer)]
    for pump in pumps:
        pump.start()
    if check is not None:
        try:
            check()
        except BaseException:
            for pump in pumps:
                pump.muted = True
            _stop(proc, grace=5.0)
            raise
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        for pump in pumps:
            pump.muted = True
        _stop(proc)
        print("\n" + on_interrupt(), file=sys.stderr, flush=True)  # a progress bar may be mid-line
        return INTERRUPTED
    for pump in pumps:
        pump.join()
    return code


def relaunch(module: str, argv: list[str], args: object) -> int:
    """Run ``module`` with ``argv`` on the processes the command's launch options ask for
    (``--num-processes``, ``--config-file``, ``--main-process-port``)."""
    num_processes = getattr(args, "num_processes", None)
    return launch(module, argv, launch_arguments(num_processes, getattr(args, "config_file", None),
                                                 getattr(args, "main_process_port", None)),
                  lambda: "interrupted: every process stopped", num_processes)
