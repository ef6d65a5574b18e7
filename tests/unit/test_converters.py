"""``seg-accel convert-dataset``: each converter on a few generated files in the dataset's
official format, and the converted folder read by the dataset's config."""
from __future__ import annotations

import gzip
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg_accel.cli.convert import convert_cli
from seg_accel.config import load_config
from seg_accel.data import build_dataset
from tests.conftest import REPO

RNG = np.random.default_rng(0)


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def rgb(h=12, w=10) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def vessels(h=12, w=10) -> np.ndarray:
    return (RNG.random((h, w)) < 0.3).astype(np.uint8) * 255


def write_zip(path: Path, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def write_tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def config_dataset(base: str, split: str, root: Path, **extra):
    """``data.<split>`` of a dataset base config, reading ``root``."""
    cfg = load_config(str(REPO / "configs" / "_base_" / "datasets" / base)).dict["data"][split]
    cfg = {**cfg, "data_root": str(root), **extra}
    dataset = build_dataset(cfg, f"data.{split}")
    dataset.test_mode = True
    return dataset


def labels_of(dataset) -> set[int]:
    values: set[int] = set()
    for i in range(len(dataset)):
        values |= set(np.unique(dataset[i]["labels"].numpy()).tolist())
    return values


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    folder = tmp_path / "gtFine" / "train" / "aachen"
    folder.mkdir(parents=True)
    ids = np.array([[0, 7, 8, 26], [33, 24, 1, 11]], dtype=np.uint8)
    Image.fromarray(ids).save(folder / "aachen_000000_000019_gtFine_labelIds.png")
    assert convert_cli(["cityscapes", str(tmp_path)]) == 0
    out = np.array(Image.open(folder / "aachen_000000_000019_gtFine_labelTrainIds.png"))
    np.testing.assert_array_equal(out, [[255, 0, 1, 13], [18, 11, 255, 2]])


def test_coco_stuff_ids_to_171_train_ids(tmp_path):
    folder = tmp_path / "annotations" / "val2017"
    folder.mkdir(parents=True)
    Image.fromarray(np.array([[0, 10, 11, 12], [90, 91, 181, 255]], dtype=np.uint8)).save(folder / "000000000139.png")
    assert convert_cli(["coco_stuff164k", str(tmp_path)]) == 0
    out = np.array(Image.open(folder / "000000000139_labelTrainIds.png"))
    # 11 unused ids dropped: 12 -> 11, 91 -> 91 - 11 = 80, 181 -> 170; 11 and 90 (unused) -> 255
    np.testing.assert_array_equal(out, [[0, 10, 255, 11], [255, 80, 170, 255]])


def test_drive_from_its_zips_with_field_of_view_masks(tmp_path):
    fov = np.zeros((12, 10), np.uint8)
    fov[2:10, 2:8] = 255
    label = vessels()
    write_zip(tmp_path / "training.zip", {
        "training/images/21_training.tif": encoded(rgb(), "TIFF"),
        "training/1st_manual/21_manual1.gif": encoded(label, "GIF"),
        "training/mask/21_training_mask.gif": encoded(fov, "GIF"),
    })
    write_zip(tmp_path / "test.zip", {
        "test/images/01_test.tif": encoded(rgb(), "TIFF"),
        "test/1st_manual/01_manual1.gif": encoded(vessels(), "GIF"),
        "test/2nd_manual/01_manual2.gif": encoded(vessels(), "GIF"),
        "test/mask/01_test_mask.gif": encoded(fov, "GIF"),
    })
    out = tmp_path / "DRIVE"
    assert convert_cli(["drive", str(tmp_path), "--out", str(out)]) == 0
    assert (out / "images/training/21.png").is_file() and (out / "images/validation/01.png").is_file()
    np.testing.assert_array_equal(np.array(Image.open(out / "annotations/training/21_manual1.png")), label // 255)
    assert (out / "annotations/validation/01_manual2.png").is_file()
    np.testing.assert_array_equal(np.array(Image.open(out / "masks/training/21_mask.png")), fov // 255)
    # the configs read it: drive.yaml everything, drive_fov.yaml only inside the field of view
    plain = config_dataset("drive.yaml", "train", out)
    assert len(plain) == 1 and labels_of(plain) == {0, 1}
    masked = config_dataset("drive_fov.yaml", "val", out)
    label = masked[0]["labels"].numpy()
    assert (label[fov == 0] == 255).all() and set(np.unique(label[fov > 0])) <= {0, 1}


def test_stare_from_its_tars_of_gzipped_ppm(tmp_path):
    def ppm_gz(array):
        return gzip.compress(encoded(array, "PPM"))

    labels = {i: vessels() for i in range(1, 21)}
    write_tar(tmp_path / "stare-images.tar", {f"im{i:04d}.ppm.gz": ppm_gz(rgb()) for i in range(1, 21)})
    write_tar(tmp_path / "labels-ah.tar", {f"im{i:04d}.ah.ppm.gz": ppm_gz(np.stack([labels[i]] * 3, -1))
                                           for i in range(1, 21)})
    write_tar(tmp_path / "labels-vk.tar", {f"im{i:04d}.vk.ppm.gz": ppm_gz(np.stack([vessels()] * 3, -1))
                                           for i in range(1, 21)})
    out = tmp_path / "STARE"
    assert convert_cli(["stare", str(tmp_path), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "images/training").iterdir()) == [f"im{i:04d}.png" for i in range(1, 11)]
    assert len(list((out / "images/validation").iterdir())) == 10
    np.testing.assert_array_equal(np.array(Image.open(out / "annotations/validation/im0013.ah.png")), labels[13] // 255)
    dataset = config_dataset("stare.yaml", "val", out)
    assert len(dataset) == 10 and labels_of(dataset) == {0, 1}


def test_chase_db1_from_its_zip(tmp_path):
    files = {}
    names = [f"Image_{i:02d}{side}" for i in range(1, 15) for side in "LR"]
    for name in names:
        files[f"{name}.jpg"] = encoded(rgb(), "JPEG")
        files[f"{name}_1stHO.png"] = encoded(vessels(), "PNG")
        files[f"{name}_2ndHO.png"] = encoded(vessels(), "PNG")
    write_zip(tmp_path / "CHASEDB1.zip", files)
    out = tmp_path / "CHASE_DB1"
    assert convert_cli(["chase_db1", str(tmp_path), "--out", str(out)]) == 0
    training = sorted(p.stem for p in (out / "images/training").iterdir())
    assert training == sorted(names)[:20] and len(list((out / "images/validation").iterdir())) == 8
    dataset = config_dataset("chase_db1.yaml", "train", out)
    assert len(dataset) == 20 and labels_of(dataset) == {0, 1}


def test_hrf_from_its_six_zips(tmp_path):
    for group, tag in (("healthy", "h"), ("glaucoma", "g"), ("diabetic_retinopathy", "dr")):
        write_zip(tmp_path / f"{group}.zip", {f"{i:02d}_{tag}.{'JPG' if tag == 'dr' else 'jpg'}":
                                             encoded(rgb(), "JPEG") for i in range(1, 16)})
        write_zip(tmp_path / f"{group}_manualsegm.zip", {f"{i:02d}_{tag}.tif": encoded(vessels(), "TIFF")
                                                         for i in range(1, 16)})
    out = tmp_path / "HRF"
    assert convert_cli(["hrf", str(tmp_path), "--out", str(out)]) == 0
    assert len(list((out / "images/training").iterdir())) == 15
    assert len(list((out / "annotations/validation").iterdir())) == 30
    assert (out / "images/training/05_dr.png").is_file() and (out / "images/validation/06_dr.png").is_file()
    assert labels_of(config_dataset("hrf.yaml", "train", out)) == {0, 1}


def test_loveda_from_its_zips(tmp_path):
    for archive, split in (("Train", "Train"), ("Val", "Val")):
        files = {}
        for area, start in (("Rural", 0), ("Urban", 1366)):
            for i in range(2):
                files[f"{split}/{area}/images_png/{start + i}.png"] = encoded(rgb(16, 16), "PNG")
                files[f"{split}/{area}/masks_png/{start + i}.png"] = encoded(
                    RNG.integers(0, 8, (16, 16), dtype=np.uint8), "PNG")
        write_zip(tmp_path / f"{archive}.zip", files)
    out = tmp_path / "loveDA"
    assert convert_cli(["loveda", str(tmp_path), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "img_dir/train").iterdir()) == ["0.png", "1.png", "1366.png", "1367.png"]
    dataset = config_dataset("loveda.yaml", "val", out)
    assert len(dataset) == 4 and labels_of(dataset) <= set(range(7)) | {255}  # 0 (no-data) ignored, 1..7 -> 0..6


def test_potsdam_tiles_cut_and_colours_to_classes(tmp_path):
    colours = np.array([[255, 255, 255], [0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]],
                       dtype=np.uint8)
    label_ids = RNG.integers(0, 6, (40, 40))
    label_rgb = colours[label_ids]
    write_zip(tmp_path / "2_Ortho_RGB.zip", {"2_Ortho_RGB/top_potsdam_2_10_RGB.tif": encoded(rgb(40, 40), "TIFF"),
                                             "2_Ortho_RGB/top_potsdam_2_13_RGB.tif": encoded(rgb(40, 40), "TIFF")})
    write_zip(tmp_path / "5_Labels_all_noBoundary.zip", {
        "top_potsdam_2_10_label_noBoundary.tif": encoded(label_rgb, "TIFF"),
        "top_potsdam_2_13_label_noBoundary.tif": encoded(label_rgb, "TIFF")})
    out = tmp_path / "potsdam"
    assert convert_cli(["potsdam", str(tmp_path), "--out", str(out), "--clip", "16", "--stride", "12"]) == 0
    # starts 0, 12, 24 (the last moved back to 24 = 40 - 16): 3 x 3 patches per tile
    train = sorted(p.name for p in (out / "ann_dir/train").iterdir())
    assert len(train) == 9 and "2_10_24_12_40_28.png" in train and len(list((out / "img_dir/val").iterdir())) == 9
    patch = np.array(Image.open(out / "ann_dir/train/2_10_24_12_40_28.png"))
    np.testing.assert_array_equal(patch, label_ids[12:28, 24:40] + 1)  # colours -> 1..6
    dataset = config_dataset("potsdam.yaml", "train", out)
    assert len(dataset) == 9 and labels_of(dataset) <= set(range(6)) | {255}


def test_voc_aug_from_sbd_mat_files(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="scipy is not installed")
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "JPEGImages").mkdir()
    voc_train, voc_val, sbd_train, sbd_val = ["a", "b"], ["c"], ["b", "d", "e"], ["c", "f"]
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(voc_train) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(voc_val) + "\n")
    for name in voc_train + voc_val:
        Image.fromarray(RNG.integers(0, 21, (8, 8), dtype=np.uint8)).save(voc / "SegmentationClass" / f"{name}.png")
    for name in "abcdef":
        Image.fromarray(rgb(8, 8)).save(voc / "JPEGImages" / f"{name}.jpg")
    sbd = tmp_path / "VOCaug" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("\n".join(sbd_train) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_val) + "\n")
    mats = {}
    for name in sbd_train + sbd_val:
        mats[name] = RNG.integers(0, 21, (8, 8)).astype(np.uint8)
        scipy_io.savemat(str(sbd / "cls" / f"{name}.mat"), {"GTcls": {"Segmentation": mats[name],
                                                                      "CategoriesPresent": np.arange(3)}})
    assert convert_cli(["voc_aug", str(voc), "--aug", str(tmp_path / "VOCaug")]) == 0
    lists = voc / "ImageSets/Segmentation"
    assert lists.joinpath("trainaug.txt").read_text().split() == ["a", "b", "d", "e", "f"]  # c is VOC val
    assert lists.joinpath("aug.txt").read_text().split() == ["d", "e", "f"]
    np.testing.assert_array_equal(np.array(Image.open(voc / "SegmentationClassAug/d.png")), mats["d"])
    # VOC's own label wins for a name in both (b): it is copied after the SBD ones
    np.testing.assert_array_equal(np.array(Image.open(voc / "SegmentationClassAug/b.png")),
                                  np.array(Image.open(voc / "SegmentationClass/b.png")))
    dataset = config_dataset("pascal_voc12_aug.yaml", "train", voc)
    assert len(dataset) == 5


def test_converter_errors_are_one_line(tmp_path, capsys):
    assert convert_cli(["drive", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "training.zip" in capsys.readouterr().err
    assert convert_cli(["hrf", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err
    assert convert_cli(["stare", str(tmp_path / "nowhere"), "--out", "x"]) == 2


def test_a_zip_bomb_member_is_refused_fast_and_small(tmp_path):
    """Issue 23, finding 4: a 9 MB zip holding a 2 GiB member is refused by the member's
    declared size, before it is read (it took 3.4 GB and 35 s), in one line naming it."""
    import json
    import subprocess
    import sys
    import textwrap
    import zipfile

    from tests.conftest import script_env

    source = tmp_path / "drive"
    source.mkdir()
    with zipfile.ZipFile(source / "training.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("training/images/21_training.tif", "w", force_zip64=True) as member:
            zeros = bytes(2**20)
            for _ in range(2048):
                member.write(zeros)
    assert (source / "training.zip").stat().st_size < 10 * 2**20
    wrapper = textwrap.dedent(f"""
        import json, resource, subprocess, sys, time
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "seg_accel", "convert-dataset", "drive", {str(source)!r}, "--out",
                               {str(tmp_path / "out")!r}], capture_output=True, text=True)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(json.dumps({{"rc": proc.returncode, "stderr": proc.stderr, "cpu": usage.ru_utime + usage.ru_stime,
                          "wall": time.monotonic() - started, "maxrss_kib": usage.ru_maxrss}}))
    """)
    out = subprocess.run([sys.executable, "-c", wrapper], cwd=tmp_path, env=script_env(), capture_output=True,
                         text=True, timeout=120)
    measured = json.loads(out.stdout)
    errors = [line for line in measured["stderr"].splitlines() if line.startswith("error:")]
    assert measured["rc"] == 1 and errors == [
        "error: training/images/21_training.tif: 2,048 MiB once unpacked, over the 256 MiB of one file of a dataset "
        "(MAX_MEMBER_BYTES; a damaged or crafted archive?)"], measured["stderr"]
    # the command's own footprint (torch's import alone is 220 MiB for a CPU build, 510 MiB for a
    # CUDA one) plus less than 128 MiB: the 2 GiB member was never read (it took 3.4 GB)
    baseline = subprocess.run([sys.executable, "-c", "import json, resource, seg_accel.cli, seg_accel.data.converters, "
                               "torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              env=script_env(), capture_output=True, text=True, check=True)
    assert measured["cpu"] < 5 and measured["maxrss_kib"] < int(baseline.stdout) + 128 * 1024, (measured, baseline.stdout)
    assert not (tmp_path / "out" / "images").exists()


def test_a_member_that_understates_its_size_is_cut_off_at_the_limit():
    import io

    from seg_accel.data.converters import read_capped
    from seg_accel.errors import DataError

    class Endless(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buffer):
            buffer[:] = bytes(len(buffer))
            return len(buffer)

    with pytest.raises(DataError, match="more than 8 MiB once unpacked"):
        read_capped(io.BufferedReader(Endless()), "big.tif", limit=8 * 2**20)
    assert read_capped(io.BytesIO(b"x" * 100), "small.tif", limit=8 * 2**20) == b"x" * 100


def test_a_member_with_a_bad_crc_is_one_line_and_leaves_no_partial_output(tmp_path, capsys):
    """Issue 23, finding 7: a bad-CRC zip gave a traceback and left the members converted before it."""
    source = tmp_path / "src"
    source.mkdir()
    label = encoded(vessels(), "GIF")
    with zipfile.ZipFile(source / "training.zip", "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("training/images/21_training.tif", encoded(rgb(), "TIFF"))
        archive.writestr("training/mask/21_training_mask.gif", label)  # read after the image (by name)
    data = bytearray((source / "training.zip").read_bytes())
    at = data.rfind(label[-8:])  # inside the last member's stored bytes: its CRC no longer matches
    data[at] ^= 0xFF
    (source / "training.zip").write_bytes(bytes(data))
    out = tmp_path / "DRIVE"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "earlier.txt").write_text("already here")
    assert convert_cli(["drive", str(source), "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    assert len(err) == 1 and "training/mask/21_training_mask.gif: the archive is damaged (BadZipFile" in err[0], err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == ["keep/earlier.txt"]
    assert not list(tmp_path.glob(".*"))  # no staging folder left


def test_converting_potsdam_leaves_the_decompression_bomb_limit_on(tmp_path):
    """The Potsdam converter set PIL's MAX_IMAGE_PIXELS to None for the whole process: every image
    read after it in that process (predict, training) lost its decompression-bomb protection."""
    before = Image.MAX_IMAGE_PIXELS
    test_potsdam_tiles_cut_and_colours_to_classes(tmp_path)
    assert Image.MAX_IMAGE_PIXELS == before and before is not None
