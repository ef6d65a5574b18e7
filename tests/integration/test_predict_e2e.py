"""``seg-accel predict`` as users run it: a folder of unlabeled images, 1 and 2 processes, an
export alone or a config with a training checkpoint."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import REPO, run_script, tiny_config, write_yaml


def make_export(tmp_path):
    from seg_accel.config import load_config
    from seg_accel.validate import validate_train_config
    from seg_accel.models import build_model
    from seg_accel.models.builder import export_model
    from seg_accel.models.processor import build_image_processor

    torch.manual_seed(0)
    config = write_yaml(tmp_path / "cfg.yaml", tiny_config())
    cfg = validate_train_config(load_config(str(config)))
    export_model(build_model(cfg.model, list(cfg.classes)), tmp_path / "export", list(cfg.classes),
                 build_image_processor(cfg.data))
    return config, tmp_path / "export"


def unlabeled_images(folder, count=20):
    """``count`` images of three sizes, PNG and JPEG, some in a subfolder."""
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        sub = folder / ("more" if i % 4 == 3 else "")
        sub.mkdir(parents=True, exist_ok=True)
        size = [(32, 40), (48, 36), (29, 29)][i % 3]
        suffix = ".jpg" if i % 5 == 0 else ".png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(sub / f"frame_{i:03d}{suffix}")
        names.append(((sub / f"frame_{i:03d}").relative_to(folder).as_posix(), size))
    return names


@pytest.mark.multiprocess
def test_predict_on_2_processes_writes_every_image_once_named_after_it(tmp_path):
    _, export = make_export(tmp_path)
    expected = unlabeled_images(tmp_path / "images")
    out = tmp_path / "out"
    proc = run_script(["-m", "seg_accel", "predict", str(export), str(tmp_path / "images"), "--out", str(out),
                       "--probs", "npy", "--probs-dtype", "float32", "--num-processes", "2"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each process reports what it wrote; the sum is every image exactly once
    assert re.search(r"wrote 20 prediction\(s\)", proc.stdout + proc.stderr)
    assert "predicting 20 image(s) on 2 process(es)" in proc.stdout + proc.stderr
    for kind, suffix in (("labels", ".png"), ("overlays", ".png"), ("probs", ".npy")):
        found = sorted(p.relative_to(out / kind).as_posix() for p in (out / kind).rglob(f"*{suffix}"))
        assert found == sorted(f"{name}{suffix}" for name, _ in expected), kind
    for name, (h, w) in expected:
        labels = np.asarray(Image.open(out / "labels" / f"{name}.png"))
        probs = np.load(out / "probs" / f"{name}.npy")
        assert labels.shape == (h, w) and probs.shape == (4, h, w)
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        assert (probs.argmax(0) == labels).all()


@pytest.mark.slow  # CI runs it in its slow step (keeps the README test command under 10 min)
def test_predict_with_a_config_and_a_training_checkpoint(tmp_path):
    """Train 4 iterations, then predict with the config and the checkpoint folder: the same
    labels as the run's own export."""
    config = write_yaml(tmp_path / "exp.yaml", tiny_config(checkpoint_config={"interval": 4}))
    work = tmp_path / "work"
    train = run_script(["-m", "seg_accel", "train", str(config), "--work-dir", str(work)], cwd=REPO)
    assert train.returncode == 0, train.stderr[-3000:]
    unlabeled_images(tmp_path / "images", count=4)
    checkpoint = sorted(p for p in work.glob("iter_*") if p.is_dir())[-1]
    for source, out in (([str(config), str(checkpoint)], "a"), ([str(work / "final")], "b"), ([str(work)], "c")):
        proc = run_script(["-m", "seg_accel", "predict", *source, str(tmp_path / "images"), "--out",
                           str(tmp_path / out), "--no-overlays"], cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert not (tmp_path / out / "overlays").exists()
    for name in ("frame_000", "frame_001", "frame_002", "more/frame_003"):
        a, b, c = (np.asarray(Image.open(tmp_path / o / "labels" / f"{name}.png")) for o in "abc")
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_predict_errors_are_one_line(tmp_path):
    config, export = make_export(tmp_path)
    cases = [
        ([str(export), str(tmp_path / "nothing_here"), "--out", str(tmp_path / "o")], "INPUTS", "no such file"),
        ([str(config), str(tmp_path / "nothing_here"), "--out", str(tmp_path / "o")], "INPUTS",
         "needs a checkpoint"),
        ([str(export), str(export / "config.json"), "--out", str(tmp_path / "o"), "--opacity", "2"], "--opacity",
         "must be in [0, 1]"),
    ]
    for args, key, text in cases:
        proc = run_script(["-m", "seg_accel", "predict", *args], cwd=REPO)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and text in lines[0], proc.stderr
