"""Start a command on several processes through Accelerate's launcher, from a parent process that
checks the config while the launcher starts (the launcher's start-up and the check each take
seconds of imports; done one after the other they delayed the first iteration): a config error
stops the launcher before its processes do anything and is reported once, by the parent.

The launcher runs in a session of its own with its output passed through, so that Ctrl-C
reaches only this parent: it stops every process (SIGINT, then SIGTERM, then SIGKILL),
drops the teardown chatter (one traceback per process), and prints one line instead. A
SIGTERM to this parent (what a scheduler sends) does the same. When a process fails, the
launcher's own report (its traceback, the ChildFailedError block, its log lines) is kept
from the output and read instead: a process killed by a signal is one line naming it (for
training with the newest checkpoint and the command that resumes); a process that exits
with an error has printed its own line, and its exit code (2 for a config mistake) is the
command's.
"""
from __future__ import annotations

import os
import re
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
        self.last = b""  # the last byte written: a progress bar may have left its line open

    def run(self) -> None:
        fd = self.source.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.feed(chunk)
        self.feed(b"", final=True)

    def feed(self, chunk: bytes, final: bool = False) -> None:
        self.write(chunk)

    def write(self, data: bytes) -> None:
        if data and not self.muted:
            self.target.write(data)
            self.target.flush()
            self.last = data[-1:]

    def line_open(self) -> bool:
        """Whether what was written last left a line open (a progress bar without its newline)."""
        return self.last not in (b"", b"\n", b"\r")


# the launcher's (torch elastic's) log lines: "E1201 21:06:25.749000 14452 torch/distributed/..."
_LAUNCHER_LOG = re.compile(rb"^[WEIF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ torch/distributed/")
_MAYBE_LAUNCHER_LOG = re.compile(rb"^[WEIF]\d{0,4}( \d{0,2}(:\d{0,2}(:\d{0,2})?)?)?$")
_FIELD = re.compile(r"^\s+(rank|exitcode)\s*: (-?\d+)")
_PEER_STOPPED = b"stopped: another process failed (its error is shown separately)"


class _StderrFilter(_Pump):
    """The launched processes' stderr, less the launcher's own report of a failure, which it
    reads: ``failures`` holds ``(rank, exitcode)`` of each failed process, root cause first.
    A process's "stopped: another process failed" line waits in ``held`` (a consequence: shown
    only when nothing else explains the failure)."""

    def __init__(self, source: IO[bytes], target: IO[bytes]):
        super().__init__(source, target)
        self.pending = b""  # the start of a line that may be the launcher's
        self.block: list[bytes] | None = None  # a traceback being read: the launcher's, or passed on
        self.in_report = False
        self.failures: list[tuple[int, int]] = []
        self.root: tuple[int, int] | None = None
        self._field: dict[str, int] = {}
        self._in_root = False
        self.held: list[bytes] = []
        self._errors_seen: set[bytes] = set()

    def feed(self, chunk: bytes, final: bool = False) -> None:
        data = self.pending + chunk
        self.pending = b""
        while data:
            line, newline, rest = data.partition(b"\n")
            if not newline:  # an incomplete line: a progress bar goes out now, a launcher line waits
                if final or not self._may_be_launcher(line):
                    self._line(line, b"")
                else:
                    self.pending = line
                return
            self._line(line, b"\n")
            data = rest

    def _may_be_launcher(self, line: bytes) -> bool:
        tail = line.rsplit(b"\r", 1)[-1]
        return self.block is not None or self.in_report or bool(_MAYBE_LAUNCHER_LOG.match(tail[:17])) or \
            bool(_LAUNCHER_LOG.match(tail)) or b"Traceback (most recent call last):".startswith(tail) or \
            tail.startswith(b"Traceback")

    def _line(self, line: bytes, end: bytes) -> None:
        head, _, tail = line.rpartition(b"\r")  # what a progress bar drew before the line itself
        if head:
            self.write(head + b"\r")
        if self.in_report:
            self._report_line(tail.decode(errors="replace"))
            return
        if self.block is not None:
            self.block.append(tail + end)
            if b"accelerate/commands/launch.py" in tail or b"torch/distributed/run.py" in tail:
                self.block = None
                self.in_report = True  # the launcher's traceback: dropped through the end of its report
            elif not tail.startswith(b" ") and not tail.startswith(b"Traceback"):
                block, self.block = self.block, None  # a process's own traceback: passed on
                self.write(b"".join(block))
            return
        if tail.startswith(b"Traceback (most recent call last):"):
            self.block = [tail + end]
            return
        if _LAUNCHER_LOG.match(tail):
            return
        if tail.startswith(b"error: "):
            # every process reports a config error (the first to fail may take the others down
            # before the main process prints): the same line once
            if tail in self._errors_seen:
                return
            self._errors_seen.add(tail)
        if _PEER_STOPPED in tail:
            self.held.append(tail + end)
            return
        self.write(tail + end)

    def _report_line(self, text: str) -> None:
        if text.startswith("Root Cause"):
            self._in_root = True
        match = _FIELD.match(text)
        if match:
            self._field[match.group(1)] = int(match.group(2))
            if len(self._field) == 2:
                failure = (self._field["rank"], self._field["exitcode"])
                self._field = {}
                if self._in_root:
                    self.root = failure
                else:
                    self.failures.append(failure)
        if self._in_root and text.startswith("=" * 20):
            self.in_report = False  # the report's last line

    def release_held(self) -> None:
        for line in self.held:
            self.write(line)
        self.held = []


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


