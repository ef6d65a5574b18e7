#!/usr/bin/env python
"""The GPU check: one prepared run that measures what only a GPU can show (bench/gpu_check.sh runs it).

Sections, in this order (the most wanted first, so that a run cut short still says something):

1. throughput: seg-accel's own training loop (the Trainer, in this process) on SegFormer-B0 and
   UperNet-ConvNeXt-T (random init) at 512x512, batch 8: images/s and the step's median time at
   fp32 / bf16 / fp16 (``mixed_precision``), each with and without ``channels_last``, and with
   ``compile`` (Accelerate's dynamo plugin, inductor) for bf16; the peak GPU memory of each row and
   the compile warm-up (the first iterations' extra time). The data is a few synthetic images made
   once and repeated (``CachedShapes``), so the rows measure the model's step, not image synthesis.
2. overflow: an fp16 run whose loss overflows once (at iteration 3): the GradScaler must skip that
   step, and the schedules must not advance (seg-accel counts optimizer steps, not iterations).
3. sync_bn: ``sync_bn: true`` on one GPU process (UperNet's BatchNorm layers): what seg-accel does.
4. e2e: bench/e2e.py (seg-accel vs the transformers-example-style loop) on one GPU, when a CamVid
   copy is given (``--camvid``; gpu_check.sh carries a subset).

``--dry`` runs the CPU-safe parts (argument parsing, configs, the table format) on the CPU with tiny
images, two iterations and SegFormer-B0 only (``--models`` for more); the sections that need a GPU
say so. Tables go to stdout and, with
``--out``, to ``gpu_check.md`` in that folder after each section.

    python bench/gpu_check.py [--dry] [--out DIR] [--camvid DIR] [--full] [--budget 420]
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from seg_accel.data.synthetic import SyntheticShapes  # noqa: E402
from seg_accel.engine.hooks import Hook  # noqa: E402
from seg_accel.losses.cross_entropy import CrossEntropyLoss  # noqa: E402
from seg_accel.registry import DATASETS, LOSSES  # noqa: E402

NORMALIZE = {"type": "Normalize", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "to_rgb": True}
MODELS = {  # random init; the architectures of configs/segformer/*mit-b0* and configs/upernet/*convnext-t*
    "SegFormer-B0": {
        "type": "SegformerForSemanticSegmentation", "pretrained": None,
        "config": {"hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "num_attention_heads": [1, 2, 5, 8],
                   "sr_ratios": [8, 4, 2, 1], "decoder_hidden_size": 256},
        "decode_head": {"align_corners": False, "loss_decode": {"type": "CrossEntropyLoss"}},
    },
    "UperNet-ConvNeXt-T": {
        "type": "UperNetForSemanticSegmentation",
        "config": {"backbone_config": {"model_type": "convnext", "hidden_sizes": [96, 192, 384, 768],
                                       "depths": [3, 3, 9, 3], "out_features": ["stage1", "stage2", "stage3", "stage4"]},
                   "hidden_size": 512, "pool_scales": [1, 2, 3, 6], "auxiliary_in_channels": 384,
                   "auxiliary_channels": 256},
        "decode_head": {"loss_decode": {"type": "CrossEntropyLoss"}},
        "auxiliary_head": {"loss_decode": {"type": "CrossEntropyLoss", "loss_weight": 0.4}},
    },
}


@DATASETS.register()
class CachedShapes(SyntheticShapes):
    """SyntheticShapes whose first ``distinct`` samples are made once and then repeated."""

    def __init__(self, distinct: int = 8, **kwargs: Any):
        super().__init__(**kwargs)
        self.distinct, self._cache = distinct, {}

    def __getitem__(self, key: Any) -> dict[str, Any]:
        index, epoch = (key[0], key[2] if len(key) > 2 else 0) if isinstance(key, tuple) else (key, 0)
        slot = index % self.distinct
        if slot not in self._cache:
            self._cache[slot] = super().__getitem__(slot)
        return {**self._cache[slot], "index": index, "epoch": epoch, "skipped": []}


@LOSSES.register()
class OverflowOnceLoss(CrossEntropyLoss):
    """Cross-entropy whose value is multiplied by 1e30 on its ``at``-th call (counting from 1):
    the fp16 gradients of that step overflow."""

    def __init__(self, at: int = 3, **kwargs: Any):
        super().__init__(**kwargs)
        self.at, self.calls = at, 0

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        value = super().forward(*args, **kwargs)
        return value * 1e30 if self.calls == self.at else value


class Probe(Hook):
    """Each iteration's start and the lr it used; the end of training."""

    priority = "LOWEST"

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.lrs: list[float] = []
        self.end = 0.0

    def before_train_iter(self, runner: Any) -> None:
        if self.starts:
            self._sync()
        self.starts.append(time.perf_counter())

    def after_train_iter(self, runner: Any) -> None:
        self.lrs.append(float(runner.scheduled.get("lr", float("nan"))))

    def after_run(self, runner: Any) -> None:
        self._sync()
        self.end = time.perf_counter()

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train_config(model: str, precision: str, channels_last: bool, compiled: bool, size: int, batch: int,
                 iters: int, **extra: Any) -> dict[str, Any]:
    cfg = {
        "model": json.loads(json.dumps(MODELS[model])),
        "data": {"samples_per_gpu": batch, "workers_per_gpu": 0,
                 "train": {"type": "CachedShapes", "num_samples": 100000, "img_size": [size, size], "seed": 0,
                           "distinct": 8, "pipeline": [NORMALIZE]}},
        "optimizer": {"type": "AdamW", "lr": 6e-5, "betas": [0.9, 0.999], "weight_decay": 0.01},
        "optimizer_config": {"grad_clip": None},
        "lr_config": {"policy": "poly", "power": 1.0, "min_lr": 0.0, "by_epoch": False},
        "runner": {"type": "IterBasedRunner", "max_iters": iters},
        "checkpoint_config": None, "evaluation": None, "log_config": {"interval": 100000},
        "mixed_precision": precision, "channels_last": channels_last,
        "compile": {"backend": "inductor", "mode": "default"} if compiled else None,
        "seed": 0,
    }
    cfg.update(extra)
    return cfg


