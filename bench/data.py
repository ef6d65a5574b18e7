#!/usr/bin/env python
"""Data loading throughput on CamVid: decode + the training pipeline, images per second.

1. Map-style CustomDataset (PNG files) with 0 workers (at 1 torch thread and at this machine's
   default), 1 and 2 DataLoader workers.
2. The same images written as parquet shards (Hub layout, in a temp dir), read map-style
   (datasets/Arrow) and streamed (seg-accel's shard stream), with 2 workers.
3. With --train: a short CamVid training (2 processes, the config's batch and workers)
   and the share of each iteration spent waiting for data (data_time / time).

Every loader runs on the idle machine and again with a competing load the bench starts itself
(a busy loop per core, bench/load.py); "loaded / idle" is the share of its speed it keeps.
Ratios are against the first row (map-style, 0 workers, idle), measured in the same run.
Run from the repository root: python bench/data.py [--batches 40] [--train] [--no-load]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from load import competing_load, cores  # noqa: E402
CONFIG = REPO / "configs/camvid/segformer_tiny_camvid_2k.yaml"
CAMVID = REPO.parent / "shared" / "data" / "camvid"
ROOTS = [f"data.train.data_root={CAMVID}", f"data.val.data_root={CAMVID}"]  # the config reads data/camvid


def throughput(dataset, workers: int, batches: int, batch_size: int, threads: int | None = None) -> float:
    import torch

    from seg_accel.data import build_train_loader

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        return _throughput(build_train_loader(dataset, batch_size, workers, 0, 1, seed=0), batches, batch_size)
    finally:
        torch.set_num_threads(default)


def _throughput(loader, batches: int, batch_size: int) -> float:
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def write_parquet(dataset, root: Path, shards: int) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    (root / "data").mkdir(parents=True)
    names = dataset.names
    for s in range(shards):
        part = names[s::shards]
        rows = {"image": [], "label": []}
        for name in part:
            rows["image"].append({"bytes": (dataset.img_dir / f"{name}.png").read_bytes(), "path": None})
            rows["label"].append({"bytes": (dataset.ann_dir / f"{name}.png").read_bytes(), "path": None})
        table = datasets.Dataset.from_dict(rows, features=features)
        table.to_parquet(str(root / "data" / f"train-{s:05d}-of-{shards:05d}.parquet"))


def train_data_share(iters: int) -> tuple[float, float]:
    work = Path(tempfile.mkdtemp()) / "work"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_config.yaml"),
           str(REPO / "scripts/train.py"), str(CONFIG), "--work-dir", str(work), "--cfg-options",
           f"runner.max_iters={iters}", "log_config.interval=1", "data.val=null", "evaluation=null",
           "checkpoint_config=null", *ROOTS]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:  # say why, not a bare CalledProcessError
        sys.exit(f"the CamVid training failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in next(work.glob("*.log.json")).read_text().splitlines()]
    records = [r for r in records if r["mode"] == "train"][2:]  # leave out the start-up iterations
    data = sum(r["data_time"] for r in records) / len(records)
    total = sum(r["time"] for r in records) / len(records)
    return data, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--train", action="store_true", help="also measure data_time during CamVid training")
    parser.add_argument("--train-iters", type=int, default=30)
    parser.add_argument("--no-load", action="store_true", help="leave out the loaded-machine runs")
    args = parser.parse_args()
    os.chdir(REPO)
    from seg_accel.config import load_config
    from seg_accel.validate import validate_train_config
    from seg_accel.data import build_dataset

    if not (REPO.parent / "shared/data/camvid").is_dir():
        sys.exit("bench/data.py needs ../shared/data/camvid beside the repository")
    cfg = validate_train_config(load_config(CONFIG, ROOTS))
    batch_size = cfg.data.samples_per_gpu
    folder = build_dataset(cfg.data.train, "data.train")
    import torch

    default_threads = torch.get_num_threads()
    loaders = [("CustomDataset (PNG files), workers: 0, 1 torch thread", folder, 0, 1),
               (f"CustomDataset (PNG files), workers: 0, {default_threads} torch threads (default)", folder, 0, None),
               ("CustomDataset (PNG files), workers: 1", folder, 1, None),
               ("CustomDataset (PNG files), workers: 2", folder, 2, None)]
    with tempfile.TemporaryDirectory() as tmp:
        write_parquet(folder, Path(tmp), shards=4)
        common = {k: v for k, v in cfg.data.train.items() if k in ("classes", "label_map", "pipeline")}
        for streaming in (False, True):
            hub = build_dataset({"type": "HubDataset", "path": tmp, "streaming": streaming, **common}, "data.train")
            kind = "streamed (4 shards)" if streaming else "map-style (datasets/Arrow)"
            loaders.append((f"HubDataset parquet, {kind}, workers: 2", hub, 2, None))
        idle = [throughput(dataset, workers, args.batches, batch_size, threads)
                for _, dataset, workers, threads in loaders]
        loaded = []
        if not args.no_load:
            with competing_load():
                loaded = [throughput(dataset, workers, args.batches, batch_size, threads)
                          for _, dataset, workers, threads in loaders]
    base = idle[0]
    print(f"CamVid train, {len(folder)} images 480x360, pipeline of {CONFIG.name}, batch {batch_size}, "
          f"{args.batches} batches, {cores()} core(s); loaded: a busy loop per core")
    print("| loader | idle images/s | vs first row | loaded images/s | loaded / idle |")
    print("|---|---|---|---|---|")
    for i, (name, *_) in enumerate(loaders):
        row = f"| {name} | {idle[i]:.1f} | {idle[i] / base:.2f}x |"
        row += f" {loaded[i]:.1f} | {100 * loaded[i] / idle[i]:.0f}% |" if loaded else " - | - |"
        print(row)
    if args.train:
        data, total = train_data_share(args.train_iters)
        print(f"\nCamVid training, 2 processes x {cfg.data.workers_per_gpu} workers, batch {batch_size} per process: "
              f"data_time {data * 1e3:.1f} ms of {total * 1e3:.0f} ms per iteration = {100 * data / total:.1f}%")


if __name__ == "__main__":
    main()