LAUNCHED_ENV = "SEG_ACCEL_LAUNCHED"  # set for the processes seg-accel starts: their config errors come through this filter


class _Terminated(Exception):
    """SIGTERM to the parent while its processes run."""


TERMINATED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def launch(module: str, argv: list[str], launch_args: list[str], on_stop: Callable[[str], str],
           num_processes: int | None = None, check: Callable[[], object] | None = None) -> int:
    """``python -m accelerate.commands.launch <launch_args> -m <module> <argv>``; returns its exit code.
    The processes get the thread budget (torchrun would give each 1 thread whatever the cores).
    ``check()`` runs here while the launcher starts; if it raises, the launcher and its processes
    are stopped (their output dropped) and the error goes on up. ``on_stop(why)`` is the line
    printed when the run is stopped from outside (Ctrl-C, SIGTERM, a process killed), starting
    with ``why``."""
    from seg_accel.threads import launcher_environment

    command = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "-m", module, *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **launcher_environment(num_processes), LAUNCHED_ENV: "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    errors = _StderrFilter(proc.stderr, sys.stderr.buffer)
    pumps = [_Pump(proc.stdout, sys.stdout.buffer), errors]
    for pump in pumps:
        pump.start()

    def stop(why: str, code: int, error: bool) -> int:
        for pump in pumps:
            pump.muted = True
        _stop(proc)
        print("\n" + ("error: " if error else "") + on_stop(why), file=sys.stderr, flush=True)  # a bar may be mid-line
        return code

    def terminated(signum: int, frame: object) -> None:
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
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
            return stop("interrupted", INTERRUPTED, error=False)
        except _Terminated:
            return stop("terminated (SIGTERM to seg-accel)", TERMINATED, error=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    for pump in pumps:
        pump.join()
    return _outcome(code, errors, on_stop, num_processes)


def _outcome(code: int, errors: _StderrFilter, on_stop: Callable[[str], str], num_processes: int | None) -> int:
    """The command's exit code once the launcher has ended, and the one line for a process that
    was killed (whose own output says nothing)."""
    if code == 0:
        errors.release_held()
        return 0
    failures = ([errors.root] if errors.root else []) + errors.failures
    killed = [(rank, -exit_code) for rank, exit_code in failures if exit_code < 0 and -exit_code != signal.SIGTERM]
    if killed:  # the launcher sends SIGTERM to the others once one is gone: the root cause is the first
        rank, number = killed[0]
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        of = f" of {num_processes}" if num_processes else ""
        lead = "\n" if errors.line_open() else ""  # the one line starts a line of its own
        print(f"{lead}error: {on_stop(f'process {rank}{of} was killed ({name})')}", file=sys.stderr, flush=True)
        return 1
    errors.release_held()
    exit_codes = [exit_code for _, exit_code in failures if exit_code > 0]
    return 2 if 2 in exit_codes else (exit_codes[0] if exit_codes else code)


def relaunch(module: str, argv: list[str], args: object) -> int:
    """Run ``module`` with ``argv`` on the processes the command's launch options ask for
    (``--num-processes``, ``--config-file``, ``--main-process-port``)."""
    num_processes = getattr(args, "num_processes", None)
    return launch(module, argv, launch_arguments(num_processes, getattr(args, "config_file", None),
                                                 getattr(args, "main_process_port", None)),
                  lambda why: f"{why}: every process stopped", num_processes)