def run_trainer(cfg_dict: dict[str, Any]) -> tuple[Any, Probe]:
    """A seg-accel Trainer on ``cfg_dict`` in this process (a fresh Accelerate state), trained."""
    import yaml

    from seg_accel.config import load_config
    from seg_accel.engine import Trainer
    from seg_accel.validate import validate_train_config

    reset_accelerate()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        path = Path(tmp) / "exp.yaml"
        path.write_text(yaml.safe_dump(cfg_dict))
        raw = load_config(path)
        trainer = Trainer(validate_train_config(raw, str(Path(tmp) / "work")), raw, str(Path(tmp) / "work"))
        probe = Probe()
        trainer.register_hook(probe)
        trainer.train()
    return trainer, probe


class Report:
    def __init__(self, out: Path | None, header: str):
        self.out, self.parts = out, [header]

    def add(self, text: str) -> None:
        print(text, flush=True)
        self.parts.append(text)
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "gpu_check.md").write_text("\n\n".join(self.parts) + "\n")


def throughput(args: argparse.Namespace, report: Report, started: float) -> None:
    size, batch, warmup, measured = (64, 2, 2, 2) if args.dry else (512, 8, 5, 30)
    precisions = ["no", "bf16"] if args.dry else ["no", "bf16", "fp16"]
    models = args.models or (["SegFormer-B0"] if args.dry else list(MODELS))
    rows = [(m, p, cl, False) for m in models for p in precisions for cl in (False, True)]
    if not args.dry:  # compiled rows last: each compiles the model's forward and backward (minutes)
        compiled = ["no", "bf16", "fp16"] if args.full else ["bf16"]
        rows += [(m, p, cl, True) for m in models for p in compiled for cl in (False, True)]
    lines = ["| model | precision | channels_last | compile | images/s | step (ms) | vs fp32 eager | "
             "peak memory (GiB) | compile warm-up (s) |", "|---|---|---|---|---|---|---|---|---|"]
    base: dict[str, float] = {}
    for model, precision, channels_last, compiled in rows:
        name = f"| {model} | {precision if precision != 'no' else 'fp32'} | {'yes' if channels_last else 'no'} | " \
               f"{'inductor' if compiled else 'no'} |"
        if time.perf_counter() - started > args.budget:
            lines.append(f"{name} skipped: the run's time budget ({args.budget:.0f} s) was spent | | | | |")
            continue
        try:
            _, probe = run_trainer(train_config(model, precision, channels_last, compiled, size, batch,
                                                warmup + measured))
        except Exception as exc:  # one row failing must not lose the others
            lines.append(f"{name} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | | | |")
            continue
        times = [b - a for a, b in zip(probe.starts, [*probe.starts[1:], probe.end])]
        step = statistics.median(times[warmup:])
        memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        warm = sum(times[:warmup]) - warmup * step
        if precision == "no" and not channels_last and not compiled:
            base[model] = step
        ratio = f"{base[model] / step:.2f}x" if model in base else "-"
        warm_up = f"{warm:.1f}" if compiled else "-"
        lines.append(f"{name} {batch / step:.1f} | {step * 1e3:.1f} | {ratio} | {memory:.2f} | {warm_up} |")
        print(lines[-1], flush=True)
    report.add(f"### Throughput: seg-accel's training step, {size}x{size}, batch {batch}, median of {measured} "
               f"iterations after {warmup}\n\n" + "\n".join(lines))


