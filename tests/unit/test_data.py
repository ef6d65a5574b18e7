"""Datasets, transforms and samplers."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from seg_accel.data import InfiniteShardedSampler, ShardSampler, build_dataset, collate
from seg_accel.data.synthetic import CLASSES, SyntheticShapes
from seg_accel.data.transforms import (
    Normalize,
    Pad,
    RandomCrop,
    RandomFlip,
    Resize,
    rescale_size,
)
from seg_accel.errors import ConfigError, DataError

RNG = np.random.default_rng


# ----------------------------------------------------------------------------- SyntheticShapes
def test_synthetic_is_deterministic_per_seed_and_index():
    a, b = SyntheticShapes(num_samples=10, seed=3), SyntheticShapes(num_samples=10, seed=3)
    for i in range(10):
        (ia, la), (ib, lb) = a.load(i), b.load(i)
        assert np.array_equal(ia, ib) and np.array_equal(la, lb)
    other = SyntheticShapes(num_samples=10, seed=4)
    assert not np.array_equal(a.load(0)[0], other.load(0)[0])
    assert not np.array_equal(a.load(0)[0], a.load(1)[0])


def test_synthetic_labels_and_classes():
    ds = SyntheticShapes(num_samples=40, img_size=[48, 40])
    counts = np.zeros(len(CLASSES), dtype=np.int64)
    for i in range(len(ds)):
        img, label = ds.load(i)
        assert img.shape == (48, 40, 3) and img.dtype == np.uint8 and label.shape == (48, 40)
        counts += np.bincount(label.ravel(), minlength=len(CLASSES))
    assert counts.min() > 0 and len(counts) == len(CLASSES)  # every class occurs, no other value
    assert ds.classes == ["background", "circle", "square", "triangle"]


def test_sample_augmentation_depends_on_the_sample_seed_only():
    ds = SyntheticShapes(num_samples=4, pipeline=[{"type": "RandomFlip", "prob": 0.5}])
    first = ds[(2, 123)]
    assert torch.equal(first["pixel_values"], ds[(2, 123)]["pixel_values"])
    flipped = {bool(torch.equal(ds[(2, s)]["pixel_values"], ds[(2, 0)]["pixel_values"])) for s in range(16)}
    assert flipped == {True, False}


def test_test_mode_returns_original_labels():
    ds = SyntheticShapes(num_samples=2, img_size=32, pipeline=[{"type": "Resize", "scale": [64, 64], "keep_ratio": False}])
    assert ds[0]["labels"].shape == (64, 64)
    ds.test_mode = True
    item = ds[0]
    assert item["pixel_values"].shape == (3, 64, 64) and item["labels"].shape == (32, 32)


# ----------------------------------------------------------------------------- CustomDataset
def _write_pair(root, name, size=(12, 10), label_size=None, value=1):
    (root / "img").mkdir(exist_ok=True)
    (root / "ann").mkdir(exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 100, np.uint8)).save(root / "img" / f"{name}.png")
    lw, lh = label_size or size
    label = np.full((lh, lw), value, np.uint8)
    label[0, 0] = 0
    Image.fromarray(label).save(root / "ann" / f"{name}.png")


def test_custom_dataset_pairs_split_and_label_map(tmp_path):
    for name in ("a", "b", "c"):
        _write_pair(tmp_path, name, value=11)
    (tmp_path / "train.txt").write_text("/SegNet/CamVid/img/c.png /SegNet/CamVid/ann/c.png\nb\n")
    ds = build_dataset({"type": "CustomDataset", "data_root": str(tmp_path), "img_dir": "img", "ann_dir": "ann",
                        "img_suffix": ".png", "split": "train.txt", "classes": ["x", "y"],
                        "label_map": {11: 255}}, "data.train")
    assert ds.names == ["c", "b"] and len(ds) == 2
    img, label = ds.load(0)
    assert img.shape == (10, 12, 3) and set(np.unique(label)) == {0, 255}
    ds_all = build_dataset({"type": "CustomDataset", "data_root": str(tmp_path), "img_dir": "img", "ann_dir": "ann",
                            "img_suffix": ".png", "classes": [f"c{i}" for i in range(11)], "reduce_zero_label": True},
                           "data.train")
    assert ds_all.names == ["a", "b", "c"]
    assert set(np.unique(ds_all.load(0)[1])) == {255, 10}  # 0 -> 255, 11 -> 10


def test_custom_dataset_classes_from_id2label_json(tmp_path):
    _write_pair(tmp_path, "a")
    (tmp_path / "id2label.json").write_text(json.dumps({"1": "cat", "0": "bg"}))
    ds = build_dataset({"type": "CustomDataset", "data_root": str(tmp_path), "img_dir": "img", "ann_dir": "ann",
                        "img_suffix": ".png"}, "data.train")
    assert ds.classes == ["bg", "cat"]


def test_custom_dataset_errors_name_the_file(tmp_path):
    _write_pair(tmp_path, "good")
    _write_pair(tmp_path, "bad", label_size=(5, 5))
    ds = build_dataset({"type": "CustomDataset", "data_root": str(tmp_path), "img_dir": "img", "ann_dir": "ann",
                        "img_suffix": ".png", "classes": ["x", "y"]}, "data.train")
    with pytest.raises(DataError, match="bad.png.*label is 5x5 \\(w x h\\) but the image is 12x10"):
        ds.load(ds.names.index("bad"))
    (tmp_path / "img" / "lonely.png").write_bytes(b"not a png")
    ds = build_dataset({"type": "CustomDataset", "data_root": str(tmp_path), "img_dir": "img", "ann_dir": "ann",
                        "img_suffix": ".png", "classes": ["x", "y"]}, "data.train")
    with pytest.raises(DataError, match="lonely.png"):
        ds.load(ds.names.index("lonely"))
    with pytest.raises(ConfigError) as info:
        build_dataset({"type": "CustomDataset", "data_root": str(tmp_path), "img_dir": "nope", "ann_dir": "ann",
                       "classes": ["x"]}, "data.train")
    assert info.value.key == "data.train.img_dir"


def test_camvid_folder_dataset(camvid):
    ds = build_dataset({"type": "CustomDataset", "data_root": str(camvid), "img_dir": "val", "ann_dir": "valannot",
                        "img_suffix": ".png", "split": "val.txt", "label_map": {11: 255},
                        "classes": ["Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence",
                                    "Car", "Pedestrian", "Bicyclist"]}, "data.val")
    assert len(ds) == 101
    img, label = ds.load(0)
    assert img.shape == (360, 480, 3) and label.shape == (360, 480)
    assert set(np.unique(label)) <= set(range(11)) | {255}


# ----------------------------------------------------------------------------- transforms
def _sample(h=10, w=14):
    img = torch.arange(3 * h * w, dtype=torch.float32).view(3, h, w)
    label = (torch.arange(h * w).view(h, w) % 7).long()
    return {"img": img, "gt_seg_map": label}


def test_resize_keep_ratio_follows_mmcv_rescale():
    assert rescale_size(480, 360, (2048, 512)) == (683, 512)
    assert rescale_size(1000, 100, (2048, 512)) == (2048, 205)
    out = Resize(scale=[28, 20], keep_ratio=True)(_sample(), RNG(0))
    assert out["img"].shape == (3, 20, 28) and out["gt_seg_map"].shape == (20, 28)
    assert set(out["gt_seg_map"].unique().tolist()) <= set(range(7))  # nearest: no new label values
    out = Resize(scale=[5, 9], keep_ratio=False)(_sample(), RNG(0))
    assert out["img"].shape == (3, 9, 5)


def test_random_crop_cat_max_ratio_and_alignment():
    label = torch.zeros(40, 40, dtype=torch.long)
    label[:, 30:] = 1  # class 0 dominates most crops
    img = torch.stack([label.float()] * 3)
    crop = RandomCrop(crop_size=[10, 10], cat_max_ratio=0.75)
    for seed in range(20):
        out = crop({"img": img.clone(), "gt_seg_map": label.clone()}, RNG(seed))
        counts = torch.bincount(out["gt_seg_map"].flatten(), minlength=2).float()
        assert torch.equal(out["img"][0].long(), out["gt_seg_map"])
        if seed < 5:
            assert out["img"].shape == (3, 10, 10)
    # with 10 retries the chance of never finding a mixed crop is tiny; most crops are mixed
    mixed = 0
    for seed in range(50):
        out = crop({"img": img.clone(), "gt_seg_map": label.clone()}, RNG(seed))
        counts = torch.bincount(out["gt_seg_map"].flatten(), minlength=2).float()
        mixed += int(counts.max() / counts.sum() < 0.75)
    assert mixed >= 45
    small = RandomCrop(crop_size=[64, 64])(_sample(), RNG(0))
    assert small["img"].shape == (3, 10, 14)  # a crop never grows the image


def test_flip_moves_image_and_label_together():
    s = _sample()
    out = RandomFlip(prob=1.0)(_sample(), RNG(0))
    assert torch.equal(out["img"], s["img"].flip(-1)) and torch.equal(out["gt_seg_map"], s["gt_seg_map"].flip(-1))
    out = RandomFlip(prob=0.0)(_sample(), RNG(0))
    assert torch.equal(out["img"], s["img"])


def test_normalize_and_bgr():
    s = _sample(2, 2)
    out = Normalize(mean=[1, 2, 3], std=[2, 2, 2])(_sample(2, 2), RNG(0))
    assert torch.allclose(out["img"][1], (s["img"][1] - 2) / 2)
    out = Normalize(mean=[0, 0, 0], std=[1, 1, 1], to_rgb=False)(_sample(2, 2), RNG(0))
    assert torch.equal(out["img"], s["img"].flip(0))
    assert torch.equal(out["gt_seg_map"], s["gt_seg_map"])


def test_pad_uses_seg_pad_val_on_labels():
    out = Pad(size=[12, 16])(_sample(), RNG(0))
    assert out["img"].shape == (3, 12, 16) and out["gt_seg_map"].shape == (12, 16)
    assert (out["gt_seg_map"][10:] == 255).all() and (out["gt_seg_map"][:, 14:] == 255).all()
    assert (out["img"][:, 10:] == 0).all()
    out = Pad(size_divisor=8)(_sample(), RNG(0))
    assert out["img"].shape == (3, 16, 16)


# ----------------------------------------------------------------------------- samplers
def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_infinite_sampler_shards_each_epoch_exactly_once():
    size, world = 10, 2
    streams = [_take(InfiniteShardedSampler(size, r, world, seed=5), 15) for r in range(world)]
    assert len(streams[0]) == len(streams[1])
    # global positions 0..19 are epochs 0 and 1: each epoch covers every index once
    merged = [None] * 30
    for r, stream in enumerate(streams):
        for k, (idx, _, epoch) in enumerate(stream):
            merged[r + k * world] = idx
            assert epoch == (r + k * world) // size
    assert sorted(merged[:10]) == list(range(10)) and sorted(merged[10:20]) == list(range(10))
    assert merged[:10] != merged[10:20]  # reshuffled per epoch
    seeds = [s for stream in streams for _, s, _ in stream]
    assert len(set(seeds)) == len(seeds)  # every position has its own augmentation seed


def test_infinite_sampler_resumes_from_a_position():
    full = _take(InfiniteShardedSampler(7, 1, 2, seed=0), 12)
    resumed = _take(InfiniteShardedSampler(7, 1, 2, seed=0, start=5), 7)
    assert resumed == full[5:]


def test_shard_sampler_has_no_padding():
    shards = [list(ShardSampler(9, r, 4)) for r in range(4)]
    assert sorted(i for s in shards for i in s) == list(range(9))
    assert [len(s) for s in shards] == [3, 2, 2, 2]


def test_collate_refuses_mixed_sizes_with_advice():
    a = {"pixel_values": torch.zeros(3, 4, 4), "labels": torch.zeros(4, 4, dtype=torch.long), "index": 0}
    b = {"pixel_values": torch.zeros(3, 5, 4), "labels": torch.zeros(5, 4, dtype=torch.long), "index": 1}
    assert collate([a, a])["pixel_values"].shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="samples_per_gpu: 1"):
        collate([a, b])


def test_custom_dataset_searches_sub_folders_like_cityscapes(tmp_path):
    for city, name in (("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")):
        (tmp_path / "leftImg8bit/train" / city).mkdir(parents=True)
        (tmp_path / "gtFine/train" / city).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / f"leftImg8bit/train/{city}/{name}_leftImg8bit.png")
        Image.fromarray(np.ones((4, 6), np.uint8)).save(tmp_path / f"gtFine/train/{city}/{name}_gtFine_labelTrainIds.png")
    ds = build_dataset({"type": "CustomDataset", "data_root": str(tmp_path), "img_dir": "leftImg8bit/train",
                        "ann_dir": "gtFine/train", "img_suffix": "_leftImg8bit.png",
                        "seg_map_suffix": "_gtFine_labelTrainIds.png", "classes": ["a", "b"]}, "data.train")
    assert ds.names == ["aachen/aachen_000000_000019", "bremen/bremen_000001_000019"]
    assert ds.load(1)[1].shape == (4, 6)


# ----------------------------------------------------------------------------- more transforms
def test_random_resize_ratio_range_and_two_scales():
    from seg_accel.data.transforms import RandomResize

    sizes = set()
    for seed in range(30):
        out = RandomResize(scale=[28, 20], ratio_range=[0.5, 2.0])(_sample(), RNG(seed))
        h, w = out["img"].shape[-2:]
        assert out["gt_seg_map"].shape == (h, w)
        assert set(out["gt_seg_map"].unique().tolist()) <= set(range(7))  # nearest: no new label values
        assert 0.5 * 20 - 1 <= h <= 2.0 * 20 + 1 and abs(w / h - 14 / 10) < 0.15  # aspect ratio kept
        sizes.add((h, w))
    assert len(sizes) > 5  # really random
    out = RandomResize(scale=[[40, 20], [60, 30]])(_sample(), RNG(0))
    h, w = out["img"].shape[-2:]
    assert 20 <= min(h, w) <= 30 and max(h, w) <= 60


def test_resize_antialias_shrinks_as_pillow_does():
    """``antialias: true`` (RandomResize and Resize) averages what a shrink covers, as Pillow's
    bilinear resize does; the default stays mmcv's cv2 bilinear (no antialiasing)."""
    from seg_accel.data.transforms import RandomResize

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)  # noise: aliasing shows
    pil = np.asarray(Image.fromarray(pixels).resize((44, 33), Image.BILINEAR), np.float32)
    img = torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32))
    sample = {"img": img, "gt_seg_map": torch.zeros(60, 80, dtype=torch.long)}
    smooth = Resize(scale=[44, 33], antialias=True)(dict(sample), RNG(0))["img"].permute(1, 2, 0).numpy()
    sharp = Resize(scale=[44, 33])(dict(sample), RNG(0))["img"].permute(1, 2, 0).numpy()
    assert np.abs(smooth - pil).mean() < 1.0  # Pillow rounds to uint8
    assert np.abs(sharp - pil).mean() > 10 * np.abs(smooth - pil).mean()
    assert sharp.std() > 1.3 * smooth.std()  # no averaging: the noise stays
    # growing is the same with or without it
    big = Resize(scale=[160, 120], antialias=True)(dict(sample), RNG(0))["img"]
    assert torch.allclose(big, Resize(scale=[160, 120])(dict(sample), RNG(0))["img"], atol=1e-3)
    out = RandomResize(scale=[80, 60], ratio_range=[0.5, 0.5], antialias=True)(dict(sample), RNG(0))
    assert torch.equal(out["img"], Resize(scale=[40, 30], antialias=True)(dict(sample), RNG(0))["img"])


