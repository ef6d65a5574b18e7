"""Helpers that write small segmentation datasets as parquet files (Hub layout)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["background", "circle", "square", "triangle"]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_arrays(sample_id: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """A SyntheticShapes image whose first pixel spells the sample id (red = id // 256, green = id % 256)."""
    from seg_accel.data.synthetic import SyntheticShapes

    img, label = SyntheticShapes(num_samples=sample_id + 1, img_size=size, seed=7).read(sample_id)
    img = img.copy()
    img[0, 0] = [sample_id // 256, sample_id % 256, 0]
    return img, label


def sample_id(pixel_values_chw) -> int:
    """The id written by ``sample_arrays`` (on un-normalised pixel values)."""
    return int(round(float(pixel_values_chw[0, 0, 0]))) * 256 + int(round(float(pixel_values_chw[1, 0, 0])))


def write_parquet_dataset(root: Path, shard_sizes: list[int], split: str = "train", size: int = 16,
                          bad_rows: dict[int, str] | None = None) -> list[int]:
    """``root/data/<split>-0000i-of-0000n.parquet`` with the given rows per file (one row group each).
    ``bad_rows``: sample id -> 'undecodable' | 'size' | 'value'. Returns the sample ids in file order."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    (root / "data").mkdir(parents=True, exist_ok=True)
    ids, next_id = [], 0
    for i, rows in enumerate(shard_sizes):
        images, labels = [], []
        for _ in range(rows):
            img, label = sample_arrays(next_id, size)
            kind = (bad_rows or {}).get(next_id)
            img_bytes, label_bytes = png(img), png(label)
            if kind == "undecodable":
                img_bytes = b"this is not an image"
            elif kind == "size":
                label_bytes = png(label[: size // 2])
            elif kind == "value":
                label_bytes = png(np.full_like(label, 77))
            images.append({"bytes": img_bytes, "path": None})
            labels.append({"bytes": label_bytes, "path": None})
            ids.append(next_id)
            next_id += 1
        table = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        table.to_parquet(str(root / "data" / f"{split}-{i:05d}-of-{len(shard_sizes):05d}.parquet"))
    return ids
