"""The evaluate script, metrics against a per-image reference, sliding windows, test-time augmentation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seg_accel.inference.inferencer import Inferencer, slide_windows
from seg_accel.metrics import confusion_matrix, metrics_from_confusion
from tests.conftest import tiny_config, write_yaml


# ----------------------------------------------------------------------------- metrics
def per_image_reference(preds, labels, num_classes, ignore=255):
    """MMSegmentation's way, in numpy: areas per image (ignore masked), summed, then the formulas."""
    inter = np.zeros(num_classes)
    area_pred = np.zeros(num_classes)
    area_label = np.zeros(num_classes)
    for pred, label in zip(preds, labels):
        mask = label != ignore
        p, lab = pred[mask], label[mask]
        inter += np.bincount(p[p == lab], minlength=num_classes)
        area_pred += np.bincount(p, minlength=num_classes)
        area_label += np.bincount(lab, minlength=num_classes)
    union = area_pred + area_label - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou, acc = inter / union, inter / area_label
        dice = 2 * inter / (area_pred + area_label)
        precision, recall = inter / area_pred, inter / area_label
        fscore = 2 * precision * recall / (precision + recall)
    columns = {"IoU": iou, "Acc": acc, "Dice": dice, "Precision": precision, "Recall": recall, "Fscore": fscore}
    means = {f"m{k}": np.nanmean(v) * 100 for k, v in columns.items()}
    return inter.sum() / area_label.sum() * 100, {k: v * 100 for k, v in columns.items()}, means


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_a_per_image_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    num_classes = 7
    preds, labels = [], []
    for _ in range(6):
        h, w = rng.integers(5, 30, size=2)
        label = rng.integers(0, 5, size=(h, w))  # classes 5, 6 never in the labels
        label[rng.random((h, w)) < 0.2] = 255  # ignored pixels
        pred = rng.integers(0, 6, size=(h, w))  # class 5 only predicted; class 6 absent everywhere
        preds.append(pred)
        labels.append(label)
    cm = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(lab), num_classes) for p, lab in zip(preds, labels))
    ours = metrics_from_confusion(cm, ["mIoU", "mDice", "mFscore"])
    aacc, columns, means = per_image_reference(preds, labels, num_classes)
    assert ours["aAcc"] == pytest.approx(aacc, abs=1e-9)
    for column, values in columns.items():
        got = np.asarray(ours["per_class"][column])
        assert np.array_equal(np.isnan(got), np.isnan(values)), column
        assert np.allclose(got[~np.isnan(got)], values[~np.isnan(values)], rtol=0, atol=1e-9), column
        assert ours[f"m{column}"] == pytest.approx(means[f"m{column}"], abs=1e-9)
    assert np.isnan(ours["per_class"]["IoU"][6])  # absent everywhere: left out of the mean
    assert ours["per_class"]["IoU"][5] == 0.0  # only predicted: IoU 0, Acc and Recall NaN
    assert np.isnan(ours["per_class"]["Acc"][5])


def test_the_evaluate_module_gives_the_same_numbers():
    import evaluate

    from seg_accel.metrics import evaluate_module_path

    rng = np.random.default_rng(0)
    preds = [rng.integers(0, 4, (6, 9)) for _ in range(4)]
    labels = [np.where(rng.random((6, 9)) < 0.1, 255, rng.integers(0, 4, (6, 9))) for _ in range(4)]
    metric = evaluate.load(evaluate_module_path())
    got = metric.compute(predictions=preds, references=labels, num_labels=4, ignore_index=255,
                         metrics=["mIoU", "mFscore"])
    cm = sum(confusion_matrix(torch.from_numpy(p), torch.from_numpy(lab), 4) for p, lab in zip(preds, labels))
    expected = metrics_from_confusion(cm, ["mIoU", "mFscore"])
    assert got.pop("per_class") == expected.pop("per_class") and got == expected


