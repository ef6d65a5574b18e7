"""Bad samples: an error naming dataset, split, index and file or row; or skipped and counted."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from seg_accel.data import build_dataset, build_train_loader
from seg_accel.errors import DataError
from tests.parquet_data import CLASSES, sample_arrays, write_parquet_dataset

KINDS = ["undecodable", "size", "value", "missing"]
MESSAGES = {
    "undecodable": "cannot read it",
    "size": "label is 16x8 (w x h) but the image is 16x16",
    "value": "label values [77] are neither a class id (0..3) nor ignore_index (255)",
    "missing": "No such file",
}


def folder_dataset(root, kind, skip=False):
    (root / "img").mkdir(parents=True)
    (root / "ann").mkdir()
    for i in range(5):
        img, label = sample_arrays(i)
        if i == 2 and kind == "size":
            label = label[:8]
        if i == 2 and kind == "value":
            label = np.full_like(label, 77)
        Image.fromarray(img).save(root / "img" / f"s{i}.png")
        Image.fromarray(label).save(root / "ann" / f"s{i}.png")
    if kind == "undecodable":
        (root / "img" / "s2.png").write_bytes(b"not a png")
    if kind == "missing":
        (root / "ann" / "s2.png").unlink()
    return build_dataset({"type": "CustomDataset", "data_root": str(root), "img_dir": "img", "ann_dir": "ann",
                          "img_suffix": ".png", "classes": CLASSES}, "data.train", skip_bad_samples=skip)


@pytest.mark.parametrize("kind", KINDS)
def test_folder_bad_sample_is_an_error_naming_it(tmp_path, kind):
    dataset = folder_dataset(tmp_path, kind)
    with pytest.raises(DataError) as info:
        dataset[2]
    message = str(info.value)
    assert message.startswith("data.train (CustomDataset, image ") and "s2.png" in message and "index 2" in message
    assert MESSAGES[kind] in message, message


@pytest.mark.parametrize("kind", KINDS)
def test_folder_bad_sample_skipped_and_counted(tmp_path, kind):
    dataset = folder_dataset(tmp_path, kind, skip=True)
    loader = build_train_loader(dataset, 5, 0, 0, 1, seed=0, shuffle=False)
    batch = next(iter(loader))
    assert batch["indices"].tolist() == [0, 1, 3, 3, 4]  # sample 2 replaced by the next good one
    (epoch, reason), = batch["skipped"]
    assert epoch == 0 and "s2.png" in reason and MESSAGES[kind] in reason


@pytest.mark.parametrize("kind", ["undecodable", "size", "value"])
def test_streamed_bad_row_error_and_skip(tmp_path, kind):
    from seg_accel.data.streaming import ShardStream

    write_parquet_dataset(tmp_path / "ds", [3, 3], bad_rows={4: kind})
    cfg = {"type": "HubDataset", "path": str(tmp_path / "ds"), "streaming": True, "classes": CLASSES}
    dataset = build_dataset(cfg, "data.train")
    with pytest.raises(DataError) as info:
        list(ShardStream(dataset, 0, 1, seed=0, shuffle=False, epochs=1))
    message = str(info.value)
    assert "data.train (HubDataset" in message and "split train, row 4" in message and "index 4" in message
    assert (MESSAGES[kind] if kind != "undecodable" else "cannot read it") in message
    dataset = build_dataset(cfg, "data.train", skip_bad_samples=True)
    samples = list(ShardStream(dataset, 0, 1, seed=0, shuffle=False, epochs=1))
    assert len(samples) == 6  # the count is kept (a good sample stands in), so processes stay in step
    assert [s["index"] for s in samples] == [0, 1, 2, 3, 3, 5]
    assert sum(len(s["skipped"]) for s in samples) == 1 and samples[4]["repeat"]


def test_training_reports_skipped_samples_at_the_end_of_each_epoch(tmp_path, fresh_accelerate):
    from tests.conftest import NORMALIZE, make_trainer, tiny_config

    folder_dataset(tmp_path / "data", "undecodable")
    cfg = tiny_config(log_config={"interval": 1})
    cfg["runner"]["max_iters"] = 6  # 6 x 2 samples: two epochs of 5 and a bit
    cfg["data"].update(skip_bad_samples=True, val=None, train={
        "type": "CustomDataset", "data_root": str(tmp_path / "data"), "img_dir": "img", "ann_dir": "ann",
        "img_suffix": ".png", "classes": CLASSES, "pipeline": [NORMALIZE]})
    trainer, _ = make_trainer(tmp_path, cfg)
    trainer.train()  # does not stop
    log = next((tmp_path / "work").glob("*.log")).read_text()
    assert "epoch 0: process 0 skipped 1 bad sample(s): data.train (CustomDataset" in log
    assert "epoch 1: process 0 skipped 1 bad sample(s)" in log


def test_without_skipping_training_stops_with_the_named_sample(tmp_path, capsys):
    from seg_accel.cli import train_cli
    from tests.conftest import NORMALIZE, tiny_config, write_yaml

    folder_dataset(tmp_path / "data", "value")
    cfg = tiny_config()
    cfg["data"].update(val=None, train={
        "type": "CustomDataset", "data_root": str(tmp_path / "data"), "img_dir": "img", "ann_dir": "ann",
        "img_suffix": ".png", "classes": CLASSES, "pipeline": [NORMALIZE]})
    from accelerate.state import AcceleratorState

    try:
        rc = train_cli([str(write_yaml(tmp_path / "exp.yaml", cfg)), "--work-dir", str(tmp_path / "work")])
    finally:
        AcceleratorState._reset_state(True)
    err = capsys.readouterr().err
    assert rc == 1 and "error: data.train (CustomDataset" in err and "label values [77]" in err
    assert (tmp_path / "work" / "config.yaml").is_file()  # what was written stays
