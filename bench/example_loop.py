#!/usr/bin/env python
"""The baseline of bench/e2e.py: a training loop in the style of transformers'
`run_semantic_segmentation_no_trainer.py` example, on CamVid.

What the example does and this keeps: a map-style `datasets.Dataset` of image/label files,
per-sample PIL transforms in `set_transform` (run by the DataLoader in the main process),
`AutoModelForSemanticSegmentation`-style model called with `labels` (its own cross-entropy,
ignore index 255), AdamW with transformers' polynomial schedule, one `accelerator.prepare`,
and an evaluation with batches of 2, one upsample of the logits and an argmax, scored the way
`evaluate`'s `mean_iou` scores (an `evaluate.Metric` storing every map in its Arrow cache,
per-image histograms at `compute`; bench/metric.py's reference). The model, crop (256), batch
(4 per process), learning rate, iterations and seed are the same as seg-accel's run in
bench/e2e.py. Timings go to ``--out`` (JSON).

    accelerate launch bench/example_loop.py --data ../shared/data/camvid --iters 100 --out r.json
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

STARTED = time.time()

import numpy as np  # noqa: E402
import torch  # noqa: E402

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
CLASSES = ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian",
           "Bicyclist"]


def camvid_split(root: Path, split: str) -> dict[str, list[str]]:
    names = [Path(line.split()[0]).name for line in (root / f"{split}.txt").read_text().splitlines() if line.strip()]
    return {"image": [str(root / split / n) for n in names], "label": [str(root / f"{split}annot" / n) for n in names]}


def train_transform(batch: dict) -> dict:
    """Per sample, on PIL images: random scale 0.5-2 of 480x360, random 256 crop (padded: 0 once
    normalised, label 255), flip, normalise; label 11 (void) -> 255."""
    from PIL import Image

    pixel_values, labels = [], []
    for image, label in zip(batch["image"], batch["label"]):
        image, label = image.convert("RGB"), label
        ratio = random.uniform(0.5, 2.0)
        size = (int(480 * ratio + 0.5), int(360 * ratio + 0.5))
        image, label = image.resize(size, Image.BILINEAR), label.resize(size, Image.NEAREST)
        img, lab = np.asarray(image, np.float32), np.asarray(label, np.int64).copy()
        lab[lab == 11] = 255
        h, w = lab.shape
        pad_h, pad_w = max(256 - h, 0), max(256 - w, 0)
        if pad_h or pad_w:  # with the mean colour: 0 once normalised (as the config's Pad after Normalize)
            canvas = np.empty((h + pad_h, w + pad_w, 3), np.float32)
            canvas[:] = MEAN
            canvas[:h, :w] = img
            img = canvas
            lab = np.pad(lab, ((0, pad_h), (0, pad_w)), constant_values=255)
        top, left = random.randint(0, lab.shape[0] - 256), random.randint(0, lab.shape[1] - 256)
        img, lab = img[top:top + 256, left:left + 256], lab[top:top + 256, left:left + 256]
        if random.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        img = (img - MEAN) / STD
        pixel_values.append(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), np.float32)))
        labels.append(torch.from_numpy(np.ascontiguousarray(lab)))
    return {"pixel_values": pixel_values, "labels": labels}


def eval_transform(batch: dict) -> dict:
    pixel_values, labels = [], []
    for image, label in zip(batch["image"], batch["label"]):
        img = (np.asarray(image.convert("RGB"), np.float32) - MEAN) / STD
        lab = np.asarray(label, np.int64).copy()
        lab[lab == 11] = 255
        pixel_values.append(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), np.float32)))
        labels.append(torch.from_numpy(lab))
    return {"pixel_values": pixel_values, "labels": labels}


class FileDataset(torch.utils.data.Dataset):
    """Without `datasets`: the files opened by PIL, the same batch transform on one sample."""

    def __init__(self, files: dict[str, list[str]], transform):
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files["image"])

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        batch = {key: [Image.open(self.files[key][index])] for key in ("image", "label")}
        return {key: value[0] for key, value in self.transform(batch).items()}


class ListMetric:
    """Without `evaluate`: the maps kept in a list, the same per-image histograms at compute."""

    def __init__(self) -> None:
        self.preds, self.refs = [], []

    def add_batch(self, predictions, references) -> None:
        self.preds += list(predictions)
        self.refs += list(references)

    def compute(self, num_labels: int, ignore_index: int) -> dict:
        from metric import histogram_areas

        return {"mean_iou": histogram_areas(self.preds, self.refs, num_labels)}


def collate(samples: list[dict]) -> dict:
    return {"pixel_values": torch.stack([s["pixel_values"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples])}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, get_scheduler

    accelerator = Accelerator()
    set_seed(args.seed)
    random.seed(args.seed + accelerator.process_index)
    root = Path(args.data)
    try:
        import datasets
        import evaluate  # noqa: F401  (the metric below)

        features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
        train = datasets.Dataset.from_dict(camvid_split(root, "train"), features=features)
        val = datasets.Dataset.from_dict(camvid_split(root, "val"), features=features)
        train.set_transform(train_transform)
        val.set_transform(eval_transform)
        with_datasets = True
    except ImportError:  # a machine without datasets/evaluate (the GPU image): the same transforms, files read by PIL
        train, val = FileDataset(camvid_split(root, "train"), train_transform), \
            FileDataset(camvid_split(root, "val"), eval_transform)
        with_datasets = False
    train_loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=True, collate_fn=collate, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=2, collate_fn=collate)
    config = SegformerConfig(hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 4, 8],
                             sr_ratios=[8, 4, 2, 1], decoder_hidden_size=256, num_labels=len(CLASSES),
                             id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)},
                             semantic_loss_ignore_index=255)
    model = SegformerForSemanticSegmentation(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)  # the CamVid config's
    # a prepared scheduler steps once per process at each call (Accelerate's AcceleratedScheduler), so the
    # example scripts count their schedule's steps times the processes, as here: the lr reaches its end at
    # the last iteration on any number of processes
    scheduler = get_scheduler("polynomial", optimizer, num_warmup_steps=0,
                              num_training_steps=args.iters * accelerator.num_processes)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)

    starts = []  # each iteration's start: loading the batch, forward, backward, step
    lrs = []  # the learning rate each iteration trains with
    model.train()
    step = 0
    iterator = iter(train_loader)
    while step < args.iters:
        starts.append(time.time())
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(train_loader)
            batch = next(iterator)
        loss = model(**batch).loss
        accelerator.backward(loss)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1
    starts.append(time.time())
    first_iter, train_seconds = starts[0], starts[-1] - starts[0]
    times = np.diff(starts)

    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from metric import REFERENCE_METRIC  # evaluate's mean_iou way (the Hub's module is not reachable offline)

    if with_datasets:
        import evaluate

        scratch = tempfile.mkdtemp(prefix="e2e-metric-")
        script = Path(scratch) / "reference_mean_iou.py"
        script.write_text(REFERENCE_METRIC)
        metric = evaluate.load(str(script), cache_dir=scratch) if accelerator.is_main_process else None
    else:
        metric = ListMetric() if accelerator.is_main_process else None
    eval_started = time.time()
    model.eval()
    with torch.no_grad():
        for batch in val_loader:
            logits = model(pixel_values=batch["pixel_values"]).logits
            upsampled = torch.nn.functional.interpolate(logits, size=batch["labels"].shape[-2:], mode="bilinear",
                                                        align_corners=False)
            preds, refs = accelerator.gather_for_metrics((upsampled.argmax(dim=1), batch["labels"]))
            if accelerator.is_main_process:
                metric.add_batch(predictions=preds.cpu().numpy(), references=refs.cpu().numpy())
    results = metric.compute(num_labels=len(CLASSES), ignore_index=255) if accelerator.is_main_process else None
    eval_seconds = time.time() - eval_started
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        Path(args.out).write_text(json.dumps({
            "loop": "example", "processes": accelerator.num_processes, "iters": args.iters,
            "batch_per_process": 4, "process_started": STARTED, "first_iteration": first_iter,
            "train_seconds": train_seconds, "iteration_seconds_median": float(np.median(times[5:])),
            "eval_seconds": eval_seconds, "miou": 100 * results["mean_iou"],
            "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "datasets": with_datasets, "lrs": lrs,
        }))
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
