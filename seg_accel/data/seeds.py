"""What the DataLoaders and the shard streams share: the order of an epoch, each sample's
augmentation seed (a pure function of its position in the stream) and the set-up of a
DataLoader worker."""
from __future__ import annotations

import numpy as np
import torch

_SEED_MOD = 2**63 - 1


def epoch_order(size: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The order of the dataset's indices in ``epoch`` (same on every process)."""
    if not shuffle:
        return torch.arange(size)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % _SEED_MOD)
    return torch.randperm(size, generator=gen)


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap bijective scramble of 64-bit integers."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def sample_seed(seed: int, position: int) -> int:
    """Augmentation seed of the sample at global stream ``position`` (a pure function of both)."""
    return _mix64((_mix64(seed & 0xFFFFFFFFFFFFFFFF) + position * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) % _SEED_MOD


def worker_threads(worker_id: int = 0) -> None:
    """In a DataLoader worker: one torch (and OpenCV) thread, whatever the training process has:
    workers run beside each other and beside training, so threads inside each would only fight
    for the same cores."""
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


def worker_init(worker_id: int) -> None:
    """``worker_threads``, and numpy's global RNG from torch's per-worker seed (the transforms have
    their own per-sample seeds)."""
    worker_threads(worker_id)
    np.random.seed(torch.initial_seed() % 2**32)
