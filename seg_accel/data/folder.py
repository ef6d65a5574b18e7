"""CustomDataset: a local image folder and a label folder with matching file names.

The classic MMSegmentation layout (and CamVid's)::

    data_root/img_dir/0001.png     data_root/ann_dir/0001.png

Labels are single-channel images whose pixel values are class ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from seg_accel.data.base import READ_ERRORS, SegDataset
from seg_accel.errors import ConfigError
from seg_accel.registry import DATASETS


def _root(data_root: str | None, sub: str) -> Path:
    path = Path(sub)
    return path if data_root is None or path.is_absolute() else Path(data_root) / path


@DATASETS.register()
class CustomDataset(SegDataset):
    """Images in ``img_dir`` and label maps in ``ann_dir`` (relative to ``data_root``),
    paired by file name: ``<name><img_suffix>`` with ``<name><seg_map_suffix>``, ``name``
    being the path below ``img_dir`` (sub-folders are searched).

    ``split``: optional text file listing the samples to use, one per line (a name,
    a file name or a path; only the base name of the first word counts, so
    SegNet-style list files work). ``classes``: the class names, or an
    ``id2label.json`` in ``data_root``. ``mask_dir`` (with ``mask_suffix``): a region mask per
    sample, ``<name><mask_suffix>``, whose zero pixels become ``ignore_index`` for losses and
    metrics (a field-of-view mask: DRIVE, STARE, CHASE_DB1, HRF). ``label_map`` remaps label values
    (``{11: 255}`` makes CamVid's void ignored); ``reduce_zero_label`` maps 0 to 255
    and every other label to label - 1.
    """

    def __init__(
        self,
        img_dir: str,
        ann_dir: str,
        data_root: str | None = None,
        img_suffix: str = ".jpg",
        seg_map_suffix: str = ".png",
        split: str | None = None,
        classes: list[str] | None = None,
        label_map: dict[int, int] | None = None,
        reduce_zero_label: bool = False,
        palette: list[list[int]] | None = None,
        pipeline: list[dict] | None = None,
        mask_dir: str | None = None,
        mask_suffix: str = ".png",
    ):
        super().__init__(pipeline, self.resolve_classes(data_root=data_root, classes=classes), label_map,
                         reduce_zero_label, palette)
        self.img_dir = _root(data_root, img_dir)
        self.ann_dir = _root(data_root, ann_dir)
        self.img_suffix = img_suffix
        self.seg_map_suffix = seg_map_suffix
        self.mask_dir = _root(data_root, mask_dir) if mask_dir is not None else None
        self.mask_suffix = mask_suffix
        folders = [("img_dir", self.img_dir), ("ann_dir", self.ann_dir)]
        if self.mask_dir is not None:
            folders.append(("mask_dir", self.mask_dir))
        if data_root is not None and not Path(data_root).is_dir():
            raise ConfigError(f"data_root not found: {data_root} (relative paths start from {Path.cwd()}): set it "
                              "to the folder holding img_dir and ann_dir, e.g. --cfg-options "
                              "data.train.data_root=/path/to/data data.val.data_root=/path/to/data", key="data_root")
        for name, path in folders:
            if not path.is_dir():
                raise ConfigError(f"directory not found: {path} (set {name}, or data_root above it)", key=name)
        if split is not None:
            split_path = _root(data_root, split)
            if not split_path.is_file():
                raise ConfigError(f"split file not found: {split_path}", key="split")
            names = []
            for line in split_path.read_text().splitlines():
                if line.strip():
                    base = Path(line.split()[0]).name
                    names.append(base[: -len(img_suffix)] if base.endswith(img_suffix) else base)
        else:  # recursively, as MMSegmentation scans (Cityscapes keeps one folder per city)
            names = sorted(
                str(p.relative_to(self.img_dir))[: -len(img_suffix)]
                for p in self.img_dir.rglob(f"*{img_suffix}") if p.is_file()
            )
        if not names:
            raise ConfigError(f"no '*{img_suffix}' images found in {self.img_dir}", key="img_dir")
        self.names = names

    @classmethod
    def resolve_classes(cls, data_root: str | None = None, classes: list[str] | None = None, **_: object) -> list[str]:
        if classes is not None:
            if not classes or not all(isinstance(c, str) for c in classes):
                raise ConfigError(f"expected a non-empty list of class names, got {classes!r}", key="classes")
            return list(classes)
        id2label = Path(data_root or ".") / "id2label.json"
        if id2label.is_file():
            try:
                mapping = json.loads(id2label.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{id2label} is not valid JSON: {exc}", key="classes") from exc
            return [mapping[k] for k in sorted(mapping, key=int)]
        raise ConfigError(
            f"class names unknown: set 'classes: [...]' or put an id2label.json in data_root ({data_root})",
            key="classes",
        )

    def __len__(self) -> int:
        return len(self.names)

    def paths(self, index: int) -> tuple[Path, Path]:
        name = self.names[index]
        return self.img_dir / f"{name}{self.img_suffix}", self.ann_dir / f"{name}{self.seg_map_suffix}"

    def describe(self, index: int) -> str:
        img_path, ann_path = self.paths(index)
        return f"CustomDataset, image {img_path}, label {ann_path}"

    def sample_name(self, index: int) -> str:
        return self.names[index]

    def read_region(self, index: int) -> np.ndarray | None:
        if self.mask_dir is None:
            return None
        path = self.mask_dir / f"{self.names[index]}{self.mask_suffix}"
        if not path.is_file():
            raise FileNotFoundError(f"no region mask {path} (mask_dir, mask_suffix)")
        with Image.open(path) as mask:
            return np.array(mask)

    def image_size(self, index: int) -> tuple[int, int] | None:
        try:
            with Image.open(self.paths(index)[0]) as img:  # the header only
                return img.height, img.width
        except READ_ERRORS:
            return None  # a bad sample: reported when it is loaded

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        img_path, ann_path = self.paths(index)
        with Image.open(img_path) as img, Image.open(ann_path) as label:
            return self.rgb8(img), np.array(label)