# ----------------------------------------------------------------------------- sliding windows
def spec_windows(height, width, crop, stride):
    """docs/behaviour.md section 9, literally."""
    out = []
    h_grids = max(height - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    w_grids = max(width - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1 = h_idx * stride[0]
            x1 = w_idx * stride[1]
            y2 = min(y1 + crop[0], height)
            x2 = min(x1 + crop[1], width)
            y1 = max(y2 - crop[0], 0)
            x1 = max(x2 - crop[1], 0)
            out.append((y1, y2, x1, x2))
    return out


@pytest.mark.parametrize("height, width, crop, stride", [
    (37, 50, (16, 20), (11, 13)), (64, 64, (32, 32), (21, 21)), (23, 71, (23, 24), (7, 9)),
    (10, 12, (32, 32), (16, 16)),  # the crop is larger than the image
])
def test_slide_windows_and_counts_follow_the_spec(height, width, crop, stride):
    windows = slide_windows(height, width, crop, stride)
    assert windows == spec_windows(height, width, crop, stride)
    count = np.zeros((height, width), dtype=int)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= height and 0 <= x1 < x2 <= width
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1  # every pixel is covered
    if crop[0] >= height and crop[1] >= width:
        assert windows == [(0, height, 0, width)]


class PixelModel(torch.nn.Module):
    """A per-pixel model (1x1 convolution): the same logits whatever the window."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.calls = []

    def forward(self, pixel_values):
        self.calls.append(tuple(pixel_values.shape[-2:]))
        return type("Out", (), {"logits": self.conv(pixel_values)})()


@pytest.mark.parametrize("crop, stride", [((16, 20), (11, 13)), ((64, 64), (32, 32))])
def test_slide_inference_averages_windows(crop, stride):
    model = PixelModel()
    x = torch.randn(2, 3, 37, 50)
    whole = Inferencer(None).scores(model, x, (37, 50))
    cfg = type("Cfg", (), {"mode": "slide", "crop_size": list(crop), "stride": list(stride)})()
    model.calls.clear()
    slid = Inferencer(cfg).scores(model, x, (37, 50))
    assert torch.allclose(slid, whole, atol=1e-6)  # overlapping windows average the same logits
    assert len(model.calls) == len(slide_windows(37, 50, crop, stride))
    assert all(h <= crop[0] and w <= crop[1] for h, w in model.calls)


def test_flip_and_scale_average_probabilities():
    model = PixelModel()
    x = torch.randn(1, 3, 20, 24)
    cfg = type("Cfg", (), {"mode": "whole", "img_ratios": [1.0], "flip": True})()
    probs = Inferencer(cfg).scores(model, x, (20, 24))
    assert torch.allclose(probs, model(x).logits.softmax(1), atol=1e-6)  # a per-pixel model is flip-equivariant
    cfg.img_ratios = [0.5, 1.0, 1.5]
    probs = Inferencer(cfg).scores(model, x, (20, 24))
    assert probs.shape == (1, 4, 20, 24) and torch.allclose(probs.sum(1), torch.ones(1, 20, 24), atol=1e-5)


# ----------------------------------------------------------------------------- the script
def save_tiny_model(path, classes=("background", "circle", "square", "triangle")):
    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from seg_accel.models import build_model

    torch.manual_seed(0)
    model = build_model(parse_section(tiny_config()["model"], ModelConfig, "model"), list(classes))
    model.save_pretrained(path)


def test_checkpoint_errors(tmp_path, capsys):
    from seg_accel.cli import evaluate_cli

    path = write_yaml(tmp_path / "exp.yaml", tiny_config())
    assert evaluate_cli([str(path), "nobody/no-such-model"]) == 2
    assert "CHECKPOINT: cannot load 'nobody/no-such-model' (HF_HUB_OFFLINE is set)" in capsys.readouterr().err
    assert evaluate_cli([str(path), str(tmp_path / "missing")]) == 2
    assert "not a checkpoint or save_pretrained folder" in capsys.readouterr().err
    save_tiny_model(tmp_path / "two_classes", classes=("a", "b"))
    assert evaluate_cli([str(path), str(tmp_path / "two_classes")]) == 2
    assert "the model has 2 output classes but the data defines 4" in capsys.readouterr().err


def test_show_dir_panels_with_the_image_first_and_enlarged(tmp_path):
    """--show-image puts the image itself before the prediction and the ground truth; --show-scale
    enlarges every panel by whole pixels (each pixel a block), the labels unchanged."""
    from PIL import Image

    from seg_accel.data import build_dataset
    from seg_accel.inference.reports import Overlays

    dataset = build_dataset({"type": "SyntheticShapes", "num_samples": 2, "img_size": [40, 64], "seed": 3},
                            "data.val", 255, False)
    img, label = dataset.load(1)
    pred = torch.as_tensor(label.astype(np.int64))[None]
    batch = {"indices": torch.tensor([1]), "labels": torch.as_tensor(label.astype(np.int64))[None]}
    for image, scale, panels in ((False, 1, 2), (True, 1, 3), (True, 3, 3)):
        out = tmp_path / f"{image}_{scale}"
        Overlays(dataset, out, 0.5, 255, image=image, scale=scale)(batch, pred)
        panel = np.asarray(Image.open(out / f"{dataset.sample_name(1)}.png").convert("RGB"))
        assert panel.shape[1] == panels * 64 * scale + 4 * (panels - 1), (image, scale, panel.shape)
        top = panel[16:16 + 40 * scale, :64 * scale]  # under the 16-pixel header: the first panel
        expected = np.repeat(np.repeat(img, scale, 0), scale, 1)
        if image:
            assert np.array_equal(top, expected)
        else:
            assert not np.array_equal(top, expected)  # the prediction blended over it
    from seg_accel.cli import evaluate_cli

    assert evaluate_cli(["configs/demo/segformer_synthetic.yaml", str(tmp_path), "--show-scale", "0"]) == 2
