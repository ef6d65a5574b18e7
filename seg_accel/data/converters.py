"""From the official archives of standard datasets to the folder layout their configs read
(``configs/_base_/datasets/``): ``seg-accel convert-dataset NAME SOURCE [--out DIR]``.

Each converter reads the archives as downloaded (zip / tar, or the folders they extract to),
decodes the official formats (``.tif``, ``.gif``, ``.ppm`` and ``.ppm.gz``, ``.mat``) and writes
PNG images and single-channel PNG label maps of class ids. Vessel labels (DRIVE, STARE,
CHASE_DB1, HRF) are stored 0/255 and become ``value // 128`` (0 background, 1 vessel). The
class tables (Cityscapes ids -> train ids, COCO-Stuff ids -> 0..170, Potsdam colours) are the
datasets' published ones, as MMSegmentation uses them.
"""
from __future__ import annotations

import fnmatch
import gzip
import io
import logging
import re
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import BinaryIO
from pathlib import Path

import numpy as np
from PIL import Image

from seg_accel.errors import ConfigError, DataError

logger = logging.getLogger("seg_accel")

# Cityscapes: label id -> train id (the 19 evaluated classes 0..18; everything else 255)
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# COCO-Stuff 164k: the stuffthingmaps use ids 0..181 with 11 ids no category has; dropping them
# gives the 171 contiguous train ids
COCO_STUFF_UNUSED = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
# ISPRS Potsdam label colours (RGB) -> the converter's values (0: none of them; reduce_zero_label ignores it)
POTSDAM_COLOURS = {(255, 255, 255): 1, (0, 0, 255): 2, (0, 255, 255): 3, (0, 255, 0): 4, (255, 255, 0): 5,
                   (255, 0, 0): 6}
POTSDAM_TRAIN_TILES = ("2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11", "5_12",
                       "6_10", "6_11", "6_12", "6_7", "6_8", "6_9", "7_10", "7_11", "7_12", "7_7", "7_8", "7_9")
POTSDAM_VAL_TILES = ("5_15", "6_15", "6_13", "3_13", "4_14", "6_14", "5_14", "2_13", "4_15", "2_14", "5_13", "4_13",
                     "3_14", "7_13")


# --------------------------------------------------------------------------- reading archives
MAX_MEMBER_BYTES = 256 * 2**20  # one file of a dataset archive (the largest, a Potsdam tile, is ~110 MB)
_CHUNK = 2**20


def read_capped(stream: BinaryIO, name: str, limit: int = MAX_MEMBER_BYTES) -> bytes:
    """The stream's bytes, read a chunk at a time, refused as soon as they pass ``limit``: a
    member whose header understates its size cannot take the memory either."""
    chunks, total = [], 0
    while chunk := stream.read(_CHUNK):
        total += len(chunk)
        if total > limit:
            raise DataError(f"{name}: more than {limit / 2**20:.0f} MiB once unpacked, not a file of this dataset "
                            f"(MAX_MEMBER_BYTES; a damaged or crafted archive?)")
        chunks.append(chunk)
    return b"".join(chunks)


class Member:
    """One file of a downloaded archive or folder: its name, its size as the archive declares it,
    and its bytes (``.gz`` undone), read within ``MAX_MEMBER_BYTES``."""

    def __init__(self, name: str, opener: Callable[[], BinaryIO], size: int):
        self.name = name[:-3] if name.endswith(".gz") else name
        self._open, self._gzipped, self.size = opener, name.endswith(".gz"), size

    @property
    def base(self) -> str:
        return self.name.rsplit("/", 1)[-1]

    def read(self) -> bytes:
        if self.size > MAX_MEMBER_BYTES:  # refused by its declared size, before anything is read
            raise DataError(f"{self.name}: {self.size / 2**20:,.0f} MiB once unpacked, over the "
                            f"{MAX_MEMBER_BYTES / 2**20:.0f} MiB of one file of a dataset (MAX_MEMBER_BYTES; a damaged "
                            "or crafted archive?)")
        try:
            with self._open() as stream:
                if self._gzipped:
                    with gzip.GzipFile(fileobj=stream) as unpacked:
                        return read_capped(unpacked, self.name)
                return read_capped(stream, self.name)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise DataError(f"{self.name}: the archive is damaged ({type(exc).__name__}: {exc})") from exc

    def image(self) -> Image.Image:
        try:
            return Image.open(io.BytesIO(self.read()))
        except (OSError, Image.DecompressionBombError) as exc:
            raise DataError(f"{self.name}: cannot decode it as an image: {exc}") from exc