def test_photometric_distortion_changes_only_the_image():
    from seg_accel.data.transforms import PhotoMetricDistortion

    changed = 0
    for seed in range(10):
        s = _sample(8, 8)
        s["img"] = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 255
        before_img, before_label = s["img"].clone(), s["gt_seg_map"].clone()
        out = PhotoMetricDistortion()(s, RNG(seed))
        assert torch.equal(out["gt_seg_map"], before_label)
        assert out["img"].shape == before_img.shape and out["img"].min() >= 0 and out["img"].max() <= 255
        changed += int(not torch.allclose(out["img"], before_img.floor()))
        again = PhotoMetricDistortion()({"img": before_img.clone(), "gt_seg_map": before_label}, RNG(seed))
        assert torch.equal(again["img"], out["img"])  # the sample's seed decides
    assert changed >= 8


def test_photometric_brightness_alone_by_hand():
    from seg_accel.data.transforms import PhotoMetricDistortion

    t = PhotoMetricDistortion(brightness_delta=10, contrast_range=[1.0, 1.0], saturation_range=[1.0, 1.0],
                              hue_delta=0)

    class Fixed:  # brightness on, delta 5.5; contrast chosen after; then every other step off
        def __init__(self):
            self.ints = iter([1, 0, 0, 0, 0])

        def integers(self, *args):
            return next(self.ints)

        def uniform(self, low, high):
            return 5.5

    img = torch.tensor([[[10.0, 250.0]], [[0.0, 100.0]], [[3.0, 4.0]]])
    out = t({"img": img.clone(), "gt_seg_map": torch.zeros(1, 2, dtype=torch.long)}, Fixed())
    assert out["img"].tolist() == [[[15.0, 255.0]], [[5.0, 105.0]], [[8.0, 9.0]]]  # +5.5, clipped, truncated


