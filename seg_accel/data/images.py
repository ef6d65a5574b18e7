"""Unlabeled images for ``seg-accel predict``: files, folders and globs collected once each, an
output name per image, and a dataset that runs them through a test pipeline."""
from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from seg_accel.data.base import READ_ERRORS, SegDataset
from seg_accel.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def collect_inputs(inputs: Sequence[str], key: str = "INPUTS") -> list[Path]:
    """Image files from files, folders (searched recursively, sorted) and globs, each once."""
    found: list[Path] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files = [path]
        elif glob.has_magic(text):
            files = sorted(Path(p) for p in glob.glob(text, recursive=True)
                           if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
        else:
            raise ConfigError(f"{text}: no such file, folder or glob", key=key)
        if not files:
            raise ConfigError(f"{text}: no image files in it ({', '.join(IMAGE_SUFFIXES)})", key=key)
        found += files
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def output_names(paths: Sequence[Path]) -> list[str]:
    """A unique name per image for its outputs: its path below the inputs' common folder,
    without the suffix (``a/b.jpg`` -> ``a/b``); files that differ only by suffix keep it
    (``b.jpg``, ``b.png`` -> ``b_jpg``, ``b_png``)."""
    if not paths:
        return []
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    names = [p.relative_to(root).with_suffix("").as_posix() for p in resolved]
    counts = Counter(names)
    return [f"{name}_{p.suffix.lstrip('.').lower()}" if counts[name] > 1 else name for name, p in zip(names, resolved)]


class UnlabeledImages(SegDataset):
    """Images without labels, for prediction: the classes are given, samples come in test mode
    and the pipeline sees an all-zero label map."""

    def __init__(self, classes: list[str], pipeline: list[dict] | None, key: str):
        super().__init__(pipeline=pipeline, classes=classes)
        self.test_mode = True
        self.key = key

    @classmethod
    def resolve_classes(cls, **kwargs: Any) -> list[str]:
        raise ConfigError(f"{cls.__name__} needs its classes", key="classes")

    @staticmethod
    def unlabeled(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return rgb, np.zeros(rgb.shape[:2], dtype=np.uint8)


class ImageFiles(UnlabeledImages):
    """Image files for prediction."""

    def __init__(self, paths: Sequence[Path], classes: list[str], pipeline: list[dict] | None = None):
        super().__init__(classes, pipeline, "INPUTS")
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return f"image {self.paths[index]}"

    def image_size(self, index: int) -> tuple[int, int] | None:
        from PIL import Image

        try:
            with Image.open(self.paths[index]) as img:
                return img.height, img.width
        except READ_ERRORS:
            return None  # a bad sample: reported when it is read

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        with Image.open(self.paths[index]) as img:
            return self.unlabeled(self.rgb8(img))


class HubImages(UnlabeledImages):
    """The images of a Hugging Face dataset split (a Hub id, or a local folder in Hub layout),
    for prediction; other columns (labels) are not read. Named ``<split>/<row, 6 digits>``."""

    def __init__(self, path: str, split: str, classes: list[str], pipeline: list[dict] | None = None,
                 name: str | None = None, image_column: str = "image"):
        super().__init__(classes, pipeline, "--hub-dataset")
        import datasets

        try:
            table = datasets.load_dataset(path, name, split=split)
        except Exception as exc:  # datasets raises many types for missing/unreachable data and splits
            raise ConfigError(f"cannot load split '{split}' of dataset '{path}': {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                              key="--hub-dataset") from exc
        if image_column not in table.column_names:
            raise ConfigError(f"dataset '{path}' has no column '{image_column}'; its columns: {table.column_names}",
                              key="--image-column")
        if isinstance(table.features[image_column], datasets.Image):  # decoded (and checked) here
            table = table.cast_column(image_column, datasets.Image(decode=False))
        self.table, self.path, self.split, self.image_column = table, path, split, image_column

    def __len__(self) -> int:
        return len(self.table)

    def describe(self, index: int) -> str:
        return f"dataset {self.path}, split {self.split}, row {index}"

    def sample_name(self, index: int) -> str:
        return f"{self.split}/{index:06d}"

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        import io

        from PIL import Image

        value = self.table[index][self.image_column]
        if isinstance(value, dict):  # an Image feature, not decoded: bytes or a file path
            data = value.get("bytes") or Path(value["path"]).read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                return self.unlabeled(self.rgb8(img))
        return self.unlabeled(self.rgb8(value))
