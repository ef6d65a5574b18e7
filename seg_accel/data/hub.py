"""HubDataset: a Hugging Face dataset (Hub id or local folder), map-style or streamed.

Sources: a Hub dataset id (``path: user/name``, ``name``, ``split``, ``revision``), a
local folder in Hub layout (parquet files + README configs, or ``data/<split>-*.parquet``),
or an image folder with ``metadata.jsonl`` (``file_name`` + ``label_file_name``).
``datasets`` resolves the files; map-style data are loaded with ``datasets``; streamed
data are read from the parquet files directly (row groups are the shards), so that
each process and worker reads only its own shards (``seg_accel.data.streaming``).
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seg_accel.data.base import SegDataset
from seg_accel.errors import ConfigError
from seg_accel.registry import DATASETS


def decode_cell(cell: Any, base_dir: str | None = None) -> np.ndarray:
    """An image cell as ``datasets`` stores it (``{'bytes', 'path'}``), a PIL image or an array."""
    if isinstance(cell, np.ndarray):
        return cell
    if isinstance(cell, Image.Image):
        return np.array(cell)
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            with Image.open(io.BytesIO(cell["bytes"])) as img:
                return np.array(img)
        if cell.get("path"):
            path = cell["path"] if base_dir is None or os.path.isabs(cell["path"]) else os.path.join(base_dir, cell["path"])
            with Image.open(path) as img:
                return np.array(img)
    raise ValueError(f"not an image: {type(cell).__name__}")


def _is_local(path: str) -> bool:
    return os.path.isdir(path)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _hub_error(path: str, exc: Exception) -> ConfigError:
    hint = " (HF_HUB_OFFLINE is set: nothing can be fetched)" if _offline() else ""
    return ConfigError(f"cannot load dataset '{path}'{hint}: {type(exc).__name__}: {exc}", key="path")


@DATASETS.register()
class HubDataset(SegDataset):
    """A Hugging Face dataset of images and label maps.

    ``path``: a Hub id or a local folder; ``name`` (config), ``split``, ``revision``,
    ``data_dir`` as in ``datasets.load_dataset``. ``streaming: true`` streams the
    parquet files (no download of the whole set; sharded across processes and workers).
    ``image_column``/``label_column`` name the columns. Class names come from
    ``classes`` or the dataset's ``id2label.json``.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        name: str | None = None,
        revision: str | None = None,
        data_dir: str | None = None,
        streaming: bool = False,
        image_column: str = "image",
        label_column: str = "label",
        classes: list[str] | None = None,
        palette: list[list[int]] | None = None,
        label_map: dict[int, int] | None = None,
        reduce_zero_label: bool = False,
        pipeline: list[dict] | None = None,
    ):
        classes = self.resolve_classes(path=path, classes=classes, revision=revision)
        super().__init__(pipeline, classes, label_map, reduce_zero_label, palette)
        self.path, self.split, self.config_name = path, split, name
        self.revision, self.data_dir = revision, data_dir
        self.streaming = streaming
        self.image_column, self.label_column = image_column, label_column
        self.base_dir = path if _is_local(path) else None
        if streaming:
            from seg_accel.data.streaming import parquet_shards

            self.files = self._data_files()
            self.shards = parquet_shards(self.files)
            self._check_columns(self.shards.columns)
            self.table = None
        else:
            self.table = self._load_table()

    # -- sources -------------------------------------------------------------------
    @classmethod
    def resolve_classes(cls, path: str | None = None, classes: list[str] | None = None, revision: str | None = None,
                        **_: Any) -> list[str]:
        if classes is not None:
            if not classes or not all(isinstance(c, str) for c in classes):
                raise ConfigError(f"expected a non-empty list of class names, got {classes!r}", key="classes")
            return list(classes)
        if path is None:
            raise ConfigError("needs 'path'", key="path")
        if _is_local(path):
            file = Path(path) / "id2label.json"
            if not file.is_file():
                raise ConfigError(f"class names unknown: set 'classes: [...]' or put an id2label.json in {path}",
                                  key="classes")
        else:
            from huggingface_hub import hf_hub_download

            try:
                file = Path(hf_hub_download(path, "id2label.json", repo_type="dataset", revision=revision))
            except Exception as exc:  # offline, missing repo or file: all mean the same to the user
                raise ConfigError(
                    f"class names unknown: set 'classes: [...]'; no id2label.json could be fetched from dataset "
                    f"'{path}' ({type(exc).__name__}{', HF_HUB_OFFLINE is set' if _offline() else ''})",
                    key="classes",
                ) from exc
        try:
            mapping = json.loads(file.read_text())
            return [mapping[k] for k in sorted(mapping, key=int)]
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{file} is not an id2label mapping ({{\"0\": \"name\", ...}}): {exc}",
                              key="classes") from exc

    def _data_files(self) -> list[str]:
        import datasets

        try:
            builder = datasets.load_dataset_builder(self.path, self.config_name, revision=self.revision,
                                                    data_dir=self.data_dir)
        except Exception as exc:  # datasets raises many types for missing/unreachable data
            raise _hub_error(self.path, exc) from exc
        files = builder.config.data_files or {}
        if self.split not in files:
            raise ConfigError(f"dataset '{self.path}' has no split '{self.split}'; it has {sorted(files)}", key="split")
        found = [str(f) for f in files[self.split]]
        not_parquet = [f for f in found if not f.endswith(".parquet")]
        if not_parquet:
            raise ConfigError(
                f"streaming reads parquet files; '{self.path}' split '{self.split}' has {Path(not_parquet[0]).name}. "
                "Use streaming: false, or a parquet revision (the Hub converts datasets: revision: refs/convert/parquet)",
                key="streaming",
            )
        return found

    def _load_table(self) -> Any:
        import datasets

        try:
            table = datasets.load_dataset(self.path, self.config_name, split=self.split, revision=self.revision,
                                          data_dir=self.data_dir)
        except ValueError as exc:
            if "split" in str(exc).lower():
                raise ConfigError(f"{exc}", key="split") from exc
            raise _hub_error(self.path, exc) from exc
        except Exception as exc:  # datasets raises many types for missing/unreachable data
            raise _hub_error(self.path, exc) from exc
        self._check_columns(table.column_names)
        for column in (self.image_column, self.label_column):  # we decode (and check) images ourselves
            if isinstance(table.features[column], datasets.Image):
                table = table.cast_column(column, datasets.Image(decode=False))
        return table

    def _check_columns(self, columns: list[str]) -> None:
        for key, column in (("image_column", self.image_column), ("label_column", self.label_column)):
            if column not in columns:
                raise ConfigError(f"dataset '{self.path}' has no column '{column}'; its columns: {list(columns)}",
                                  key=key)

    # -- samples -------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.shards.total_rows if self.streaming else len(self.table)

    def describe(self, index: int) -> str:
        source = f"HubDataset {self.path}" + (f" ({self.config_name})" if self.config_name else "")
        return f"{source}, split {self.split}, row {index}"

    def decode_row(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        return self.rgb8(decode_cell(row[self.image_column], self.base_dir)), \
            decode_cell(row[self.label_column], self.base_dir)

    def image_size(self, index: int) -> tuple[int, int] | None:
        if self.streaming:
            return None
        cell = self.table[index][self.image_column]
        try:
            if isinstance(cell, dict) and cell.get("bytes") is not None:
                with Image.open(io.BytesIO(cell["bytes"])) as img:  # the header only
                    return img.height, img.width
            if hasattr(cell, "size") and hasattr(cell, "mode"):  # a PIL image
                return cell.height, cell.width
        except OSError:
            return None
        return None

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self.streaming:
            raise TypeError("a streamed dataset has no random access; it is read through its stream loader")
        return self.decode_row(self.table[index])
