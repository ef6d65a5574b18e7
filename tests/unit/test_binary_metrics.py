"""Binary metrics, ROC/PR areas and the threshold sweep against numpy (and scikit-learn) references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from seg_accel.metrics.binary import (
    ScoreHistogram,
    binary_from_confusion,
    roc_pr,
    score_bins,
    threshold_sweep,
)
from seg_accel.metrics import confusion_matrix


def roc_auc_reference(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney: the share of (positive, negative) pairs ranked right, ties counting half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    p, n = positive.sum(), (~positive).sum()
    return (ranks[positive].sum() - p * (p + 1) / 2) / (p * n)


def average_precision_reference(scores: np.ndarray, positive: np.ndarray) -> float:
    """scikit-learn's definition: sum over distinct thresholds (descending) of recall step x precision."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order]
    last_of_run = np.concatenate([np.flatnonzero(np.diff(s)), [len(s) - 1]])
    tp = np.cumsum(y)[last_of_run]
    fp = np.cumsum(~y)[last_of_run]
    precision, recall = tp / (tp + fp), tp / y.sum()
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def generated_binary(seed: int, size=(64, 96)) -> tuple[np.ndarray, np.ndarray]:
    """Thin-structure-like data: a few random 1-3 px lines as foreground, a noisy probability
    that follows them, some ignored pixels."""
    rng = np.random.default_rng(seed)
    h, w = size
    label = np.zeros(size, dtype=np.int64)
    for _ in range(5):
        y0, x0, y1, x1 = rng.integers(0, h), rng.integers(0, w), rng.integers(0, h), rng.integers(0, w)
        width = rng.integers(1, 4)
        for t in np.linspace(0, 1, 200):
            y, x = int(y0 + (y1 - y0) * t), int(x0 + (x1 - x0) * t)
            label[max(y - width // 2, 0):y + width - width // 2, max(x - width // 2, 0):x + width - width // 2] = 1
    prob = np.clip(0.35 * label + rng.normal(0.3, 0.2, size), 0, 1).astype(np.float32)
    label[rng.random(size) < 0.02] = 255
    return prob, label


def cases():
    rng = np.random.default_rng(0)
    yield "random", rng.random((3, 50, 70)).astype(np.float32), rng.integers(0, 2, (3, 50, 70))
    prob, label = zip(*(generated_binary(s) for s in range(3)))
    yield "generated", np.stack(prob), np.stack(label)


@pytest.mark.parametrize("name,prob,label", list(cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_headline_binary_metrics_equal_numpy(name, prob, label):
    pred = (prob > 0.5).astype(np.int64)
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), 2, 255)
    got = binary_from_confusion(cm)
    valid = label != 255
    p, y = pred[valid], label[valid]
    tp, fp = np.sum((p == 1) & (y == 1)), np.sum((p == 1) & (y == 0))
    fn, tn = np.sum((p == 0) & (y == 1)), np.sum((p == 0) & (y == 0))
    reference = {"fgIoU": tp / (tp + fp + fn), "fgDice": 2 * tp / (2 * tp + fp + fn), "Sensitivity": tp / (tp + fn),
                 "Specificity": tn / (tn + fp), "Precision": tp / (tp + fp)}
    for key, value in reference.items():
        assert abs(got[key] - 100 * value) < 1e-6, key


@pytest.mark.parametrize("name,prob,label", list(cases()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("bins", [10000, 257])
def test_roc_and_pr_areas_equal_the_references_within_the_bin_resolution(name, prob, label, bins):
    hist = ScoreHistogram(bins)
    for p, y in zip(prob, label):  # streamed, image by image
        hist.update(torch.from_numpy(p), torch.from_numpy(y))
    got = roc_pr(hist.positives, hist.negatives)
    valid = label != 255
    scores, positive = prob[valid], label[valid] == 1
    binned = score_bins(torch.from_numpy(scores), bins).numpy().astype(np.float64)
    # exactly the areas of the binned scores
    assert abs(got["AUC_ROC"] / 100 - roc_auc_reference(binned, positive)) < 1e-9
    assert abs(got["AUC_PR"] / 100 - average_precision_reference(binned, positive)) < 1e-9
    # and the raw scores' ROC area within the stated bound
    raw_auc = roc_auc_reference(scores.astype(np.float64), positive)
    assert abs(got["AUC_ROC"] / 100 - raw_auc) <= got["auc_bin_error_bound"] / 100 + 1e-12
    if bins == 10000:
        assert got["auc_bin_error_bound"] / 100 < 2e-3
    try:
        from sklearn.metrics import average_precision_score, roc_auc_score
    except ImportError:
        return
    assert abs(got["AUC_ROC"] / 100 - roc_auc_score(positive, binned)) < 1e-9
    assert abs(got["AUC_PR"] / 100 - average_precision_score(positive, binned)) < 1e-9
    assert abs(roc_auc_score(positive, scores) - raw_auc) < 1e-9  # the numpy reference is sklearn's


@pytest.mark.parametrize("name,prob,label", list(cases()), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("by", ["fgDice", "fgIoU"])
def test_threshold_sweep_finds_the_brute_force_best(name, prob, label, by):
    bins = 200
    hist = ScoreHistogram(bins)
    hist.update(torch.from_numpy(prob), torch.from_numpy(label))
    got = threshold_sweep(hist.positives, hist.negatives, by=by)
    valid = label != 255
    best, best_t = -1.0, None
    for k in range(1, bins):  # brute force: every candidate threshold on the raw probabilities
        t = k / bins
        pred = prob[valid] > t
        y = label[valid] == 1
        tp, fp, fn = np.sum(pred & y), np.sum(pred & ~y), np.sum(~pred & y)
        value = 2 * tp / (2 * tp + fp + fn) if by == "fgDice" else tp / (tp + fp + fn)
        if value > best:
            best, best_t = value, t
    assert got["threshold"] == best_t
    assert abs(got[by] - 100 * best) < 1e-6


def test_the_histogram_adds_up_across_shards():
    rng = np.random.default_rng(5)
    prob, label = rng.random((4, 20, 20)).astype(np.float32), rng.integers(0, 2, (4, 20, 20))
    whole, a, b = ScoreHistogram(100), ScoreHistogram(100), ScoreHistogram(100)
    whole.update(torch.from_numpy(prob), torch.from_numpy(label))
    a.update(torch.from_numpy(prob[:1]), torch.from_numpy(label[:1]))
    b.update(torch.from_numpy(prob[1:]), torch.from_numpy(label[1:]))
    assert torch.equal(whole.counts, a.counts + b.counts)
    assert int(whole.counts.sum()) == prob.size


def test_bins_follow_the_strict_threshold():
    """``p > k / B`` exactly when ``bin >= k``, at the edges too."""
    bins = 10
    p = torch.tensor([0.0, 0.1, 0.1000001, 0.5, 0.55, 1.0], dtype=torch.float32)
    assert score_bins(p, bins).tolist() == [0, 1, 1, 4, 5, 9]  # float32 0.1 is 0.10000000149 > 0.1
    for k in range(1, bins):
        assert ((score_bins(p, bins) >= k) == (p.double() > k / bins)).all()


# ----------------------------------------------------------------------------- the evaluate command
def binary_folder(root, count=6, size=(24, 32)):
    """Vessel-like 2-class data in the folder layout: PNG images, labels 0/1 with some 255."""
    from PIL import Image

    (root / "img").mkdir(parents=True)
    (root / "ann").mkdir()
    for i in range(count):
        prob, label = generated_binary(100 + i, size)
        image = (np.stack([prob] * 3, -1) * 255).astype(np.uint8)
        Image.fromarray(image).save(root / "img" / f"eye_{i:02d}.png")
        Image.fromarray(label.astype(np.uint8)).save(root / "ann" / f"eye_{i:02d}.png")


@pytest.mark.parametrize("one_channel", [False, True])
def test_evaluate_reports_binary_metrics_auc_sweep_and_per_image_rows(tmp_path, fresh_accelerate, one_channel):
    import csv
    import json

    from seg_accel.cli import evaluate_cli
    from seg_accel.config import load_config
    from seg_accel.inference.predict import Predictor
    from seg_accel.validate import validate_train_config
    from seg_accel.models import build_model
    from seg_accel.models.builder import export_model
    from tests.conftest import NORMALIZE, tiny_config, write_yaml

    binary_folder(tmp_path / "data")
    dataset = {"type": "CustomDataset", "data_root": str(tmp_path / "data"), "img_dir": "img", "ann_dir": "ann",
               "img_suffix": ".png", "classes": ["background", "vessel"], "pipeline": [NORMALIZE]}
    cfg_dict = tiny_config()
    cfg_dict["data"]["train"] = dict(dataset)
    cfg_dict["data"]["val"] = dict(dataset)
    if one_channel:
        cfg_dict["model"]["decode_head"] = {"out_channels": 1, "threshold": 0.5,
                                            "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": True}}
    config = write_yaml(tmp_path / "binary.yaml", cfg_dict)
    cfg = validate_train_config(load_config(str(config)))
    torch.manual_seed(0)
    model = build_model(cfg.model, list(cfg.classes))
    export_model(model, tmp_path / "export", list(cfg.classes))
    out = tmp_path / "eval" / "results.json"
    assert evaluate_cli([str(config), str(tmp_path / "export"), "--metrics", "mIoU", "mDice", "AUC",
                         "--threshold-sweep", "--per-image", "--out", str(out)]) == 0
    results = json.loads(out.read_text())

    # the reference: the same model through the Predictor, metrics in numpy
    predictor = Predictor.from_train_config(cfg, str(tmp_path / "export"))
    probs, preds, labels = [], [], []
    from PIL import Image

    for i in range(6):
        prediction = predictor(tmp_path / "data" / "img" / f"eye_{i:02d}.png")
        probs.append(prediction.probs[-1])  # the foreground's probability
        preds.append(prediction.labels)
        labels.append(np.asarray(Image.open(tmp_path / "data" / "ann" / f"eye_{i:02d}.png")).astype(np.int64))
    prob, pred, label = np.stack(probs), np.stack(preds), np.stack(labels)
    valid = label != 255
    p, y = pred[valid] == 1, label[valid] == 1
    tp, fp, fn, tn = np.sum(p & y), np.sum(p & ~y), np.sum(~p & y), np.sum(~p & ~y)
    metrics = results["metrics"]
    assert abs(metrics["fgDice"] - 100 * 2 * tp / (2 * tp + fp + fn)) < 1e-6
    assert abs(metrics["fgIoU"] - 100 * tp / (tp + fp + fn)) < 1e-6
    assert abs(metrics["Sensitivity"] - 100 * tp / (tp + fn)) < 1e-6
    assert abs(metrics["Specificity"] - 100 * tn / (tn + fp)) < 1e-6
    assert abs(metrics["Precision"] - 100 * tp / (tp + fp)) < 1e-6
    raw_auc = roc_auc_reference(prob[valid].astype(np.float64), y)
    assert abs(metrics["AUC_ROC"] / 100 - raw_auc) <= results["auc_bin_error_bound"] / 100 + 1e-6
    assert results["threshold_sweep"]["fgDice"] >= metrics["fgDice"] - 1e-9  # the best is at least the default's
    assert list(results["curves"]) == ["fpr", "tpr", "recall", "precision"]
    for suffix in ("_confusion.png", "_iou.png", "_dice.png", "_roc_pr.png"):
        assert out.with_name("results" + suffix).is_file()
    with open(out.with_name("results_per_image.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image"] for r in rows] == [f"eye_{i:02d}" for i in range(6)]
    for row, pi, li in zip(rows, pred, label):
        v = li != 255
        tpi = np.sum((pi[v] == 1) & (li[v] == 1))
        den = np.sum(pi[v] == 1) + np.sum(li[v] == 1)
        if den:
            assert abs(float(row["fgDice"]) - 100 * 2 * tpi / den) < 1e-3


def test_auc_on_a_multi_class_model_is_a_config_error(tmp_path):
    from seg_accel.cli import evaluate_cli
    from tests.conftest import tiny_config, write_yaml

    config = write_yaml(tmp_path / "cfg.yaml", tiny_config())
    assert evaluate_cli([str(config), str(tmp_path / "missing"), "--metrics", "AUC"]) == 2
