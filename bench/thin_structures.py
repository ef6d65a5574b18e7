#!/usr/bin/env python
"""Thin structures: an smp UNet (full-resolution output) vs the tiny SegFormer (1/4
resolution) on SyntheticCurves (curves 1-3 px wide), at equal iterations and at equal
training time.

Both train from the shipped configs (configs/smp/unet_r18_thin_curves.yaml,
configs/demo/segformer_thin_curves.yaml: same data, AdamW, poly schedule, batch 4 of
128x128), one process at seg-accel's thread settings, then are evaluated on the 32
validation images; the table gives the curve class's IoU and Dice and the training time
(the JSON log's per-iteration times, start-up and evaluation left out). The equal-time row
trains the SegFormer for as many iterations as fit in the UNet's training time.

Run: python bench/thin_structures.py [--iters 600]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UNET = "configs/smp/unet_r18_thin_curves.yaml"
SEGFORMER = "configs/demo/segformer_thin_curves.yaml"


def train(config: str, iters: int, work: Path) -> dict:
    log_interval = 10
    cmd = [sys.executable, "-m", "seg_accel", "train", str(REPO / config), "--work-dir", str(work), "--cfg-options",
           f"runner.max_iters={iters}", f"checkpoint_config.interval={iters}", f"log_config.interval={log_interval}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in next(work.glob("*.log.json")).read_text().splitlines()]
    seconds = sum(r["time"] * log_interval for r in records if r.get("mode") == "train")
    results = json.loads((work / "eval_results.json").read_text())
    per_class = results["per_class"]
    return {"iters": iters, "seconds": seconds, "iou": per_class["IoU"]["curve"], "dice": per_class["Dice"]["curve"],
            "s_per_iter": seconds / iters}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=600)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        unet = train(UNET, args.iters, Path(tmp) / "unet")
        segformer = train(SEGFORMER, args.iters, Path(tmp) / "segformer")
        equal_time = max(1, round(unet["seconds"] / segformer["s_per_iter"]))
        segformer_long = train(SEGFORMER, equal_time, Path(tmp) / "segformer_long")
    rows = [("smp UNet-R18 (full resolution)", unet), ("tiny SegFormer (1/4), equal iterations", segformer),
            ("tiny SegFormer (1/4), equal training time", segformer_long)]
    import torch

    print(f"SyntheticCurves 128x128, batch 4, 1 process, {torch.get_num_threads()} torch threads; "
          f"validation: 32 images (seed 1)")
    print("| model | iterations | training time (s) | curve IoU | curve Dice |")
    print("|---|---|---|---|---|")
    for name, row in rows:
        print(f"| {name} | {row['iters']} | {row['seconds']:.0f} | {row['iou']:.2f} | {row['dice']:.2f} |")


if __name__ == "__main__":
    main()
