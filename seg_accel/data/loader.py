"""Samplers and DataLoaders that shard across processes exactly once.

Why our own samplers rather than ``accelerator.prepare(dataloader)``: an
iteration-based run needs an endless, per-epoch reshuffled stream in which
every process gets the same number of samples (no hang at epoch ends) and each
sample's augmentation seed is fixed by its position in the stream, so results
do not depend on the number of workers and a resumed run can replay it.
Accelerate's ``DataLoaderShard`` would shard such a loader a second time.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from seg_accel.data.seeds import epoch_order, sample_seed, worker_init
from seg_accel.data.streaming import ShardStream, StreamBatches, usable_workers
from seg_accel.errors import DataError
from seg_accel.threads import one_thread

logger = logging.getLogger("seg_accel")

class InfiniteShardedSampler(Sampler):
    """An endless stream of ``(index, aug_seed, epoch)``: epochs of the dataset, each in a
    new random order (or in order without ``shuffle``), concatenated; process ``rank`` takes global positions
    ``rank, rank + world, ...``. Every sample is seen once per epoch across all
    processes, and every process always has a next sample.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True, start: int = 0):
        if size < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.start = start  # samples already consumed by this process (for resume)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        position = self.rank + self.start * self.world_size
        epoch, order = -1, None
        while True:
            if position // self.size != epoch:
                epoch = position // self.size
                order = epoch_order(self.size, self.seed, epoch, self.shuffle)
            yield int(order[position % self.size]), sample_seed(self.seed, position), epoch
            position += self.world_size


class ShardSampler(Sampler):
    """Indices ``rank, rank + world, ...`` of a finite dataset: no padding, no duplicates
    (so evaluation never counts a sample twice)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, size, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class MixedSizesError(DataError, ValueError):
    """Samples of one batch that cannot be stacked (a data problem, named as one)."""


def collate(samples: list[dict[str, Any]], key: str = "data") -> dict[str, Any]:
    """Tensors stacked; per sample ``epochs`` and ``repeated`` (a repeat that evens out the
    processes), and ``skipped`` ((epoch, reason) of bad samples), as bookkeeping for the trainer."""
    sizes = {tuple(s["pixel_values"].shape[-2:]) for s in samples} | {tuple(s["labels"].shape[-2:]) for s in samples}
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes))
        raise MixedSizesError(
            f"{key}: the samples of one batch have different sizes (h x w: {shown}, indices "
            f"{[s['index'] for s in samples]}), so they cannot be stacked. Give {key}.pipeline a fixed output size "
            "(a RandomCrop no larger than the smallest image, then a Pad to the crop size) or use samples_per_gpu: 1"
        )
    with one_thread():
        pixel_values = torch.stack([s["pixel_values"] for s in samples])
        labels = torch.stack([s["labels"] for s in samples])
    padded = {}
    if any("valid_hw" in s for s in samples):  # 1 on each image's own pixels, 0 on the Pad transform's
        mask = torch.zeros((len(samples), *pixel_values.shape[-2:]), dtype=torch.uint8)
        for row, sample in zip(mask, samples):
            h, w = sample.get("valid_hw", pixel_values.shape[-2:])
            row[:h, :w] = 1
        padded["pixel_mask"] = mask
    return {
        "pixel_values": pixel_values,
        "labels": labels,
        **padded,
        "indices": torch.tensor([s["index"] for s in samples]),
        "epochs": torch.tensor([s.get("epoch", 0) for s in samples]),
        "repeated": torch.tensor([bool(s.get("repeat", False)) for s in samples]),
        "skipped": [(s.get("epoch", 0), reason) for s in samples for reason in s.get("skipped", [])],
    }


def build_train_loader(
    dataset: Dataset,
    samples_per_gpu: int,
    workers_per_gpu: int,
    rank: int,
    world_size: int,
    seed: int,
    start: int = 0,
    pin_memory: bool = False,
    shuffle: bool = True,
    buffer_size: int = 1000,
    prefetch_factor: int | None = None,
) -> Any:
    """An endless loader of this process's shard of the training stream (map-style or streamed)."""
    if getattr(dataset, "streaming", False):

        stream = ShardStream(dataset, rank, world_size, seed, shuffle, buffer_size, samples_per_gpu,
                             start_samples=start)
        workers = usable_workers(len(dataset.shards), world_size, workers_per_gpu)
        return StreamBatches(stream, samples_per_gpu, workers, partial(collate, key=getattr(dataset, "key", "data")), pin_memory)
    sampler = InfiniteShardedSampler(len(dataset), rank, world_size, seed, shuffle=shuffle, start=start)
    gen = torch.Generator().manual_seed(seed + rank)
    return DataLoader(
        dataset,
        batch_size=samples_per_gpu,
        sampler=sampler,
        num_workers=workers_per_gpu,
        collate_fn=partial(collate, key=getattr(dataset, "key", "data")),
        pin_memory=pin_memory,
        drop_last=True,
        persistent_workers=workers_per_gpu > 0,
        prefetch_factor=prefetch_factor if workers_per_gpu > 0 else None,
        worker_init_fn=worker_init,
        generator=gen,
    )


