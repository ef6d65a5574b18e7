"""bench/gpu_check.sh's CPU-safe parts (its dry mode): arguments, configs and the table format;
the GPU-only sections say they were skipped."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_prints_its_tables(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + (tmp_path / "gpu_check_stderr.log").read_text()[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| model | precision | channels_last | compile | images/s | step (ms) | vs fp32 eager |" in table
    rows = [line for line in table.splitlines() if line.startswith("| SegFormer-B0 |")]
    assert [row.split(" | ")[1:3] for row in rows] == [["fp32", "no"], ["fp32", "yes"], ["bf16", "no"], ["bf16", "yes"]]
    for row in rows:
        images_per_second = float(row.split(" | ")[4])
        assert images_per_second > 0
    assert rows[0].split(" | ")[6] == "1.00x"
    for section in ("fp16 overflow", "sync_bn on one process", "e2e on the GPU"):
        assert f"### {section}" in table
    assert table.count("skipped: ") == 3


def test_gpu_check_refuses_a_real_run_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OUT": ""})
    assert proc.returncode == 2 and "no GPU here: run with --dry" in proc.stderr


def import_e2e():
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import e2e
    finally:
        sys.path.remove(str(REPO / "bench"))
    return e2e


def test_the_e2e_recipe_is_the_examples():
    """bench/e2e.py trains seg-accel with the example loop's recipe: the CamVid config with the
    example's augmentation (antialiased random scale, random crop without cat_max_ratio, flip,
    no PhotoMetricDistortion), no gradient clipping, cross-entropy over the labelled pixels."""
    from seg_accel.config.loader import load_config

    e2e = import_e2e()
    cfg = load_config(e2e.CONFIG, list(e2e.EXAMPLE_RECIPE)).dict
    steps = cfg["data"]["train"]["pipeline"]
    assert [s["type"] for s in steps] == ["RandomResize", "RandomCrop", "RandomFlip", "Normalize", "Pad"]
    assert steps[0]["ratio_range"] == [0.5, 2.0] and steps[0]["antialias"] is True
    assert steps[1].get("cat_max_ratio", 1.0) == 1.0 and steps[1]["crop_size"] == [256, 256]
    assert cfg["optimizer_config"]["grad_clip"] is None
    assert cfg["model"]["decode_head"]["loss_decode"]["avg_non_ignore"] is True
    assert cfg["optimizer"]["lr"] == 1e-3 and cfg["data"]["samples_per_gpu"] == 4
    from seg_accel.validate import validate_train_config

    validate_train_config(load_config(e2e.CONFIG, [*e2e.EXAMPLE_RECIPE, "data.train.data_root=.",
                                                   "data.val.data_root=."]))  # every component checks out


@pytest.mark.slow
def test_the_example_loops_schedule_ends_at_its_last_iteration_on_2_processes(camvid, tmp_path):
    """The example-style baseline prepares its scheduler with Accelerate, which steps it once per
    process at each call; the schedule counts its steps times the processes (as transformers'
    example scripts do), so on 2 processes its lr falls linearly over all iterations, as
    seg-accel's poly schedule does, instead of reaching its end halfway."""
    result = import_e2e().run_example(camvid, 4, 2, tmp_path / "example.json", timeout=600)  # as the bench runs it
    assert result["processes"] == 2
    expected = [(1e-3 - 1e-7) * (1 - i / 4) + 1e-7 for i in range(4)]  # transformers' polynomial, power 1
    assert result["lrs"] == pytest.approx(expected, rel=1e-6)
