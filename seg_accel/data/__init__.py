"""Datasets, pipelines and loaders."""
from __future__ import annotations

from seg_accel.data.base import SegDataset
from seg_accel.data.loader import (
    EpochBookkeeping,
    InfiniteShardedSampler,
    ShardSampler,
    build_train_loader,
    build_val_loader,
    collate,
)
from seg_accel.registry import DATASETS


def build_dataset(cfg: dict, key: str, ignore_index: int = 255, skip_bad_samples: bool = False) -> SegDataset:
    """Build ``data.train``/``data.val`` (``{type: ..., pipeline: [...], ...}``)."""
    dataset = DATASETS.build(cfg, key)
    dataset.key, dataset.ignore_index, dataset.skip_bad_samples = key, ignore_index, skip_bad_samples
    return dataset


__all__ = [
    "EpochBookkeeping",
    "InfiniteShardedSampler",
    "SegDataset",
    "ShardSampler",
    "build_dataset",
    "build_train_loader",
    "build_val_loader",
    "collate",
]
