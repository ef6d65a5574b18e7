"""Streaming parquet data across processes and DataLoader workers, each sample once per epoch.

The shards are the parquet row groups of all files. Every process computes the same
plan for an epoch (the shard order is shuffled with the seed and the epoch):

- ``shards`` mode (the number of shards divides by the number of processes, and the
  processes' row counts differ by at most one batch): process ``r`` reads only the
  shards ``order[r::W]``;
- ``examples`` mode otherwise: every process reads all shards but keeps only the
  samples at positions ``r, r + W, ...`` of the epoch (logged: ``W``-fold reading).

Within a process, DataLoader worker ``k`` reads the process's shards ``[k::K]``, and
shuffles what it reads in a buffer (seeded by seed, epoch, process and worker). Every
process gets the same number of samples per epoch: the shortest repeat a few of their
samples (at most one batch; each repeat is flagged and counted). Samples are decoded
only after the buffer picks them. Batches are assembled in the main process, so every
process runs the same number of steps; iteration-based runs cycle the epochs.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from seg_accel.data.seeds import sample_seed, worker_threads
from seg_accel.errors import ConfigError, DataError

logger = logging.getLogger("seg_accel")


@dataclasses.dataclass
class Shards:
    """Row groups of parquet files: ``(file index, row group, rows)`` each."""

    files: list[str]
    units: list[tuple[int, int, int]]
    columns: list[str]

    @property
    def total_rows(self) -> int:
        return sum(rows for _, _, rows in self.units)

    def __len__(self) -> int:
        return len(self.units)


def _open(url: str) -> Any:
    import fsspec
    import huggingface_hub  # noqa: F401  (registers the hf:// file system)

    return fsspec.open(url, "rb").open()


def parquet_shards(files: list[str]) -> Shards:
    """Read the parquet footers (row groups and row counts; no data)."""
    import pyarrow.parquet as pq

    units, columns = [], None
    for i, url in enumerate(files):
        try:
            with _open(url) as f:
                meta = pq.ParquetFile(f).metadata
                schema = pq.ParquetFile(f).schema_arrow
        except Exception as exc:  # unreadable or not parquet: say which file
            raise ConfigError(f"cannot read parquet file {url}: {type(exc).__name__}: {exc}", key="path") from exc
        columns = columns or list(schema.names)
        units += [(i, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups) if meta.row_group(g).num_rows]
    if not units:
        raise ConfigError(f"no rows in {files}", key="path")
    return Shards(files, units, columns or [])


@dataclasses.dataclass
class EpochPlan:
    mode: str  # "shards" or "examples"
    order: list[int]  # shard ids in reading order
    rank_shards: list[int]  # the shards this process reads
    offsets: dict[int, int]  # shard id -> position of its first row in the epoch (examples mode)
    counts: list[int]  # samples per process
    target: int  # samples every process delivers


def plan_epoch(rows: list[int], epoch: int, rank: int, world: int, seed: int, shuffle: bool,
               batch_size: int) -> EpochPlan:
    """The same plan on every process (a pure function of its arguments)."""
    n_shards = len(rows)
    if shuffle:
        order = np.random.default_rng([seed, epoch, 1]).permutation(n_shards).tolist()
    else:
        order = list(range(n_shards))
    if n_shards % world == 0:
        per_rank = [order[r::world] for r in range(world)]
        counts = [sum(rows[s] for s in shards) for shards in per_rank]
        if max(counts) - min(counts) <= batch_size:
            return EpochPlan("shards", order, per_rank[rank], {}, counts, max(counts))
    total = sum(rows)
    offsets, position = {}, 0
    for s in order:
        offsets[s] = position
        position += rows[s]
    counts = [len(range(r, total, world)) for r in range(world)]
    return EpochPlan("examples", order, order, offsets, counts, max(counts))


def usable_workers(n_shards: int, world: int, workers: int) -> int:
    """Workers that always have shards to read (more would wait for nothing)."""
    per_process = n_shards // world if n_shards % world == 0 else n_shards
    return max(0, min(workers, per_process))


class ShardStream(IterableDataset):
    """This process's samples, epoch after epoch (``epochs=None``: endlessly).

    Yields prepared samples with ``index`` (position in the epoch), ``epoch``,
    ``repeat`` (a repeated sample that evens out the processes) and ``skipped``.
    ``start_samples`` resumes exactly: the samples this process consumed are replayed
    (whole epochs by counting alone) and passed over before they are decoded.
    """

    def __init__(self, dataset: Any, rank: int, world: int, seed: int, shuffle: bool = True,
                 buffer_size: int = 1000, batch_size: int = 1, start_epoch: int = 0, epochs: int | None = None,
                 pad: bool = True, start_samples: int = 0):
        self.dataset, self.rank, self.world = dataset, rank, world
        self.pad = pad  # evaluation: no repeats (no process waits for another there)
        self.start_samples = start_samples  # samples this process consumed before a resume
        self.seed, self.shuffle, self.buffer_size = seed, shuffle, buffer_size
        self.batch_size = batch_size
        self.start_epoch, self.epochs = start_epoch, epochs
        self.rows = [rows for _, _, rows in dataset.shards.units]

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.rows, epoch, self.rank, self.world, self.seed, self.shuffle, self.batch_size)

    # -- reading -----------------------------------------------------------------------
    def _read_shard(self, shard: int) -> Iterator[dict[str, Any]]:
        import pyarrow.parquet as pq

        file_index, group, _ = self.dataset.shards.units[shard]
        columns = [self.dataset.image_column, self.dataset.label_column]
        with _open(self.dataset.shards.files[file_index]) as f:
            yield from pq.ParquetFile(f).read_row_group(group, columns=columns).to_pylist()

    def _rows(self, plan: EpochPlan, worker: int, workers: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(sample id, raw row): ids are unique within the epoch across all processes."""
        shards = plan.rank_shards[worker::workers]
        if plan.mode == "shards":
            starts, position = {}, 0
            for s in plan.order:  # ids: position in the epoch's shard order, the same on every process
                starts[s] = position
                position += self.rows[s]
            for s in shards:
                for i, row in enumerate(self._read_shard(s)):
                    yield starts[s] + i, row
        else:
            for s in shards:
                for i, row in enumerate(self._read_shard(s)):
                    position = plan.offsets[s] + i
                    if position % self.world == self.rank:
                        yield position, row

    def _shuffled(self, items: Iterator[Any], rng: np.random.Generator) -> Iterator[Any]:
        if not self.shuffle or self.buffer_size <= 1:
            yield from items
            return
        buffer: list[Any] = []
        for item in items:
            if len(buffer) < self.buffer_size:
                buffer.append(item)
                continue
            j = int(rng.integers(len(buffer)))
            yield buffer[j]
            buffer[j] = item
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    # -- samples -----------------------------------------------------------------------
    def _load(self, epoch: int, position: int, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        try:
            img, label = self.dataset.decode_row(row)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{self.dataset.where(position)} (epoch {epoch}): cannot read it: "
                            f"{type(exc).__name__}: {exc}") from exc
        return img, self.dataset.check(position, img, label)

    def _count(self, plan: EpochPlan, worker: int, workers: int) -> int:
        """How many samples this worker delivers in the plan's epoch (without reading anything)."""
        shards = plan.rank_shards[worker::workers]
        if plan.mode == "shards":
            count = sum(self.rows[s] for s in shards)
        else:
            count = 0
            for s in shards:
                start, end = plan.offsets[s], plan.offsets[s] + self.rows[s]
                count += len(range(start + (self.rank - start) % self.world, end, self.world))
        if worker == 0 and self.pad:
            count += plan.target - plan.counts[self.rank]
        return count

    def _epoch(self, epoch: int, worker: int, workers: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """This worker's samples of one epoch; the first ``skip`` were consumed before a resume and
        are passed over (not decoded, unless bad samples must be detected to replay substitutions)."""
        plan = self.plan(epoch)
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 2])
        total = len(self.dataset)
        needed = plan.target - plan.counts[self.rank] if worker == 0 and self.pad else 0
        decode_skipped = self.dataset.skip_bad_samples
        emitted: list[tuple[int, dict[str, Any]]] = []  # the first rows, for repeats
        last_good: tuple[int, dict[str, Any]] | None = None
        pending: list[str] = []  # bad rows waiting for a good one to stand in for them
        count = 0

        def emit(position: int, img: Any, label: Any, repeat: bool, skipped: list[str]) -> dict | None:
            nonlocal count
            count += 1
            if count <= skip:
                return None
            # the same augmentation seed as a map-style loader at this stream position
            sample = self.dataset.prepare(position, img, label, sample_seed(self.seed, epoch * total + position))
            sample.update(epoch=epoch, repeat=repeat, skipped=skipped)
            return sample

        for position, row in self._shuffled(self._rows(plan, worker, workers), rng):
            if count < skip and not decode_skipped:
                count += 1
                if len(emitted) < needed:
                    emitted.append((position, row))
                continue
            try:
                img, label = self._load(epoch, position, row)
            except DataError as exc:
                if not decode_skipped:
                    raise
                if last_good is None:
                    pending.append(str(exc))
                    continue
                stand_in = self._load(epoch, *last_good)  # a good sample stands in: every process keeps its count
                sample = emit(last_good[0], *stand_in, True, [str(exc)])
                if sample is not None:
                    yield sample
                continue
            for reason in pending:  # bad rows before the first good one
                sample = emit(position, img, label, True, [reason])
                if sample is not None:
                    yield sample
            pending = []
            last_good = (position, row)
            if len(emitted) < needed:
                emitted.append((position, row))
            sample = emit(position, img, label, False, [])
            if sample is not None:
                yield sample
        if pending:
            raise DataError(f"{self.dataset.key}: every sample this worker read in epoch {epoch} is bad; "
                            f"the last: {pending[-1]}")
        for i in range(needed):  # even out the processes: repeat a few of this epoch's samples
            position, row = emitted[i % len(emitted)]
            if count < skip:
                count += 1
                continue
            sample = emit(position, *self._load(epoch, position, row), True, [])
            if sample is not None:
                yield sample

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes samples from its workers in turn, starting with worker 0. After
        # `start_samples` the next one is due from worker start_samples % workers: loader worker
        # `id` plays that role, so the interleaving goes on exactly. Of the consumed samples this
        # (logical) worker delivered every workers-th: skip whole epochs by counting, then the rest.
        worker = (worker + self.start_samples) % workers
        skip = len(range(worker, self.start_samples, workers))
        epoch = self.start_epoch
        while skip > 0:
            count = self._count(self.plan(epoch), worker, workers)
            if count == 0 or skip < count:
                break
            skip -= count
            epoch += 1
        while self.epochs is None or epoch < self.start_epoch + self.epochs:
            yield from self._epoch(epoch, worker, workers, skip)
            skip = 0
            epoch += 1


