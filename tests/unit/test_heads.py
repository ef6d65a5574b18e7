"""Several losses on the decode and auxiliary heads, binary heads, class weights from data."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from seg_accel.config import load_config
from seg_accel.engine import Trainer
from seg_accel.validate import validate_train_config
from seg_accel.losses import CrossEntropyLoss, DiceLoss, resize_logits
from tests.conftest import CAMVID, REPO, binary_shape_folders, tiny_config, write_yaml
from tests.unit.test_models import ARCHITECTURES

MULTI = {"loss_decode": [{"type": "CrossEntropyLoss", "loss_weight": 1.0},
                         {"type": "DiceLoss", "loss_weight": 3.0}]}
MULTI_AUX = {"loss_decode": [{"type": "CrossEntropyLoss", "loss_weight": 0.4},
                             {"type": "DiceLoss", "loss_weight": 1.2}]}


def upernet_config(decode_head, auxiliary_head=None, **overrides):
    model = {"type": ARCHITECTURES["upernet_convnext"]["type"],
             "config": dict(ARCHITECTURES["upernet_convnext"]["config"]), "decode_head": decode_head}
    if auxiliary_head is not None:
        model["auxiliary_head"] = auxiliary_head
    cfg = tiny_config(model=model, **overrides)
    cfg["data"]["val"] = None
    return cfg


def make_trainer(tmp_path, cfg):
    raw = load_config(write_yaml(tmp_path / "exp.yaml", cfg))
    raw.dict["work_dir"] = str(tmp_path / "work")
    return Trainer(validate_train_config(raw), raw, tmp_path / "work")


def test_multi_loss_on_decode_and_auxiliary_heads(tmp_path, fresh_accelerate):
    trainer = make_trainer(tmp_path, upernet_config(MULTI, MULTI_AUX))
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.auxiliary_head is not None and model.config.use_auxiliary_head
    seen = []
    model.auxiliary_head.register_forward_hook(lambda m, i, out: seen.append(out))
    batch = {k: v.to(trainer.accelerator.device) for k, v in next(iter(trainer.train_loader)).items()
             if torch.is_tensor(v)}
    total, logs = trainer.compute_losses(batch)
    assert {"decode.loss_ce", "decode.loss_dice", "aux.loss_ce", "aux.loss_dice", "decode.acc_seg"} <= set(logs)

    labels = batch["labels"]
    with torch.no_grad():
        logits = resize_logits(model(pixel_values=batch["pixel_values"]).logits, labels.shape[-2:], False)
        aux = resize_logits(seen[-1], labels.shape[-2:], False)  # the auxiliary head's own output
    expected = (1.0 * CrossEntropyLoss()(logits, labels) + 3.0 * DiceLoss()(logits, labels)
                + 0.4 * CrossEntropyLoss()(aux, labels) + 1.2 * DiceLoss()(aux, labels))
    assert float(total.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(total.detach()) == pytest.approx(sum(float(logs[k]) for k in logs if ".loss_" in k), rel=1e-6)
    total.backward()
    assert all(p.grad is not None for p in model.auxiliary_head.parameters())  # the aux loss reaches its head
    assert not trainer.ddp_kwargs.find_unused_parameters  # every parameter gets a gradient


def test_a_loss_not_named_loss_is_logged_not_trained_and_announced(tmp_path, fresh_accelerate):
    head = {"loss_decode": [{"type": "CrossEntropyLoss"}, {"type": "DiceLoss", "loss_name": "dice"}]}
    cfg = tiny_config()
    cfg["model"]["decode_head"] = head
    cfg["data"]["val"] = None
    trainer = make_trainer(tmp_path, cfg)
    batch = next(iter(trainer.train_loader))
    total, logs = trainer.compute_losses(batch)
    assert "decode.dice" in logs and float(total.detach()) == pytest.approx(float(logs["decode.loss_ce"]))
    log = next((tmp_path / "work").glob("*.log")).read_text()
    assert "logged, not trained on (name does not start with 'loss_'): decode.dice" in log


@pytest.mark.parametrize("change, key, words", [
    ({"auxiliary_head": {"loss_decode": {"type": "CrossEntropyLoss"}}}, "model.auxiliary_head", "no auxiliary head"),
    ({"config": {"use_auxiliary_head": True}}, "model.config.use_auxiliary_head", "auxiliary_head"),
    ({"decode_head": {"out_channels": 1, "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": True}}},
     "model.decode_head.out_channels", "use_sigmoid"),
    ({"decode_head": {"loss_decode": {"type": "CrossEntropyLoss", "class_weight": [1.0, 2.0, 3.0]}}},
     "model.decode_head.loss_decode.class_weight", "3 values but there are 4 classes"),
    ({"decode_head": {"loss_decode": [{"type": "CrossEntropyLoss"},
                                      {"type": "CrossEntropyLoss", "class_weight": "missing_weights.json"}]}},
     "model.decode_head.loss_decode.1.class_weight", "not found"),
    ({"decode_head": {"loss_decode": {"type": "DiceLos"}}}, "model.decode_head.loss_decode.type", "DiceLoss"),
    ({"decode_head": {"sampler": {"type": "OHEMPixelSampler", "thresh": 1.5}}}, "model.decode_head.sampler.thresh",
     "(0, 1]"),
])
def test_bad_loss_config_named_in_one_message(tmp_path, capsys, change, key, words):
    from seg_accel.cli import train_cli

    cfg = tiny_config()
    for name, value in change.items():
        cfg["model"][name] = {**cfg["model"].get(name, {}), **value} if name == "config" else value
    rc = train_cli([str(write_yaml(tmp_path / "exp.yaml", cfg))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f": {key}: " in err and words in err and "exp.yaml" in err, err


def test_class_weight_file_of_the_wrong_length(tmp_path, capsys, monkeypatch):
    from seg_accel.cli import train_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.json").write_text(json.dumps({"class_weight": [1.0, 2.0]}))
    cfg = tiny_config()
    cfg["model"]["decode_head"] = {"loss_decode": {"type": "CrossEntropyLoss", "class_weight": "w.json"}}
    assert train_cli([str(write_yaml(tmp_path / "exp.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert "model.decode_head.loss_decode.class_weight" in err and "2 values but there are 4 classes" in err


def test_binary_head_with_one_sigmoid_channel(tmp_path, fresh_accelerate):
    cfg = tiny_config()
    cfg["data"].update(binary_shape_folders(tmp_path, 6, 32, {s: cfg["data"][s]["pipeline"] for s in ("train", "val")}))
    cfg["model"]["decode_head"] = {"out_channels": 1, "threshold": 0.4,
                                   "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": True}}
    trainer = make_trainer(tmp_path, cfg)
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert model.config.num_labels == 1 and model.config.id2label == {0: "shape"}
    results = trainer.train()
    assert set(results["per_class"]["IoU"]) and len(results["per_class"]["IoU"]) == 2
    x = trainer.val_set[0]["pixel_values"][None]
    from seg_accel.losses import predict

    logits = model(pixel_values=x).logits
    assert logits.shape[1] == 1
    assert torch.equal(predict(logits, 0.4), (logits[:, 0].sigmoid() > 0.4).long())


def test_class_weights_script_reproduces_camvid_pixel_counts(camvid, tmp_path, monkeypatch):
    from seg_accel.cli import class_weights_cli

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "camvid").symlink_to(camvid)  # the CamVid config reads data/camvid
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "weights.json"
    rc = class_weights_cli([str(REPO / "configs/camvid/segformer_tiny_camvid_2k.yaml"), "--method", "median_freq",
                            "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    with open(CAMVID / "class_pixel_counts.csv") as f:
        rows = list(csv.DictReader(f))
    assert result["pixel_counts"] == [int(r["train_pixels"]) for r in rows[:11]]
    assert result["ignored_pixels"] == int(rows[11]["train_pixels"])  # void (11) is mapped to 255
    assert result["images"] == 367 and result["other_pixels"] == 0
    # the median-frequency weights the dataset's README lists
    readme = [0.2793, 0.2017, 4.7865, 0.1490, 1.0000, 0.4217, 3.8467, 1.9736, 0.7889, 6.3747, 8.8587]
    assert result["class_weight"] == pytest.approx(readme, abs=5e-5)
    committed = json.loads((REPO / "configs/camvid/camvid_median_freq_weights.json").read_text())
    assert committed["class_weight"] == pytest.approx(result["class_weight"])


def test_class_weight_methods_by_hand():
    from seg_accel.data.statistics import PixelCounts, class_weights

    counts = PixelCounts(3)
    counts.add(np.array([[0, 0, 0, 1]]), 255)  # class 0: 3 px, class 1: 1 px (image of 4)
    counts.add(np.array([[0, 0, 255, 255]]), 255)  # class 0: 2 px (image of 4); 2 ignored
    assert counts.pixels.tolist() == [5, 1, 0] and counts.image_pixels.tolist() == [8, 4, 0] and counts.ignored == 2
    freq = [5 / 8, 1 / 4]
    median = (freq[0] + freq[1]) / 2
    assert class_weights(counts, "median_freq") == pytest.approx([median / freq[0], median / freq[1], 0.0])
    assert class_weights(counts, "inverse") == pytest.approx([6 / (3 * 5), 6 / (3 * 1), 0.0])
    import math

    assert class_weights(counts, "inverse_log") == pytest.approx(
        [1 / math.log(1.02 + 5 / 6), 1 / math.log(1.02 + 1 / 6), 0.0])
