#!/usr/bin/env python
"""Trainer overhead: seg-accel's runner with every hook on vs a bare Accelerate loop.

Same model (the demo's SegFormer), optimizer (AdamW), batch (8 images of 64x64) and
in-memory data (pre-made tensors) in both; one process. The runner adds the lr
schedule, the optimizer hook, the timer, the text/JSON logger (every 50 iterations),
a checkpoint every `--checkpoint-interval` iterations and its loss bookkeeping
(acc_seg, per-loss logs). The bare loop: forward, cross-entropy, backward, step.
The two alternate (bare, runner, bare, runner, ...) after one unmeasured round of each
(imports and caches that the first checkpoint save and first run pay once); each pair
gives ratios of the per-iteration median times and of the total times; the medians of
those ratios are reported (pairs cancel the slow drifts of a shared machine; per-iteration
medians ignore its spikes, totals include the checkpoint saves).

`--model smp-unet-r18`: an smp UNet on a ResNet-18 encoder (random init) instead, the plain
loop building it with `segmentation_models_pytorch.Unet` itself (what a Lightning/smp user
writes by hand). `--loaded`: with a competing busy-loop process per core (bench/load.py). seg-accel turns on
torch's fused AdamW kernel by default (the bare loop keeps torch's default); `--unfused`
gives the runner `optimizer.fused: false`, the same kernel as the bare loop, so that the
ratio is the runner's own cost.

Run: python bench/overhead.py [--model segformer|smp-unet-r18] [--loaded] [--iters 100] [--repeats 9]
     [--checkpoint-interval 100] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from seg_accel.data.base import SegDataset  # noqa: E402
from seg_accel.registry import DATASETS  # noqa: E402

SIZE, BATCH, SAMPLES, WARMUP = 64, 8, 64, 10
SMP_UNET = {"type": "smp.Unet", "encoder_name": "resnet18", "encoder_weights": None}
MODEL = {"name": "segformer", "fused": None}  # set by --model, --unfused


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    from seg_accel.data.synthetic import SyntheticShapes

    shapes = SyntheticShapes(num_samples=SAMPLES, img_size=SIZE)
    images, labels = zip(*(shapes.read(i) for i in range(SAMPLES)))
    pixel_values = (torch.from_numpy(__import__("numpy").stack(images)).permute(0, 3, 1, 2).float() - 128.0) / 64.0
    return pixel_values, torch.from_numpy(__import__("numpy").stack(labels)).long()


DATA = make_data()


@DATASETS.register()
class InMemoryShapes(SegDataset):
    """Pre-made tensors: no decoding, no pipeline (the bench measures the trainer, not the data)."""

    def __init__(self, pipeline: list | None = None):
        super().__init__(pipeline, ["background", "circle", "square", "triangle"])

    @classmethod
    def resolve_classes(cls, **kwargs) -> list[str]:
        return ["background", "circle", "square", "triangle"]

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, key):
        index, _, epoch = (*key, 0)[:3] if isinstance(key, tuple) else (key, None, 0)
        return {"pixel_values": DATA[0][index], "labels": DATA[1][index], "index": index, "epoch": epoch,
                "skipped": []}


def config(work_dir: str, iters: int, checkpoint_interval: int) -> dict:
    import yaml

    demo = yaml.safe_load((REPO / "configs/demo/segformer_synthetic.yaml").read_text())
    return {
        "model": dict(SMP_UNET) if MODEL["name"] == "smp-unet-r18" else demo["model"],
        "data": {"samples_per_gpu": BATCH, "workers_per_gpu": 0, "train": {"type": "InMemoryShapes"}},
        "optimizer": {"type": "AdamW", "lr": 0.002, "weight_decay": 0.01,
                      **({"fused": MODEL["fused"]} if MODEL["fused"] is not None else {})},
        "lr_config": {"policy": "poly", "power": 1.0, "min_lr": 0.0, "by_epoch": False},
        "optimizer_config": {"grad_clip": None},
        "runner": {"type": "IterBasedRunner", "max_iters": iters + WARMUP},
        "checkpoint_config": {"interval": checkpoint_interval, "max_keep_ckpts": 1, "save_last": False},
        "log_config": {"interval": 50, "hooks": [{"type": "TextLoggerHook"}]},
        "work_dir": work_dir,
        "seed": 0,
    }


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class Clock:
    """Per-iteration wall times after the warm-up; a run is summarised by their median
    (robust to the other tenants of a shared machine) and their sum."""

    def __init__(self) -> None:
        self.count, self.last, self.times = 0, None, []

    def tick(self) -> None:
        now = time.perf_counter()
        self.count += 1
        if self.count > WARMUP:
            self.times.append(now - self.last)
        self.last = now

    def result(self) -> tuple[float, float]:
        return statistics.median(self.times), sum(self.times)


def run_trainer(iters: int, checkpoint_interval: int) -> float:
    from seg_accel.config.loader import Config
    from seg_accel.validate import validate_train_config
    from seg_accel.engine import Trainer
    from seg_accel.engine.hooks import Hook

    reset_accelerate()
    with tempfile.TemporaryDirectory() as work:
        raw = Config(dict=config(work, iters, checkpoint_interval), filename=str(REPO / "bench/overhead.py"))
        trainer = Trainer(validate_train_config(raw), raw, work)
        clock = Clock()
        tick = type("Tick", (Hook,), {"after_train_iter": lambda self, runner: clock.tick()})()
        trainer.register_hook(tick, "LOWEST")
        trainer.exporter.export = lambda *a, **k: None  # the final export is not part of the loop
        trainer.train()
        return clock.result()


def run_bare(iters: int) -> float:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from seg_accel.models import build_model

    reset_accelerate()
    accelerator = Accelerator()
    set_seed(0)
    import yaml

    demo = yaml.safe_load((REPO / "configs/demo/segformer_synthetic.yaml").read_text())
    if MODEL["name"] == "smp-unet-r18":
        import segmentation_models_pytorch as smp

        model = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=4)
    else:
        model = build_model(parse_section(demo["model"], ModelConfig, "model"),
                            ["background", "circle", "square", "triangle"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.002, weight_decay=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    clock = Clock()
    position = 0
    for _ in range(iters + WARMUP):
        index = torch.arange(position, position + BATCH) % SAMPLES
        position += BATCH
        pixel_values, labels = DATA[0][index], DATA[1][index]
        with accelerator.accumulate(model):
            logits = model(pixel_values) if MODEL["name"] == "smp-unet-r18" else model(pixel_values=pixel_values).logits
            if logits.shape[-2:] != labels.shape[-2:]:
                logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, labels, ignore_index=255)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        clock.tick()
    return clock.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--checkpoint-interval", type=int, default=100)
    parser.add_argument("--model", choices=["segformer", "smp-unet-r18"], default="segformer")
    parser.add_argument("--loaded", action="store_true", help="with a competing busy-loop process per core")
    parser.add_argument("--unfused", action="store_true",
                        help="the runner with optimizer.fused: false (torch's default AdamW kernel, as the bare loop's) "
                             "instead of seg-accel's fused default: the runner's own cost alone")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 leaves a core to the machine's own noise")
    args = parser.parse_args()
    MODEL["name"] = args.model
    MODEL["fused"] = False if args.unfused else None
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("seg_accel").disabled = True  # the console line costs the same either way
    import contextlib

    sys.path.insert(0, str(REPO / "bench"))
    from load import competing_load

    run_bare(20)  # the unmeasured round
    run_trainer(20, 10)
    bare, ours = [], []
    with competing_load() if args.loaded else contextlib.nullcontext():
        for _ in range(args.repeats):
            bare.append(run_bare(args.iters))
            ours.append(run_trainer(args.iters, args.checkpoint_interval))
    median_ratio = statistics.median(o[0] / b[0] for o, b in zip(ours, bare))
    total_ratio = statistics.median(o[1] / b[1] for o, b in zip(ours, bare))
    print(f"trainer overhead, {args.model}{', loaded (a busy loop per core)' if args.loaded else ', idle'}"
          f"{', runner with optimizer.fused: false' if args.unfused else ''}: "
          f"{args.iters} iterations (after {WARMUP} warm-up), batch {BATCH} x {SIZE}x{SIZE}, "
          f"{torch.get_num_threads()} threads, {args.repeats} alternating pairs")
    print("| loop | ms/iter (median) | seconds (total) | vs bare: per-iteration median | vs bare: total |")
    print("|---|---|---|---|---|")
    print(f"| bare Accelerate loop | {1000 * statistics.median(b[0] for b in bare):.1f} | "
          f"{statistics.median(b[1] for b in bare):.2f} | 1.000 | 1.000 |")
    print(f"| seg-accel runner (all hooks, checkpoint every {args.checkpoint_interval}) | "
          f"{1000 * statistics.median(o[0] for o in ours):.1f} | {statistics.median(o[1] for o in ours):.2f} | "
          f"{median_ratio:.3f} | {total_ratio:.3f} |")
    print("pair ratios (per-iteration medians): " + ", ".join(f"{o[0] / b[0]:.3f}" for o, b in zip(ours, bare)))


if __name__ == "__main__":
    main()
