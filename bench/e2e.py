#!/usr/bin/env python
"""End to end on CamVid: seg-accel against a transformers-example-style loop (bench/example_loop.py).

Same SegFormer (the tiny CamVid one, random init, seed 0), crop 256, batch 4 per process,
AdamW 1e-3 (the config's) with a polynomial decay, the same iterations; then each evaluates the 101 val
images. Both train the same recipe: the example's augmentation (random scale 0.5-2, random 256 crop,
flip), no gradient clipping, and the cross-entropy averaged over the labelled pixels (the
transformers model's own loss; seg-accel's `avg_non_ignore: true`, where MMSegmentation's default
divides by every pixel). The CamVid config as shipped adds PhotoMetricDistortion, crops
with cat_max_ratio 0.75 and clips gradients (max_norm 1); `--recipe config` trains seg-accel that
way instead (more work per image, a different training: not the same comparison). Run as a user runs them: the example under `accelerate launch` (torchrun's default of
one thread per process when several), seg-accel with `seg-accel train [--num-processes N]`
(its thread budget). seg-accel runs twice per pair: with its defaults (fp32) and with its
documented fast path on CPUs with bfloat16 support (`mixed_precision: bf16`). Runs alternate
(the order flips every pair) so that the machine's drift hits every loop alike.

Reported per loop, as the median and the spread over the pairs: seconds per iteration (the
median iteration, data loading included), images per second over the whole training, the
start-up (process launch to the first iteration), the evaluation's time, the main process's
peak memory, and the val mIoU at the end.

    python bench/e2e.py [--processes 1 2] [--iters 100] [--pairs 2] [--data ../shared/data/camvid]
                        [--seeds 0 1 2] [--loops seg-accel bf16] [--recipe example|config]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/camvid/segformer_tiny_camvid_2k.yaml"
# the example's recipe in the config's words (--recipe example): its augmentation, no clipping,
# cross-entropy averaged over the labelled pixels (transformers' loss) instead of all of them
EXAMPLE_RECIPE = (
    "data.train.pipeline=["
    "{type: RandomResize, scale: [480, 360], ratio_range: [0.5, 2.0], keep_ratio: true, antialias: true}, "
    "{type: RandomCrop, crop_size: [256, 256]}, {type: RandomFlip, prob: 0.5}, "
    "{type: Normalize, mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375], to_rgb: true}, "
    "{type: Pad, size: [256, 256], pad_val: 0, seg_pad_val: 255}]",
    "optimizer_config.grad_clip=null",
    "model.decode_head.loss_decode.avg_non_ignore=true",  # the model's own loss: the mean over labelled pixels
)


def run_example(data: Path, iters: int, processes: int, out: Path, seed: int = 0,
                timeout: float | None = None) -> dict:
    script = [str(REPO / "bench/example_loop.py"), "--data", str(data), "--iters", str(iters), "--out", str(out),
              "--seed", str(seed)]
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1"}  # the example knows no other way to run on CPUs
    else:
        command, env = [sys.executable, *script], dict(os.environ)
    return launched(command, env, out, timeout=timeout)


def run_seg_accel(data: Path, iters: int, processes: int, out: Path, work: Path, fast: bool,
                  extra: tuple[str, ...] = (), seed: int = 0) -> dict:
    options = [f"seed={seed}", f"runner.max_iters={iters}", "checkpoint_config=null", "evaluation.interval=1000000",
               "evaluation.save_best=null", "log_config.interval=50", f"data.train.data_root={data}",
               f"data.val.data_root={data}", "custom_imports.imports=[e2e_probe]",
               f"custom_hooks=[{{type: E2EProbe, out: {out}}}, {{type: E2EProbeWriter}}]"]
    if fast:
        options.append("mixed_precision=bf16")
    options += extra
    command = [sys.executable, "-m", "seg_accel", "train", str(CONFIG), "--work-dir", str(work),
               "--num-processes", str(processes), "--cfg-options", *options]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'bench'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return launched(command, env, out, cwd=REPO / "bench")


def launched(command: list[str], env: dict, out: Path, cwd: Path = REPO, timeout: float | None = None) -> dict:
    started = time.time()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        sys.exit(f"a run failed ({' '.join(command[:6])} ...):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["startup_seconds"] = result["first_iteration"] - started
    result["images_per_second"] = result["iters"] * result["batch_per_process"] * result["processes"] / \
        result["train_seconds"]
    return result


def summary(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs]
    middle = statistics.median(values)
    spread = f" ({min(values):.3g}-{max(values):.3g})" if len(values) > 1 else ""
    return f"{middle:.3g}{spread}"


def bf16_supported() -> bool:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() in ("AVX512", "AMX")) or \
        bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--data", default=str(REPO.parent / "shared/data/camvid"))
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="one seed per pair (default: seed 0 for every pair); the mIoU spread is then the seeds'")
    parser.add_argument("--recipe", choices=["example", "config"], default="example",
                        help="seg-accel's training recipe: the example's augmentation without clipping (the same "
                             "training), or the CamVid config as shipped")
    parser.add_argument("--loops", nargs="+", choices=["example", "seg-accel", "seg-accel bf16"],
                        help="run only these loops (the example always runs: it is the baseline)")
    args = parser.parse_args()
    data = Path(args.data).resolve()
    if not (data / "train.txt").is_file():
        sys.exit(f"CamVid not found at {data} (--data)")
    fast = bf16_supported()
    loops = ["example", "seg-accel"] + (["seg-accel bf16"] if fast else [])
    if args.loops:
        loops = [loop for loop in loops if loop == "example" or loop in args.loops]
    if args.seeds:
        args.pairs = len(args.seeds)
    seeds = args.seeds or [0] * args.pairs
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU core(s)"
    print(f"CamVid, tiny SegFormer, crop 256, batch 4 per process, {args.iters} iterations, {args.pairs} alternating "
          f"pair(s); {where}; bf16 fast path: {'yes' if fast else 'no (no bf16 here)'}; seeds {seeds}; "
          f"seg-accel's recipe: {args.recipe}")
    for processes in args.processes:
        results: dict[str, list[dict]] = {loop: [] for loop in loops}
        with tempfile.TemporaryDirectory(prefix="e2e-") as tmp:
            for pair in range(args.pairs):
                for i, loop in enumerate(loops if pair % 2 == 0 else loops[::-1]):
                    out = Path(tmp) / f"{loop.replace(' ', '_')}_{pair}.json"
                    if loop == "example":
                        result = run_example(data, args.iters, processes, out, seeds[pair])
                    else:
                        result = run_seg_accel(data, args.iters, processes, out, Path(tmp) / f"w{pair}{i}",
                                               fast=loop.endswith("bf16"), seed=seeds[pair],
                                               extra=EXAMPLE_RECIPE if args.recipe == "example" else ())
                    results[loop].append(result)
                    print(f"  {processes} process(es), pair {pair + 1} (seed {seeds[pair]}): {loop}: "
                          f"{result['images_per_second']:.2f} "
                          f"images/s, mIoU {result['miou']:.2f}", flush=True)
        base = statistics.median(r["images_per_second"] for r in results["example"])
        print(f"\n{processes} process(es)")
        print("| loop | s/iteration | images/s | vs example | start-up (s) | training (s) | evaluation (s) | "
              "peak memory (MiB) | val mIoU |")
        print("|---|---|---|---|---|---|---|---|---|")
        for loop, runs in results.items():
            ratio = statistics.median(r["images_per_second"] for r in runs) / base
            print(f"| {loop} | {summary(runs, 'iteration_seconds_median')} | {summary(runs, 'images_per_second')} | "
                  f"{ratio:.2f}x | {summary(runs, 'startup_seconds')} | {summary(runs, 'train_seconds')} | "
                  f"{summary(runs, 'eval_seconds')} | {summary(runs, 'peak_memory_mib')} | {summary(runs, 'miou')} |")
        if not all(r.get("datasets", True) for r in results["example"]):
            print("(datasets/evaluate are not installed here: the example read the files with PIL into a torch "
                  "Dataset and scored with the same per-image histograms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
