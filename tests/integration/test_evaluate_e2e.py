"""The evaluate script, metrics against a per-image reference, sliding windows, test-time augmentation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, accelerate_launch, run_script, tiny_config, write_yaml


# ----------------------------------------------------------------------------- metrics
def save_tiny_model(path, classes=("background", "circle", "square", "triangle")):
    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from seg_accel.models import build_model

    torch.manual_seed(0)
    model = build_model(parse_section(tiny_config()["model"], ModelConfig, "model"), list(classes))
    model.save_pretrained(path)


@pytest.mark.multiprocess
def test_two_process_evaluation_equals_one_process(tmp_path):
    save_tiny_model(tmp_path / "model")
    cfg = tiny_config()
    cfg["data"]["val"]["num_samples"] = 37
    cfg["data"]["val_dataloader"] = {"samples_per_gpu": 4}  # a short last batch too
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    evaluate = str(REPO / "scripts/evaluate.py")
    one = run_script([evaluate, str(path), str(tmp_path / "model"), "--out", str(tmp_path / "one.json")], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch([evaluate, str(path), str(tmp_path / "model"), "--out", str(tmp_path / "two.json")],
                            cwd=tmp_path)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert b["timings"]["processes"] == 2 and a["timings"]["processes"] == 1
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert sum(map(sum, a["confusion_matrix"])) == 37 * 32 * 32  # every pixel of every image exactly once
    assert a["metrics"] == b["metrics"]


def test_evaluating_the_demo_export(tmp_path):
    demo = str(REPO / "configs/demo/segformer_synthetic.yaml")
    short = ["--cfg-options", "runner.max_iters=30", "data.val.num_samples=12", "log_config.interval=10"]
    train = run_script([str(REPO / "scripts/train.py"), demo, "--work-dir", str(tmp_path / "work"), *short],
                       cwd=REPO)
    assert train.returncode == 0, train.stderr[-3000:]
    out = tmp_path / "eval" / "results.json"
    proc = run_script([str(REPO / "scripts/evaluate.py"), demo, str(tmp_path / "work" / "final"), "--metrics", "mIoU",
                       "mDice", "mFscore", "--out", str(out), "--show-dir", str(tmp_path / "show"), "--opacity",
                       "0.6", *short], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("background", "circle", "square", "triangle"):
        assert f"| {name}" in proc.stdout  # the per-class table
    assert "| Class      |   IoU |   Acc |  Dice | Fscore | Precision | Recall |" in proc.stdout
    results = json.loads(out.read_text())
    assert set(results["metrics"]) == {"aAcc", "mIoU", "mAcc", "mDice", "mFscore", "mPrecision", "mRecall"}
    assert set(results["per_class"]["IoU"]) == {"background", "circle", "square", "triangle"}
    assert results["checkpoint"].endswith("final") and results["timings"]["images"] == 12
    assert results["config"]["model"]["type"] == "SegformerForSemanticSegmentation"
    assert "_evaluate_version" in results  # written with evaluate.save
    assert f"mIoU: {results['metrics']['mIoU']:.2f}" in proc.stdout
    for suffix in ("_confusion.png", "_iou.png"):
        image = np.asarray(Image.open(out.with_name("results" + suffix)).convert("RGB"))
        assert image.shape[0] >= 300 and image.shape[1] >= 300 and image.std() > 10  # a real chart
    overlays = sorted((tmp_path / "show").glob("*.png"))
    assert len(overlays) == 12
    panel = np.asarray(Image.open(overlays[0]))
    # prediction | ground truth side by side (4 px apart) under a 16 px header, a legend below
    assert panel.shape[1] == 64 + 4 + 64 and panel.shape[0] > 16 + 64 and panel.shape[2] == 3
    names = sorted(p.stem for p in overlays)
    assert names == [f"{i:06d}" for i in range(12)]  # SyntheticShapes has no file names: the index


def test_aug_test_and_training_checkpoint(tmp_path):
    cfg = tiny_config(checkpoint_config={"interval": 2})
    cfg["runner"]["max_iters"] = 2
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    train = run_script([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "work")], cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    proc = run_script([str(REPO / "scripts/evaluate.py"), str(path), str(tmp_path / "work" / "iter_2"), "--aug-test",
                       "--out", str(tmp_path / "aug.json"), "--cfg-options", "model.test_cfg.img_ratios=[0.5,1.0,1.5]"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scales [0.5, 1.0, 1.5] + flip" in proc.stdout
    results = json.loads((tmp_path / "aug.json").read_text())
    assert results["test_cfg"]["img_ratios"] == [0.5, 1.0, 1.5] and results["test_cfg"]["flip"] is True