def overflow(args: argparse.Namespace, report: Report) -> None:
    if args.dry or not torch.cuda.is_available():
        report.add("### fp16 overflow\n\nskipped: fp16 loss scaling needs a GPU")
        return
    cfg = train_config("SegFormer-B0", "fp16", False, False, 256, 4, 6)
    cfg["model"]["decode_head"]["loss_decode"] = {"type": "OverflowOnceLoss", "at": 3}
    trainer, probe = run_trainer(cfg)
    skipped = [i + 1 for i, lr in enumerate(probe.lrs) if i + 1 < len(probe.lrs) and probe.lrs[i + 1] == lr]
    ok = trainer.optimizer_steps == trainer.iter - 1 and skipped == [3]
    report.add("### fp16 overflow (loss x 1e30 at iteration 3 of 6)\n\n"
               f"- iterations {trainer.iter}, optimizer steps applied {trainer.optimizer_steps}\n"
               f"- lr per iteration: {', '.join(f'{lr:.4e}' for lr in probe.lrs)}\n"
               f"- the lr repeats after iteration(s) {skipped} (the schedule did not advance past the skipped step)\n"
               f"- {'PASS' if ok else 'FAIL'}: the scaler skipped exactly that step and the schedule held")


def sync_bn(args: argparse.Namespace, report: Report) -> None:
    if args.dry or not torch.cuda.is_available():
        report.add("### sync_bn on one process\n\nskipped: needs a GPU")
        return
    cfg = train_config("UperNet-ConvNeXt-T", "bf16", False, False, 256, 4, 2, sync_bn=True)
    trainer, _ = run_trainer(cfg)
    model = trainer.accelerator.unwrap_model(trainer.model)
    kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)})
    report.add(f"### sync_bn on one process\n\n- the trained model's norm layers: {', '.join(kinds)}\n"
               f"- iterations {trainer.iter} finished")


def e2e(args: argparse.Namespace, report: Report) -> None:
    if args.dry or not torch.cuda.is_available() or args.camvid is None:
        report.add("### e2e on the GPU\n\nskipped: " + ("needs a GPU" if args.dry or not torch.cuda.is_available()
                                                       else "no --camvid"))
        return
    proc = subprocess.run([sys.executable, str(REPO / "bench/e2e.py"), "--processes", "1", "--iters",
                           str(args.e2e_iters), "--pairs", "1", "--data", str(args.camvid)],
                          capture_output=True, text=True, cwd=REPO, check=False)
    report.add(f"### e2e on the GPU (bench/e2e.py --processes 1 --iters {args.e2e_iters} --pairs 1, CamVid subset)\n\n"
               + (proc.stdout.strip() if proc.returncode == 0 else f"failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-2500:]}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU-safe parts only, tiny sizes")
    parser.add_argument("--out", type=Path, help="write gpu_check.md here after each section")
    parser.add_argument("--camvid", type=Path, help="a CamVid copy for the e2e section")
    parser.add_argument("--e2e-iters", type=int, default=150)
    parser.add_argument("--full", action="store_true", help="compile every precision, not only bf16")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which the remaining throughput rows are skipped")
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        help="default: both (with --dry: SegFormer-B0)")
    parser.add_argument("--sections", nargs="+", default=["throughput", "overflow", "sync_bn", "e2e"],
                        choices=["throughput", "overflow", "sync_bn", "e2e"])
    args = parser.parse_args(argv)
    if not args.dry and not torch.cuda.is_available():
        parser.error("no GPU here: run with --dry for the CPU-safe parts")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import accelerate
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)"
    header = (f"## GPU check: {device}\n\ntorch {torch.__version__}, accelerate {accelerate.__version__}, "
              f"transformers {transformers.__version__}, CUDA {torch.version.cuda}")
    report = Report(args.out, header)
    print(header, flush=True)
    started = time.perf_counter()
    for section in args.sections:
        {"throughput": lambda: throughput(args, report, started), "overflow": lambda: overflow(args, report),
         "sync_bn": lambda: sync_bn(args, report), "e2e": lambda: e2e(args, report)}[section]()
    report.add(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