# ----------------------------------------------------------------------------- Hub-style sources
def test_hub_dataset_local_parquet_map_style_and_id2label(tmp_path):
    import json

    from tests.parquet_data import write_parquet_dataset

    write_parquet_dataset(tmp_path, [4, 3])
    (tmp_path / "id2label.json").write_text(json.dumps({"0": "bg", "1": "a", "2": "b", "3": "c"}))
    ds = build_dataset({"type": "HubDataset", "path": str(tmp_path)}, "data.train")
    assert len(ds) == 7 and ds.classes == ["bg", "a", "b", "c"]
    img, label = ds.load(5)
    assert img.shape == (16, 16, 3) and label.shape == (16, 16) and label.dtype == np.uint8
    with pytest.raises(ConfigError) as info:
        build_dataset({"type": "HubDataset", "path": str(tmp_path), "label_column": "mask"}, "data.train")
    assert info.value.key == "data.train.label_column" and "'image', 'label'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        build_dataset({"type": "HubDataset", "path": str(tmp_path), "split": "validation"}, "data.val")
    assert info.value.key == "data.val.split"


def test_hub_dataset_imagefolder_with_metadata(tmp_path):
    import json

    from tests.parquet_data import CLASSES, sample_arrays

    folder = tmp_path / "train"
    folder.mkdir()
    lines = []
    for i in range(3):
        img, label = sample_arrays(i)
        Image.fromarray(img).save(folder / f"{i}.png")
        Image.fromarray(label).save(folder / f"{i}_mask.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "label_file_name": f"{i}_mask.png"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    ds = build_dataset({"type": "HubDataset", "path": str(tmp_path), "classes": CLASSES}, "data.train")
    img, label = ds.load(1)
    expected_img, expected_label = sample_arrays(1)
    assert np.array_equal(img, expected_img) and np.array_equal(label, expected_label)
    with pytest.raises(ConfigError, match="streaming reads parquet") as info:
        build_dataset({"type": "HubDataset", "path": str(tmp_path), "classes": CLASSES, "streaming": True},
                      "data.train")
    assert info.value.key == "data.train.streaming"


def test_hub_dataset_readme_configs(tmp_path):
    from tests.parquet_data import CLASSES, write_parquet_dataset

    write_parquet_dataset(tmp_path / "a", [2], split="train")
    write_parquet_dataset(tmp_path / "b", [3], split="train")
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: small\n  data_files:\n  - split: train\n    path: a/data/*.parquet\n"
        "- config_name: large\n  data_files:\n  - split: train\n    path: b/data/*.parquet\n---\n")
    for name, rows in (("small", 2), ("large", 3)):
        for streaming in (False, True):
            ds = build_dataset({"type": "HubDataset", "path": str(tmp_path), "name": name, "classes": CLASSES,
                                "streaming": streaming}, "data.train")
            assert len(ds) == rows


def test_missing_hub_dataset_offline_fails_at_once(monkeypatch):
    """What "at once" means: no connection is even tried (so no retries)."""
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def connect(sock, address):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    with pytest.raises(ConfigError) as info:
        build_dataset({"type": "HubDataset", "path": "nobody/no-such-dataset", "classes": ["a", "b"]}, "data.train")
    assert attempts == []
    assert info.value.key == "data.train.path" and "HF_HUB_OFFLINE" in str(info.value)
