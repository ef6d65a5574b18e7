"""Datasets, pipelines and loaders."""
from __future__ import annotations

from seg_accel.data.base import SegDataset
from seg_accel.data.loader import InfiniteShardedSampler, ShardSampler, build_train_loader, build_val_loader, collate
from seg_accel.registry import DATASETS


def build_dataset(cfg: dict, key: str) -> SegDataset:
    """Build ``data.train``/``data.val`` (``{type: ..., pipeline: [...], ...}``)."""
    return DATASETS.build(cfg, key)


__all__ = [
    "InfiniteShardedSampler",
    "SegDataset",
    "ShardSampler",
    "build_dataset",
    "build_train_loader",
    "build_val_loader",
    "collate",
]
