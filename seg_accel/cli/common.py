"""What every command shares: config arguments, packaged configs, one-line errors, exit codes.

Config mistakes print one ``error: <file>: <key>: <message>`` line on stderr and exit
with code 2 (a traceback only with ``--debug``); data and training errors exit with 1;
Ctrl-C exits with 130 after one line saying where the last checkpoint is.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from seg_accel.errors import ConfigError, DataError, TrainingError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the configs shipped with the package
INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C


def is_main_process() -> bool:
    """Before any process group exists: rank from the launcher's environment."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def exit_process(code: int) -> NoReturn:
    """End a command's process with ``code``. A process started by a launcher (several processes)
    leaves without the interpreter's final teardown, once its own work is flushed (threads joined,
    exit handlers run, logs and streams flushed): torch's gloo threads can still hold objects at
    that point, and tearing them down under a dying interpreter aborted about 1 run in 10 with
    "terminate called without an active exception" (SIGABRT) after a finished 2-process CPU
    training (measured: 2 of 20 runs of a bare Accelerate loop; 0 of 40 leaving this way)."""
    if world_size() <= 1:
        sys.exit(code)
    import atexit
    import logging
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()  # e.g. a Hub upload still running
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def where() -> str:
    """``process R of N: `` in a multi-process run (which process an error comes from)."""
    return f"process {os.environ.get('RANK', '0')} of {world_size()}: " if world_size() > 1 else ""


def packaged_configs() -> list[str]:
    """Names of the training configs shipped with seg-accel (``demo/segformer_synthetic``, ...)."""
    if not CONFIGS.is_dir():
        return []
    return sorted(str(p.relative_to(CONFIGS).with_suffix("")) for p in CONFIGS.rglob("*.yaml")
                  if p.relative_to(CONFIGS).parts[0] not in ("_base_", "accelerate"))


def resolve_config(text: str) -> str:
    """A config file: the path as given, else a packaged config by name (``demo/segformer_synthetic``,
    with or without ``.yaml``, a leading ``configs/`` or ``seg_accel::``, or by its file name alone:
    ``pspnet_r50-d8_512x1024_40k_cityscapes``), so that the shipped configs work from any
    directory after a plain ``pip install``."""
    from seg_accel.config.loader import PACKAGE_PREFIX, packaged_config

    if Path(text).is_file() or not CONFIGS.is_dir():
        return text
    name = text[len("configs/"):] if text.startswith("configs/") else text.removeprefix(PACKAGE_PREFIX)
    for candidate in (CONFIGS / name, CONFIGS / f"{name}.yaml", packaged_config(name)):
        if candidate.is_file():
            return str(candidate)
    return text  # the loader says it is missing


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", help="YAML or MMSegmentation .py config file, or the name of a packaged config "
                                       "(seg-accel list-configs)")
    add_option_arguments(parser)
    return parser


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--num-processes``, ``--config-file``, ``--main-process-port`` (evaluate, predict)."""
    launch = parser.add_argument_group("several processes (started through `accelerate launch`)")
    launch.add_argument("--num-processes", type=int, help="processes on this machine")
    launch.add_argument("--config-file", help="an Accelerate launch config")
    launch.add_argument("--main-process-port", type=int, help="port of the main process (default: a free one)")


TRUST_HELP = ("load an export whose config.json names code to import (a module export whose class is not "
              "registered here, a transformers model with custom code): only for exports you trust")


def add_option_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. optimizer.lr=0.01 data.train.pipeline.1.prob=0.5 a=[1,2] "
             "'model.decode_head.loss_decode=[{type: CrossEntropyLoss}, {type: DiceLoss}]'",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")


def config_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    return add_config_arguments(argparse.ArgumentParser(prog=prog, description=description))


def run_cli(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None, on_interrupt: Callable[[argparse.Namespace], str] | None = None) -> int:
    """Run a command: its own errors as one line with their exit code, Ctrl-C as one line and 130."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        args.config_arg, args.config = args.config, resolve_config(args.config)  # as typed, and the file
    try:
        return main(args) or 0
    except ConfigError as exc:
        if args.debug:
            raise
        # the main process reports it; under seg-accel's launcher every process does (another
        # may fail first and have the launcher stop the main process before it prints) and the
        # launcher passes the line on once
        if is_main_process() or os.environ.get("SEG_ACCEL_LAUNCHED") == "1":
            report(f"error: {exc}")
        return 2
    except (DataError, TrainingError) as exc:
        if args.debug:
            raise
        report(f"error: {where()}{one_line(exc)}")
        return 1
    except OSError as exc:  # a file seg-accel writes or reads: a full disk, no permission, a read-only folder
        if args.debug or exc.errno not in _STORAGE_ERRNOS:
            raise
        what = f"{exc.filename}: " if exc.filename else ""
        report(f"error: {where()}{what}{exc.strerror or exc}")
        return 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        if is_main_process():
            report(on_interrupt(args) if on_interrupt else "interrupted")
        return INTERRUPTED
    except Exception as exc:
        if not args.debug and (failure := library_import_failure(exc)) is not None:
            report(f"error: {where()}{failure}")
            return 1
        if args.debug or world_size() <= 1:
            raise
        return process_failed(exc)


_STORAGE_ERRNOS = {errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT, errno.EPERM, errno.ENOENT, errno.EISDIR,
                   errno.ENOTDIR, errno.EIO, errno.ENAMETOOLONG}


def library_import_failure(exc: BaseException) -> str | None:
    """One line for an error that comes from a library failing to import (a torchvision that does
    not belong to the installed torch makes transformers' model classes fail to import, in a long
    traceback that never names torchvision): the root cause, and where to look."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    if not any(isinstance(e, ImportError) for e in chain):
        return None
    root = chain[-1]
    first = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return (f"a library failed to import: {type(root).__name__}: {first[:300]}. `seg-accel env` shows the versions "
            "installed and whether torch and torchvision belong together")


def report(line: str) -> None:
    """The one line on stderr, and in the run's log file when there is one (why the run ended). A
    message from a library that spans lines (transformers' offline hint) is joined into one."""
    line = " ".join(part.strip() for part in line.splitlines() if part.strip())
    print(line, file=sys.stderr)
    from seg_accel.runtime.console import record_in_log_file

    record_in_log_file(line)


def one_line(exc: BaseException) -> str:
    """An error raised in a DataLoader worker comes back with the worker's traceback in its message:
    keep the message itself (the last line of that traceback)."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return text


# What a collective operation raises when another process died or stopped answering
# (gloo, NCCL, the TCP store): a consequence, not the cause.
_PEER_FAILURE_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                         "communicator was aborted", "watchdog caught collective operation timeout",
                         "timed out", "socket closed", "pair closure", "gloo/transport", "ncclremoteerror")


def is_peer_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _PEER_FAILURE_MARKERS)


def process_failed(exc: BaseException) -> int:
    """A multi-process run where this process raised: its own error is shown with its
    traceback; an error that only says another process went away (the launcher stops the
    others once one exits) is one line, so the failing process's error is the one to read."""
    import traceback

    if is_peer_failure(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "timed out" in first.lower() or "timeout" in first.lower():
            why = ("a collective operation timed out: another process stopped answering (it hangs, or is far "
                   "slower; `dist_timeout` in the config sets how long to wait)")
        else:
            why = "another process failed (its error is shown separately)"
        print(f"error: {where()}stopped: {why}. {type(exc).__name__}: {first[:300]}", file=sys.stderr)
        return 1
    print(f"error: {where()}failed; the other processes are stopped.\n" + "".join(traceback.format_exception(exc)),
          file=sys.stderr, end="")
    return 1
