"""The dataset base class: read a sample, check it, run the pipeline, hand tensors to the loader."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from seg_accel.data.transforms import build_pipeline
from seg_accel.threads import one_thread
from seg_accel.errors import ConfigError, DataError


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # PIL modes of 16/32-bit and float images


def image_to_rgb8(image: Any) -> tuple[np.ndarray, str | None]:
    """An image (PIL or array) as ``(H, W, 3)`` uint8 RGB, and a note when its values had to be
    scaled. The scale follows the image's type, never its content (a value means the same in
    every image): a 16-bit image becomes ``round(value / 257)`` (its full range onto 0..255; PIL's
    ``convert("RGB")`` would clip it and leave most pixels white), a float image is taken as 0..1
    and becomes ``round(value * 255)``, clipped."""
    note = None
    if hasattr(image, "mode"):  # PIL
        if image.mode not in HIGH_DEPTH_MODES:
            return np.array(image.convert("RGB")), None
        image = np.array(image)
    array = np.asarray(image)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            array = np.nan_to_num(array.astype(np.float64)) * 255.0
            note = "float images are taken as 0..1 and scaled to 8 bits (value x 255, clipped)"
        else:
            array = array.astype(np.float64) / 257.0
            note = "16-bit images are scaled to 8 bits (value / 257)"
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    elif array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif array.shape[2] == 4:
        array = array[..., :3]
    return array, note


def label_lookup(label_map: dict[int, int] | None, reduce_zero_label: bool) -> np.ndarray | None:
    """A 256-entry table applying ``label_map`` then ``reduce_zero_label`` (0 -> 255, c -> c - 1)."""
    if not label_map and not reduce_zero_label:
        return None
    lut = np.arange(256, dtype=np.uint8)  # uint8 labels stay uint8 (cheap to check and copy)
    for src, dst in (label_map or {}).items():
        if not (0 <= int(src) < 256 and 0 <= int(dst) < 256):
            raise ConfigError(f"label_map values must be in 0..255, got {src}: {dst}", key="label_map")
        lut[int(src)] = int(dst)
    if reduce_zero_label:
        lut = np.where(lut == 0, 255, lut - 1).astype(np.uint8)
        lut[255] = 255
    return lut



def _read_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (OSError, ValueError, KeyError, TypeError, Image.DecompressionBombError)


READ_ERRORS = _read_errors()  # what reading an image or label may raise (a decompression bomb included)

class SegDataset(Dataset):
    """Base of all segmentation datasets.

    Subclasses implement ``__len__``, ``read(index) -> (img_hwc_uint8_rgb, label_hw)``,
    ``describe(index)`` (where the sample comes from: file or row) and the classmethod
    ``resolve_classes(**kwargs)`` (class names from the config alone, so that the config
    can be validated before any data is read).

    ``load(index)`` checks every sample: an image or label that does not decode or is
    missing, a label whose size differs from its image, a label value that is neither
    a class id nor ``ignore_index``. By default a bad sample is an error naming the
    dataset, index and file; with ``skip_bad_samples`` it is replaced by the next good
    one and reported in the batch's ``skipped`` list.

    An item is addressed by ``index`` or ``(index, seed[, epoch])``; the seed drives the
    sample's random augmentations. With ``test_mode`` the returned ``labels`` are the original
    ones (metrics are computed at the original resolution).
    """

    test_mode: bool = False
    ignore_index: int = 255  # the head's; set by the trainer
    skip_bad_samples: bool = False  # data.skip_bad_samples; set by the trainer
    key: str = "data"  # the config key, for messages ("data.train")

    def __init__(
        self,
        pipeline: list[dict] | None = None,
        classes: list[str] | None = None,
        label_map: dict[int, int] | None = None,
        reduce_zero_label: bool = False,
        palette: list[list[int]] | None = None,
    ):
        self.transforms = build_pipeline(pipeline, "pipeline")
        self.classes = list(classes) if classes is not None else list(self.resolve_classes())
        self.label_lut = label_lookup(label_map, reduce_zero_label)
        if palette is not None and (len(palette) != len(self.classes) or any(len(c) != 3 for c in palette)):
            raise ConfigError(f"needs one [r, g, b] per class ({len(self.classes)}), got {palette}", key="palette")
        self.palette = palette

    @classmethod
    def resolve_classes(cls, **kwargs: Any) -> list[str]:
        raise NotImplementedError(f"{cls.__name__} must implement resolve_classes")

    def __len__(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must implement __len__")

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError(f"{type(self).__name__} must implement read")

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for error messages."""
        return f"{type(self).__name__}[{index}]"

    def image_size(self, index: int) -> tuple[int, int] | None:
        """``(h, w)`` of sample ``index`` without decoding it (evaluation batches images of one
        size together), or None when that is not known cheaply."""
        return None

    def sample_name(self, index: int) -> str:
        """A file name (without suffix) for outputs about sample ``index`` (overlays): the source
        image's name where there is one, else the zero-padded index."""
        return f"{index:06d}"

    def where(self, index: int) -> str:
        return f"{self.key} ({self.describe(index)}), index {index}"

    def rgb8(self, image: Any) -> np.ndarray:
        """``image_to_rgb8``, saying once per dataset (and process) when images are scaled."""
        array, note = image_to_rgb8(image)
        if note is not None and not getattr(self, "_scaling_said", False):
            self._scaling_said = True
            logging.getLogger("seg_accel").warning("%s: %s; convert the images yourself for another mapping",
                                                   self.key, note)
        return array

    def check(self, index: int, img: np.ndarray, label: np.ndarray) -> np.ndarray:
        """The checked label map (after ``label_map``/``reduce_zero_label``)."""
        if label.ndim != 2:
            raise DataError(f"{self.where(index)}: the label has {label.ndim} dimensions; expected one channel")
        if img.ndim != 3 or img.shape[:2] != label.shape:
            raise DataError(
                f"{self.where(index)}: the label is {label.shape[1]}x{label.shape[0]} (w x h) but the image is "
                f"{img.shape[1]}x{img.shape[0]}"
            )
        if self.label_lut is not None:
            label = self.label_lut[label]
        if label.dtype in (np.uint8, np.uint16):  # a count per value: one pass, no sort
            values = np.flatnonzero(np.bincount(label.ravel()))
        else:
            values = np.unique(label)
        bad = values[(values >= len(self.classes)) & (values != self.ignore_index)]
        if bad.size:
            raise DataError(
                f"{self.where(index)}: label values {bad[:10].tolist()} are neither a class id "
                f"(0..{len(self.classes) - 1}) nor ignore_index ({self.ignore_index})"
            )
        if values.size and (values == self.ignore_index).all() and not self.test_mode \
                and not getattr(self, "_unlabelled_said", False):
            self._unlabelled_said = True  # once per dataset and process: it trains nothing (loss 0)
            logging.getLogger("seg_accel").warning(
                "%s: no labelled pixel (every pixel is ignore_index %d): the sample trains nothing; are the labels in "
                "the expected format (label_map, reduce_zero_label)?", self.where(index), self.ignore_index)
        return label

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The checked image and label of sample ``index``; a bad sample raises DataError."""
        try:
            img, label = self.read(index)
        except DataError:
            raise
        except READ_ERRORS as exc:  # unreadable, missing, undecodable, a decompression bomb
            raise DataError(f"{self.where(index)}: cannot read it: {type(exc).__name__}: {exc}") from exc
        label = self.check(index, img, label)
        try:
            region = self.read_region(index)
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.where(index)}: cannot read its region mask: {type(exc).__name__}: {exc}") from exc
        if region is not None:
            label = self.apply_region(index, label, region)
        return img, label

    def read_region(self, index: int) -> np.ndarray | None:
        """The region mask of sample ``index`` (``mask_dir``), or None: zero pixels are outside."""
        return None

    def apply_region(self, index: int, label: np.ndarray, region: np.ndarray) -> np.ndarray:
        """Pixels outside the region (mask value 0) become ``ignore_index``: no loss, no gradient,
        no metric counts them."""
        if region.ndim == 3:  # an RGB(A) mask: outside where every channel is 0
            region = region.any(axis=2)
        if region.shape != label.shape:
            raise DataError(f"{self.where(index)}: the region mask is {region.shape[1]}x{region.shape[0]} (w x h) but "
                            f"the label is {label.shape[1]}x{label.shape[0]}")
        if label.dtype.kind in "ui" and self.ignore_index > np.iinfo(label.dtype).max:
            label = label.astype(np.int64)
        return np.where(region != 0, label, np.asarray(self.ignore_index, dtype=label.dtype))

    def prepare(self, index: int, img: np.ndarray, label: np.ndarray, seed: int | None) -> dict[str, Any]:
        """Run the pipeline on a checked sample (one torch thread: ``one_thread``)."""
        with one_thread():
            results = {
                "img": torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float(),
                "gt_seg_map": torch.from_numpy(np.ascontiguousarray(label).astype(np.int64)),
            }
            original_label = results["gt_seg_map"]
            rng = np.random.default_rng(seed)
            for transform in self.transforms:
                results = transform(results, rng)
            sample = {
                "pixel_values": results["img"].contiguous(),
                "labels": original_label if self.test_mode else results["gt_seg_map"].contiguous(),
                "index": index,
            }
            if "valid_hw" in results:  # padded: the size of the image's own pixels (top left)
                sample["valid_hw"] = tuple(int(v) for v in results["valid_hw"])
            return sample

    def __getitem__(self, key: int | tuple[int, int] | tuple[int, int, int]) -> dict[str, Any]:
        index, seed, epoch = (*key, 0)[:3] if isinstance(key, tuple) else (key, None, 0)
        skipped: list[str] = []
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            try:
                img, label = self.load(candidate)
            except DataError as exc:
                if not self.skip_bad_samples:
                    raise
                skipped.append(str(exc))
                continue
            sample = self.prepare(candidate, img, label, seed)
            if skipped and self.test_mode:  # evaluation: the stand-in must not be counted
                sample["labels"] = torch.full_like(sample["labels"], self.ignore_index)
            sample.update(skipped=skipped, epoch=epoch)
            return sample
        raise DataError(f"{self.key}: every sample is bad ({len(skipped)} tried); the last: {skipped[-1]}")
