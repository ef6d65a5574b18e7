#!/usr/bin/env python
"""Mask2Former's point-sampled mask loss against the mask loss on every pixel: time and peak
memory per training iteration.

One small Mask2Former (the demo's sizes, random init) trains on batches of SyntheticShapes
images with seg-accel's objective (matching + losses of the final and the auxiliary decoder
layers, forward and backward, one AdamW step) at ``train_num_points`` = 0 (every pixel of the
label map: the notebook recipe) and at several point counts. Each setting runs in a process of
its own (so that its peak resident memory is its own), at the thread count seg-accel gives a
process (all cores), on the idle machine and with a competing load the bench starts itself (a
busy loop per core, bench/load.py). Prints a table; the ratios are against every pixel.
Run: python bench/mask_points.py [--size 512] [--batch 2] [--iters 5] [--points 1024 4096 12544] [--no-load]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load import competing_load, cores, describe  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_setting(points: int, size: int, batch: int, iters: int) -> dict:
    """Train ``iters`` iterations (after 2 warm-up) in this process; per-iteration median and peak RSS."""
    import torch
    import yaml

    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from seg_accel.data.synthetic import SyntheticShapes
    from seg_accel.models import build_model, family_of_model

    demo = yaml.safe_load(open(os.path.join(REPO, "configs/demo/mask2former_synthetic.yaml")))
    model_cfg = dict(demo["model"])
    model_cfg["config"] = {**model_cfg["config"], "train_num_points": points}
    torch.manual_seed(0)
    classes = ["background", "circle", "square", "triangle"]
    model = build_model(parse_section(model_cfg, ModelConfig, "model"), classes).train()
    objective = family_of_model(model).training_objective(model, 255, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = SyntheticShapes(num_samples=batch * (iters + 2), img_size=[size, size], seed=0)
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(iters + 2):
        samples = [data[i * batch + j] for j in range(batch)]
        pixel_values = torch.stack([s["pixel_values"] for s in samples]) / 255.0
        batch_data = {"pixel_values": pixel_values, "labels": torch.stack([s["labels"] for s in samples]),
                      "indices": torch.arange(i * batch, (i + 1) * batch)}
        start = time.perf_counter()
        loss, _ = objective(model, batch_data, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"ms": statistics.median(times) * 1e3, "peak_mib": peak / 1024, "growth_mib": (peak - before) / 1024}


def run_setting(points: int, args: argparse.Namespace) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", str(points), "--size", str(args.size), "--batch",
                           str(args.batch), "--iters", str(args.iters)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--points", type=int, nargs="+", default=[1024, 4096, 12544])
    parser.add_argument("--no-load", action="store_true", help="leave out the loaded-machine rows")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a setting, in its own process
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one_setting(args.one, args.size, args.batch, args.iters)))
        return
    print(f"Mask2Former (demo sizes) training iteration, batch {args.batch} x {args.size}x{args.size}, median of "
          f"{args.iters} (after 2 warm-up), one process per setting; {cores()} core(s)")
    print("| mask loss on | machine | ms/iter | vs every pixel | peak RSS (MiB) | growth in the loop (MiB) |")
    print("|---|---|---|---|---|---|")
    for loaded in ([False] if args.no_load else [False, True]):
        with competing_load() if loaded else contextlib.nullcontext():
            full = run_setting(0, args)
            rows = [("every pixel (train_num_points: 0)", full)]
            rows += [(f"{p} points per mask", run_setting(p, args)) for p in args.points]
            for name, row in rows:
                print(f"| {name} | {describe(loaded)} | {row['ms']:.1f} | {row['ms'] / full['ms']:.2f}x | "
                      f"{row['peak_mib']:.0f} | {row['growth_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
