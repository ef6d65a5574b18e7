#!/usr/bin/env python
"""Segmentation metric: seg-accel's streaming confusion matrix vs the `evaluate` mean_iou way.

Reference ("stores every prediction and label until compute, then per-image numpy
histograms", as `evaluate`'s `mean_iou` works): predictions and labels are added to an
`evaluate` module (an Arrow cache) batch by batch and `compute` runs mean_iou's
per-image `np.histogram` code over them. A lighter reference keeps them in a Python
list instead of Arrow (the same per-image histograms). Ours: one `bincount` per image
into a running confusion matrix (what seg-accel evaluate does); nothing is kept.

Each variant runs in a fresh process that reports its time and its peak memory above
the process's own start (ru_maxrss). The predictions and labels are the same random
maps in every variant: a pool of 10 seeded random maps made before the clock starts and
cycled through (every stored copy is a real copy, so stored memory grows as it would).

Every case runs on the idle machine and again with a competing load the bench starts itself
(a busy loop per core, bench/load.py), each variant at the default torch threads (what seg-accel
gives one process: all the cores).

Run: python bench/metric.py [--small-only] [--no-load]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from load import competing_load, cores, describe  # noqa: E402
CASES = {"camvid": (101, 360, 480, 12), "ade20k": (500, 512, 512, 150)}

REFERENCE_METRIC = '''
import datasets
import evaluate
import numpy as np


class ReferenceMeanIoU(evaluate.Metric):
    """evaluate's mean_iou, reduced to its computation: per-image histograms of the stored maps."""

    def _info(self):
        return evaluate.MetricInfo(description="", citation="", inputs_description="", features=datasets.Features({
            "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
            "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16")))}))

    def _compute(self, predictions, references, num_labels, ignore_index):
        inter = np.zeros(num_labels); union = np.zeros(num_labels); label_area = np.zeros(num_labels)
        for pred, label in zip(predictions, references):
            pred, label = np.asarray(pred), np.asarray(label)
            mask = label != ignore_index
            pred, label = pred[mask], label[mask]
            i = np.histogram(pred[pred == label], bins=num_labels, range=(0, num_labels - 1))[0]
            p = np.histogram(pred, bins=num_labels, range=(0, num_labels - 1))[0]
            lab = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
            inter += i; union += p + lab - i; label_area += lab
        return {"mean_iou": float(np.nanmean(inter / union)), "overall_accuracy": float(inter.sum() / label_area.sum())}
'''


def maps(index: int, height: int, width: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(index)
    label = rng.integers(0, classes, size=(height, width), dtype=np.int64)
    label[: height // 10] = 255  # ignored pixels
    pred = np.where(rng.random((height, width)) < 0.7, label % classes, rng.integers(0, classes, (height, width)))
    return pred, label


def histogram_areas(preds, labels, classes: int) -> float:
    inter = np.zeros(classes); union = np.zeros(classes)
    for pred, label in zip(preds, labels):
        mask = label != 255
        pred, label = pred[mask], label[mask]
        i = np.histogram(pred[pred == label], bins=classes, range=(0, classes - 1))[0]
        p = np.histogram(pred, bins=classes, range=(0, classes - 1))[0]
        lab = np.histogram(label, bins=classes, range=(0, classes - 1))[0]
        inter += i; union += p + lab - i
    return float(np.nanmean(inter / union))


def run_variant(variant: str, case: str) -> dict:
    """In this (fresh) process: one variant on one case; time and peak memory above the start."""
    images, height, width, classes = CASES[case]
    import torch

    from seg_accel.metrics import confusion_matrix, metrics_from_confusion

    pool = [maps(i, height, width, classes) for i in range(10)]
    pool16 = [(p.astype(np.uint16), lab.astype(np.uint16)) for p, lab in pool]
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "ours":
        cm = torch.zeros(classes, classes, dtype=torch.long)
        for i in range(images):
            pred, label = pool[i % len(pool)]
            cm += confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), classes, 255)
        miou = metrics_from_confusion(cm)["mIoU"] / 100
    elif variant == "list":
        preds, labels = [], []
        for i in range(images):
            pred, label = pool16[i % len(pool16)]
            preds.append(pred.copy())
            labels.append(label.copy())
        miou = histogram_areas(preds, labels, classes)
    else:
        import tempfile

        import evaluate

        with tempfile.TemporaryDirectory() as tmp:
            script = Path(tmp) / "reference_mean_iou.py"
            script.write_text(REFERENCE_METRIC)
            metric = evaluate.load(str(script), cache_dir=tmp)
            for i in range(images):
                pred, label = pool16[i % len(pool16)]
                metric.add_batch(predictions=[pred], references=[label])
            miou = metric.compute(num_labels=classes, ignore_index=255)["mean_iou"]
    seconds = time.perf_counter() - start
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) / 1024
    return {"seconds": seconds, "peak_mib": peak_mib, "miou": miou}


def measure(variant: str, case: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--variant", variant, "--case", case], capture_output=True,
                         text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["ours", "list", "evaluate"])
    parser.add_argument("--case", choices=sorted(CASES))
    parser.add_argument("--small-only", action="store_true", help="only the CamVid-sized case")
    parser.add_argument("--no-load", action="store_true", help="leave out the loaded-machine rows")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.case)))
        return
    print(f"{cores()} core(s); loaded: a busy loop per core")
    print("| case | machine | implementation | seconds | peak memory (MiB) | ours is faster by |")
    print("|---|---|---|---|---|---|")
    for loaded in ([False] if args.no_load else [False, True]):
        for case in (["camvid"] if args.small_only else ["camvid", "ade20k"]):
            images, height, width, classes = CASES[case]
            label = f"{images} images {height}x{width}, {classes} classes"
            with competing_load() if loaded else contextlib.nullcontext():
                ours = measure("ours", case)
                results = {"ours": ours, "evaluate": measure("evaluate", case), "list": measure("list", case)}
            for variant, name in (("evaluate", "evaluate Metric + per-image np.histogram (mean_iou's way)"),
                                  ("list", "in-memory list + per-image np.histogram"),
                                  ("ours", "seg-accel confusion matrix")):
                result = results[variant]
                assert abs(result["miou"] - ours["miou"]) < 1e-9, (variant, result["miou"], ours["miou"])
                speedup = result["seconds"] / ours["seconds"]
                print(f"| {label} | {describe(loaded)} | {name} | {result['seconds']:.2f} | {result['peak_mib']:.0f} | "
                      f"{'-' if variant == 'ours' else f'{speedup:.1f}x'} |", flush=True)


if __name__ == "__main__":
    main()
