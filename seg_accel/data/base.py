"""The dataset base class: load a sample, run the pipeline, hand tensors to the loader."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from seg_accel.data.transforms import build_pipeline


class SegDataset(Dataset):
    """Base of all segmentation datasets.

    Subclasses implement ``__len__``, ``load(index) -> (img_hwc_uint8_rgb, label_hw)``
    and the classmethod ``resolve_classes(**kwargs)`` (class names from the config
    alone, so the config can be validated before any data is read).

    An item is addressed by ``index`` or ``(index, seed)``; the seed drives the
    sample's random augmentations. With ``test_mode`` the returned ``labels`` are
    the original ones (metrics are computed at the original resolution).
    """

    test_mode: bool = False

    def __init__(self, pipeline: list[dict] | None = None, classes: list[str] | None = None):
        self.transforms = build_pipeline(pipeline, "pipeline")
        self.classes = list(classes) if classes is not None else list(self.resolve_classes())

    @classmethod
    def resolve_classes(cls, **kwargs: Any) -> list[str]:
        raise NotImplementedError(f"{cls.__name__} must implement resolve_classes")

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement __len__")

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} must implement load")

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for error messages."""
        return f"{type(self).__name__}[{index}]"

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        img, label = self.load(index)
        results = {
            "img": torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float(),
            "gt_seg_map": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
        }
        original_label = results["gt_seg_map"]
        rng = np.random.default_rng(seed)
        for transform in self.transforms:
            results = transform(results, rng)
        return {
            "pixel_values": results["img"].contiguous(),
            "labels": original_label if self.test_mode else results["gt_seg_map"].contiguous(),
            "index": index,
        }