def members(source: Path) -> Iterator[Member]:
    """Every file of a zip, a tar (any compression) or a folder (recursively), by name."""
    if source.is_dir():
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            yield Member(path.relative_to(source).as_posix(), lambda path=path: open(path, "rb"), path.stat().st_size)
    elif zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        for info in sorted(archive.infolist(), key=lambda i: i.filename):
            if not info.is_dir():
                yield Member(info.filename, lambda info=info: archive.open(info), info.file_size)
    elif tarfile.is_tarfile(source):
        archive = tarfile.open(source)
        for info in sorted(archive.getmembers(), key=lambda i: i.name):
            if info.isfile():
                yield Member(info.name, lambda info=info: archive.extractfile(info), info.size)
    else:
        raise ConfigError(f"{source}: not a folder, zip or tar archive", key="SOURCE")


def matching(source: Path, *patterns: str) -> list[Member]:
    return [m for m in members(source) if any(fnmatch.fnmatch(m.name.lower(), p) for p in patterns)]


def find(source: Path, *names: str, required: bool = True) -> Path | None:
    """The first of ``names`` (an archive or its extracted folder) in ``source``."""
    for name in names:
        if (source / name).exists():
            return source / name
    if required:
        raise ConfigError(f"{source} holds none of {', '.join(names)} (the archives as downloaded, or the folders "
                          "they extract to)", key="SOURCE")
    return None


# --------------------------------------------------------------------------- writing
def save_image(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(path)


def save_label(label: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)


def binary_label(image: Image.Image) -> np.ndarray:
    """A 0/255 vessel (or field-of-view) image -> 0/1: the first channel's ``value // 128``."""
    array = np.array(image.convert("RGB") if image.mode not in ("L", "I", "I;16", "1") else image.convert("L"))
    first = array[..., 0] if array.ndim == 3 else array
    return (first // 128).astype(np.uint8)


def lookup(table: dict[int, int], default: int = 255, size: int = 256) -> np.ndarray:
    lut = np.full(size, default, dtype=np.uint8)
    for src, dst in table.items():
        lut[src] = dst
    return lut


def _progress(items: list, desc: str) -> Iterator:
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, dynamic_ncols=True, leave=False))


# --------------------------------------------------------------------------- converters
def convert_cityscapes(source: Path, out: Path | None = None) -> dict[str, int]:
    """``gtFine/**/*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` beside them (or under
    ``out`` with the same sub-folders): label id -> train id, everything else 255."""
    gt = source / "gtFine" if (source / "gtFine").is_dir() else source
    files = sorted(gt.rglob("*_gtFine_labelIds.png"))
    if not files:
        raise ConfigError(f"no *_gtFine_labelIds.png under {gt}: extract gtFine_trainvaltest.zip there", key="SOURCE")
    lut = lookup(CITYSCAPES_TRAIN_IDS)
    for path in _progress(files, "cityscapes"):
        target = path.with_name(path.name.replace("_labelIds.png", "_labelTrainIds.png"))
        if out is not None:
            target = out / "gtFine" / target.relative_to(gt)
        save_label(lut[np.array(Image.open(path))], target)
    return {"labels": len(files)}


def convert_coco_stuff(source: Path, out: Path | None = None) -> dict[str, int]:
    """``annotations/{train2017,val2017}/*.png`` (stuffthingmaps) -> ``*_labelTrainIds.png``."""
    kept = [i for i in range(182) if i not in COCO_STUFF_UNUSED]
    lut = lookup({old: new for new, old in enumerate(kept)})
    counts = {}
    for split in ("train2017", "val2017"):
        folder = source / "annotations" / split
        files = sorted(p for p in folder.glob("*.png") if not p.name.endswith("_labelTrainIds.png")) \
            if folder.is_dir() else []
        for path in _progress(files, f"coco_stuff {split}"):
            target = path.with_name(path.stem + "_labelTrainIds.png")
            if out is not None:
                target = out / "annotations" / split / target.name
            save_label(lut[np.array(Image.open(path))], target)
        counts[split] = len(files)
    if not any(counts.values()):
        raise ConfigError(f"no stuffthingmaps under {source}/annotations/{{train2017,val2017}}: extract "
                          "stuffthingmaps_trainval2017.zip there", key="SOURCE")
    return counts