class StreamBatches:
    """Batches of ``batch_size`` samples from a ``ShardStream``, assembled in the main process."""

    def __init__(self, stream: ShardStream, batch_size: int, workers: int, collate: Any, pin_memory: bool = False):
        self.stream, self.batch_size, self.collate = stream, batch_size, collate
        # its own generator: starting the loader must not draw from the global RNG (dropout uses it)
        generator = torch.Generator().manual_seed(stream.seed + stream.rank)

        self.loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                 persistent_workers=workers > 0 and stream.epochs is None, generator=generator,
                                 worker_init_fn=worker_threads if workers > 0 else None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        for sample in self.loader:
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self.collate(batch)
                batch = []
        if batch:
            yield self.collate(batch)


def describe_plan(stream: ShardStream, workers: int) -> str:
    plan = stream.plan(stream.start_epoch)
    shards = stream.dataset.shards
    text = (f"streaming {len(shards.files)} parquet file(s), {len(shards)} shard(s) (row groups), "
            f"{shards.total_rows} samples, {stream.world} process(es) x {workers} worker(s): {plan.mode} mode")
    if plan.mode == "examples" and stream.world > 1:
        text += (f" (every process reads every shard and keeps 1 sample in {stream.world}; "
                 f"{len(shards)} shards do not split evenly over {stream.world} processes)")
    return text
