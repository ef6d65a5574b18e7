"""bench/gpu_check.sh's CPU-safe parts (its dry mode): arguments, configs and the table format;
the GPU-only sections say they were skipped."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

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