# evaluation batches of "auto" size hold at most this many image pixels: on CPUs small batches are
# fastest (measured on CamVid 480x360, tiny SegFormer, 2 threads: batch 2 9.0 s, 4 9.6 s, 16 12.9 s,
# 1 13.8 s), on accelerators larger ones
AUTO_BATCH_PIXELS = {"cpu": 512 * 1024, "accelerator": 4 * 1024 * 1024}
AUTO_BATCH_MAX = 16


class SizeGroupedBatches(Sampler):
    """Batches of this process's shard (in order) that hold images of one size, as many as fit
    ``AUTO_BATCH_PIXELS`` (and at most ``AUTO_BATCH_MAX``): evaluation runs whole batches
    instead of one image at a time, with memory bounded by the pixels, not by a guess."""

    def __init__(self, dataset: Any, indices: list[int], pixels: int = AUTO_BATCH_PIXELS["cpu"],
                 most: int = AUTO_BATCH_MAX):
        self.batches: list[list[int]] = []
        current: list[int] = []
        current_size = None
        for index in indices:
            size = dataset.image_size(index)
            limit = max(1, min(most, pixels // (size[0] * size[1]))) if size else 1
            if current and (size is None or size != current_size or len(current) >= limit):
                self.batches.append(current)
                current = []
            current.append(index)
            current_size = size
        if current:
            self.batches.append(current)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def build_val_loader(
    dataset: Dataset, samples_per_gpu: int | str, workers_per_gpu: int, rank: int, world_size: int,
    pin_memory: bool = False, persistent_workers: bool = False, prefetch_factor: int | None = None,
    device_type: str = "cpu",
) -> Any:
    """This process's shard of the val set, in order, each sample exactly once overall.
    ``samples_per_gpu: auto``: batches of same-size images within a pixel budget (``AUTO_BATCH_PIXELS``
    of the device type)."""
    if samples_per_gpu == "auto" and (getattr(dataset, "streaming", False) or not hasattr(dataset, "image_size")):
        samples_per_gpu = 1  # streamed: sizes are not known ahead
    if getattr(dataset, "streaming", False):

        stream = ShardStream(dataset, rank, world_size, seed=0, shuffle=False, batch_size=samples_per_gpu,
                             epochs=1, pad=False)
        workers = usable_workers(len(dataset.shards), world_size, workers_per_gpu)
        return StreamBatches(stream, samples_per_gpu, workers, partial(collate, key=getattr(dataset, "key", "data")), pin_memory)
    shard = ShardSampler(len(dataset), rank, world_size)
    batching = {"batch_sampler": SizeGroupedBatches(
        dataset, shard.indices, AUTO_BATCH_PIXELS["cpu" if device_type == "cpu" else "accelerator"])} if samples_per_gpu == "auto" else \
        {"batch_size": samples_per_gpu, "sampler": shard}
    workers = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor} if workers_per_gpu else {}
    return DataLoader(
        dataset,
        num_workers=workers_per_gpu,
        collate_fn=partial(collate, key=getattr(dataset, "key", "data")),
        pin_memory=pin_memory,
        worker_init_fn=worker_init,
        **batching,
        **workers,
    )


class EpochBookkeeping:
    """Per epoch of the training stream: samples repeated to even out the processes, and bad
    samples skipped; reported when the stream moves on to the next epoch. ``plan`` (streamed
    data) gives every process's sample count, so the main process reports them all."""

    def __init__(self, rank: int, plan: Any = None):
        self.rank, self.plan, self.epoch = rank, plan, None
        self.repeats, self.skipped = 0, []

    def update(self, batch: dict[str, Any]) -> None:
        epochs = batch["epochs"].tolist()
        repeated = batch["repeated"].tolist()
        for epoch in sorted(set(epochs)):  # a batch may straddle two epochs
            if self.epoch is not None and epoch > self.epoch:
                self.finish()
            self.epoch = epoch if self.epoch is None else max(self.epoch, epoch)
            self.repeats += sum(r for e, r in zip(epochs, repeated) if e == epoch)
            self.skipped += [reason for e, reason in batch["skipped"] if e == epoch]

    def finish(self) -> None:
        if self.plan is not None and self.epoch is not None:
            counts = self.plan(self.epoch).counts
            if len(set(counts)) > 1:
                logger.info("epoch %d: samples per process %s; repeated %s so that every process runs the same "
                            "steps", self.epoch, ", ".join(map(str, counts)),
                            ", ".join(str(max(counts) - c) for c in counts))
        if self.repeats:
            logger.info("epoch %d: process %d repeated %d sample(s)", self.epoch, self.rank, self.repeats)
        if self.skipped:
            shown = "; ".join(self.skipped[:3]) + (f"; ... ({len(self.skipped) - 3} more)" if len(self.skipped) > 3 else "")
            logger.warning("epoch %d: process %d skipped %d bad sample(s): %s", self.epoch, self.rank,
                           len(self.skipped), shown)
        self.repeats, self.skipped = 0, []
