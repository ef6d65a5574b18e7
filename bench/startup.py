#!/usr/bin/env python
"""Start-up of the demo: process launch to the first line seg-accel prints, and to the end of the
first training iteration (its log line, printed at ``log_config.interval=1``).

Runs ``python -m seg_accel train configs/demo/segformer_synthetic.yaml`` as a user runs it
(1 and 2 processes; 3 iterations, no evaluation, no checkpoints) several times, alternating between
this checkout and, with ``--against DIR``, another checkout (e.g. an older commit made with
``git worktree add /tmp/before <commit>``), and prints the medians with the spread.

    python bench/startup.py [--runs 3] [--processes 1 2] [--against /tmp/before]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ["runner.max_iters=3", "log_config.interval=1", "evaluation=null", "checkpoint_config=null"]


def one_run(repo: Path, processes: int) -> tuple[float, float]:
    """(seconds to the first printed line, seconds to the first iteration's log line)."""
    with tempfile.TemporaryDirectory(prefix="startup-") as work:
        command = [sys.executable, "-m", "seg_accel", "train", "configs/demo/segformer_synthetic.yaml",
                   "--num-processes", str(processes), "--work-dir", work, "--cfg-options", *OPTIONS]
        env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        started = time.perf_counter()
        proc = subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        first_line = first_iteration = None
        lines = []
        for line in proc.stdout:
            now = time.perf_counter() - started
            lines.append(line)
            if first_line is None and line.strip():
                first_line = now
            if first_iteration is None and "Iter [1/" in line:
                first_iteration = now
        if proc.wait() != 0 or first_line is None or first_iteration is None:
            sys.exit(f"the run in {repo} failed:\n{''.join(lines[-30:])}")
        return first_line, first_iteration


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--against", type=Path, help="another checkout to measure alternately (the 'before')")
    args = parser.parse_args()
    checkouts = {"this checkout": REPO}
    if args.against:
        checkouts = {f"{args.against}": args.against.resolve(), "this checkout": REPO}
    print(f"demo start-up, {args.runs} runs each, alternating; {os.cpu_count()} CPU core(s)")
    print("| checkout | processes | first line (s) | first iteration done (s) |")
    print("|---|---|---|---|")
    for processes in args.processes:
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in checkouts}
        for run in range(args.runs):
            order = list(checkouts.items()) if run % 2 == 0 else list(checkouts.items())[::-1]
            for name, repo in order:
                times[name].append(one_run(repo, processes))
        for name, values in times.items():
            print(f"| {name} | {processes} | {spread([v[0] for v in values])} | {spread([v[1] for v in values])} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