def convert_drive(source: Path, out: Path) -> dict[str, int]:
    """DRIVE's training.zip and test.zip: ``images/*.tif`` -> ``images/<split>/<n>.png``,
    ``1st_manual/*.gif`` (and ``2nd_manual``) -> ``annotations/<split>/<n>_manual1.png`` (0/1),
    ``mask/*.gif`` -> ``masks/<split>/<n>_mask.png`` (the field of view, 0/1); training ->
    training, test -> validation."""
    counts: dict[str, int] = {}
    for archive, split in (("training", "training"), ("test", "validation")):
        path = find(source, f"{archive}.zip", archive, f"DRIVE/{archive}", required=archive == "training")
        if path is None:
            continue
        for member in _progress(matching(path, "*.tif", "*.gif"), f"drive {split}"):
            number = re.match(r"(\d+)_", member.base)
            if number is None:
                continue
            n = number.group(1)
            folder = member.name.lower().rsplit("/", 2)[-2] if "/" in member.name else ""
            if folder == "images":
                save_image(member.image(), out / "images" / split / f"{n}.png")
                counts[f"{split} images"] = counts.get(f"{split} images", 0) + 1
            elif folder in ("1st_manual", "2nd_manual"):
                suffix = "_manual1" if folder == "1st_manual" else "_manual2"
                save_label(binary_label(member.image()), out / "annotations" / split / f"{n}{suffix}.png")
                counts[f"{split} labels"] = counts.get(f"{split} labels", 0) + (folder == "1st_manual")
            elif folder == "mask":
                save_label(binary_label(member.image()), out / "masks" / split / f"{n}_mask.png")
    if counts.get("validation images") and not counts.get("validation labels"):
        logger.warning("DRIVE's test.zip has no 1st_manual labels: the validation split has images only")
    return counts


def convert_stare(source: Path, out: Path) -> dict[str, int]:
    """STARE's stare-images.tar, labels-ah.tar and labels-vk.tar (``.ppm.gz``): the first 10
    images by name -> training, the last 10 -> validation; labels ``<name>.ah.png`` /
    ``<name>.vk.png`` (0/1)."""
    images = matching(find(source, "stare-images.tar", "stare-images"), "*.ppm")
    if len(images) != 20:
        raise DataError(f"STARE: expected the 20 images of stare-images.tar, found {len(images)}")
    names = sorted(m.base[:-4] for m in images)
    split_of = {name: "training" if i < 10 else "validation" for i, name in enumerate(names)}
    for member in _progress(images, "stare images"):
        stem = member.base[:-4]
        save_image(member.image(), out / "images" / split_of[stem] / f"{stem}.png")
    counts = {"images": len(images)}
    for archive, tag in (("labels-ah", "ah"), ("labels-vk", "vk")):
        path = find(source, f"{archive}.tar", archive, required=tag == "ah")
        if path is None:
            continue
        labels = matching(path, f"*.{tag}.ppm")
        for member in _progress(labels, f"stare {tag}"):
            stem = member.base[: -len(f".{tag}.ppm")]
            if stem not in split_of:
                raise DataError(f"STARE: label {member.name} has no image {stem}.ppm")
            save_label(binary_label(member.image()), out / "annotations" / split_of[stem] / f"{stem}.{tag}.png")
        counts[f"{tag} labels"] = len(labels)
    return counts


def convert_chase_db1(source: Path, out: Path) -> dict[str, int]:
    """CHASEDB1.zip: 28 images ``Image_XXL.jpg`` with ``_1stHO.png`` and ``_2ndHO.png`` labels;
    the first 20 images by name -> training, the last 8 -> validation (labels 0/1)."""
    files = matching(find(source, "CHASEDB1.zip", "CHASEDB1", "CHASE_DB1"), "*.jpg", "*.png")
    images = sorted((m for m in files if m.base.lower().endswith(".jpg")), key=lambda m: m.base)
    if len(images) != 28:
        raise DataError(f"CHASE_DB1: expected 28 images (*.jpg) in CHASEDB1.zip, found {len(images)}")
    split_of = {m.base[:-4]: "training" if i < 20 else "validation" for i, m in enumerate(images)}
    for member in _progress(images, "chase images"):
        save_image(member.image(), out / "images" / split_of[member.base[:-4]] / f"{member.base[:-4]}.png")
    labels = 0
    for member in files:
        match = re.match(r"(.+)_(1st|2nd)HO\.png$", member.base)
        if match:
            save_label(binary_label(member.image()), out / "annotations" / split_of[match.group(1)] / member.base)
            labels += 1
    return {"images": len(images), "labels": labels}


def convert_hrf(source: Path, out: Path) -> dict[str, int]:
    """HRF's healthy, glaucoma and diabetic_retinopathy zips (``.jpg``) and their
    ``*_manualsegm.zip`` (``.tif``): per group the first 5 images by name -> training, the other
    10 -> validation; ``images/<split>/<name>.png``, ``annotations/<split>/<name>.png`` (0/1)."""
    counts: dict[str, int] = {}
    for group in ("healthy", "glaucoma", "diabetic_retinopathy"):
        images = matching(find(source, f"{group}.zip", group), "*.jpg", "*.jpeg")
        labels = matching(find(source, f"{group}_manualsegm.zip", f"{group}_manualsegm"), "*.tif", "*.tiff")
        if len(images) != 15 or len(labels) != 15:
            raise DataError(f"HRF {group}: expected 15 images and 15 labels, found {len(images)} and {len(labels)}")
        images.sort(key=lambda m: m.base.lower())
        split_of = {m.base.rsplit(".", 1)[0]: "training" if i < 5 else "validation" for i, m in enumerate(images)}
        for member in images:
            stem = member.base.rsplit(".", 1)[0]
            save_image(member.image(), out / "images" / split_of[stem] / f"{stem}.png")
        for member in labels:
            stem = member.base.rsplit(".", 1)[0]
            if stem not in split_of:
                raise DataError(f"HRF {group}: label {member.name} has no image {stem}.jpg")
            save_label(binary_label(member.image()), out / "annotations" / split_of[stem] / f"{stem}.png")
        counts[group] = len(images)
    return counts


def convert_loveda(source: Path, out: Path) -> dict[str, int]:
    """LoveDA's Train.zip, Val.zip, Test.zip: ``<Split>/{Rural,Urban}/images_png`` ->
    ``img_dir/<split>``, ``masks_png`` -> ``ann_dir/<split>`` (values kept: 0 no-data, 1..7)."""
    counts: dict[str, int] = {}
    for archive, split in (("Train", "train"), ("Val", "val"), ("Test", "test")):
        path = find(source, f"{archive}.zip", archive, required=split != "test")
        if path is None:
            continue
        for member in _progress(matching(path, "*.png"), f"loveda {split}"):
            kind = member.name.rsplit("/", 2)[-2] if member.name.count("/") >= 1 else ""
            if kind == "images_png":
                target = out / "img_dir" / split / member.base
            elif kind == "masks_png":
                target = out / "ann_dir" / split / member.base
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(member.read())
            counts[f"{split} {kind}"] = counts.get(f"{split} {kind}", 0) + 1
    return counts


def potsdam_label(rgb: np.ndarray) -> np.ndarray:
    """Colour labels -> 1..6 (0 where a colour is none of the six)."""
    label = np.zeros(rgb.shape[:2], dtype=np.uint8)
    for colour, value in POTSDAM_COLOURS.items():
        label[(rgb[..., :3] == np.array(colour, dtype=rgb.dtype)).all(-1)] = value
    return label


def window_starts(length: int, clip: int, stride: int) -> list[int]:
    """Window starts covering ``length`` with windows of ``clip`` at ``stride``, the last one
    moved back to end at the edge."""
    if length <= clip:
        return [0]
    starts = list(range(0, length - clip + 1, stride))
    if starts[-1] + clip < length:
        starts.append(length - clip)
    return starts


def convert_potsdam(source: Path, out: Path, clip: int = 512, stride: int = 256) -> dict[str, int]:
    """ISPRS Potsdam's 2_Ortho_RGB.zip and 5_Labels_all_noBoundary.zip: each 6000x6000 tile
    (``top_potsdam_<i>_<j>_...tif``) cut into ``clip`` x ``clip`` patches at ``stride`` (the last
    row and column moved back inside), named ``<i>_<j>_<x0>_<y0>_<x1>_<y1>.png``; the 24
    training tiles -> train, the 14 others -> val; labels from their colours."""
    # the 6000x6000 tiles (36 megapixels) are under Pillow's decompression-bomb limit: it stays on
    counts = {"train": 0, "val": 0}
    for archive, kind in (("2_Ortho_RGB", "img"), ("5_Labels_all_noBoundary", "ann")):
        tiles = matching(find(source, f"{archive}.zip", archive), "*.tif")
        for member in _progress(tiles, f"potsdam {kind}"):
            match = re.match(r"top_potsdam_(\d+)_(\d+)_", member.base)
            if match is None:
                continue
            tile = f"{match.group(1)}_{match.group(2)}"
            split = "train" if tile in POTSDAM_TRAIN_TILES else "val" if tile in POTSDAM_VAL_TILES else None
            if split is None:
                continue
            array = np.array(member.image().convert("RGB"))
            if kind == "ann":
                array = potsdam_label(array)
            h, w = array.shape[:2]
            for y0 in window_starts(h, clip, stride):
                for x0 in window_starts(w, clip, stride):
                    patch = array[y0:y0 + clip, x0:x0 + clip]
                    target = out / f"{kind}_dir" / split / f"{tile}_{x0}_{y0}_{x0 + patch.shape[1]}_{y0 + patch.shape[0]}.png"
                    if kind == "img":
                        save_image(Image.fromarray(patch), target)
                        counts[split] += 1
                    else:
                        save_label(patch, target)
    return counts


def convert_voc_aug(source: Path, aug: Path) -> dict[str, int]:
    """SBD (``aug``: the extracted benchmark.tgz, ``dataset/cls/*.mat``, ``dataset/{train,val}.txt``)
    into VOC 2012 (``source``): ``SegmentationClassAug/<name>.png`` from each ``.mat`` (its
    ``GTcls.Segmentation``), VOC's own ``SegmentationClass`` labels copied beside them, and
    ``ImageSets/Segmentation/trainaug.txt`` (VOC train + SBD train and val, less VOC val) and
    ``aug.txt`` (SBD train and val, less VOC train and val)."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise ConfigError("reading SBD's .mat labels needs scipy: pip install scipy", key="voc_aug") from exc
    dataset = aug / "dataset" if (aug / "dataset").is_dir() else aug
    cls = dataset / "cls"
    if not cls.is_dir():
        raise ConfigError(f"no {cls}: extract benchmark.tgz (SBD) and give its folder with --aug", key="--aug")
    lists = source / "ImageSets" / "Segmentation"

    def names(path: Path) -> list[str]:
        if not path.is_file():
            raise ConfigError(f"missing {path}", key="SOURCE")
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]

    voc_train, voc_val = names(lists / "train.txt"), names(lists / "val.txt")
    sbd = names(dataset / "train.txt") + names(dataset / "val.txt")
    target = source / "SegmentationClassAug"
    target.mkdir(parents=True, exist_ok=True)
    for mat in _progress(sorted(cls.glob("*.mat")), "SBD labels"):
        segmentation = loadmat(str(mat), squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
        save_label(np.asarray(segmentation), target / f"{mat.stem}.png")
    for name in voc_train + voc_val:
        shutil.copyfile(source / "SegmentationClass" / f"{name}.png", target / f"{name}.png")
    val = set(voc_val)
    trainaug = sorted(set(voc_train) | {n for n in sbd if n not in val})
    aug_only = sorted(set(sbd) - set(voc_train) - val)
    (lists / "trainaug.txt").write_text("\n".join(trainaug) + "\n")
    (lists / "aug.txt").write_text("\n".join(aug_only) + "\n")
    return {"trainaug": len(trainaug), "aug": len(aug_only)}


CONVERTERS: dict[str, tuple[Callable[..., dict[str, int]], str]] = {
    "cityscapes": (convert_cityscapes, "*_gtFine_labelIds.png -> *_gtFine_labelTrainIds.png (19 train ids, 255 ignored)"),
    "coco_stuff164k": (convert_coco_stuff, "stuffthingmaps -> *_labelTrainIds.png (171 classes)"),
    "drive": (convert_drive, "training.zip, test.zip (.tif, .gif) -> images/, annotations/ (0/1), masks/ (field of view)"),
    "stare": (convert_stare, "stare-images.tar, labels-ah.tar, labels-vk.tar (.ppm.gz) -> images/, annotations/"),
    "chase_db1": (convert_chase_db1, "CHASEDB1.zip -> images/, annotations/ (20 training, 8 validation)"),
    "hrf": (convert_hrf, "the six HRF zips (.jpg, .tif) -> images/, annotations/ (15 training, 30 validation)"),
    "loveda": (convert_loveda, "Train.zip, Val.zip, Test.zip -> img_dir/, ann_dir/"),
    "potsdam": (convert_potsdam, "2_Ortho_RGB.zip, 5_Labels_all_noBoundary.zip -> 512x512 patches in img_dir/, ann_dir/"),
    "voc_aug": (convert_voc_aug, "SBD's benchmark.tgz (extracted) -> SegmentationClassAug/, trainaug.txt"),
}
