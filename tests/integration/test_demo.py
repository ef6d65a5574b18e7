"""The README's demo: 2 processes on CPU, final mIoU of at least 80% (slow: about 2.5 minutes)."""
from __future__ import annotations

import json

import pytest

from seg_accel.engine import EVAL_RESULTS
from tests.conftest import REPO, accelerate_launch, run_script


@pytest.mark.slow
@pytest.mark.multiprocess
def test_demo_reaches_80_miou_on_two_processes(tmp_path):
    proc = accelerate_launch([str(REPO / "scripts/train.py"), str(REPO / "configs/demo/segformer_synthetic.yaml"),
                              "--work-dir", str(tmp_path / "work")], cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es), MULTI_CPU" in proc.stdout
    results = json.loads((tmp_path / "work" / EVAL_RESULTS).read_text())
    assert results["num_processes"] == 2
    assert results["metrics"]["mIoU"] >= 80.0, results["metrics"]
    assert f"mIoU: {results['metrics']['mIoU']:.2f}" in proc.stdout  # the number the user sees

    # the number reported during training is the number the exported model gets on its own
    # (BatchNorm statistics are per process under DDP: process 0's are used for both)
    evaluated = run_script([str(REPO / "scripts/evaluate.py"), str(REPO / "configs/demo/segformer_synthetic.yaml"),
                            str(tmp_path / "work" / "final"), "--out", str(tmp_path / "eval.json")], cwd=REPO)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval.json").read_text())["confusion_matrix"] == results["confusion_matrix"]


@pytest.mark.slow  # about 3.5 minutes on 2 cores
@pytest.mark.multiprocess
def test_the_mask2former_demo_reaches_80_miou_on_two_processes(tmp_path):
    """docs/models.md: the small Mask2Former of configs/demo/mask2former_synthetic.yaml learns the
    shapes in 1000 iterations (90.58 mIoU when measured; 80 is the bar)."""
    proc = accelerate_launch([str(REPO / "scripts/train.py"), str(REPO / "configs/demo/mask2former_synthetic.yaml"),
                              "--work-dir", str(tmp_path / "work")], cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "the final decoder layer and 4 auxiliary layers" in proc.stdout
    results = json.loads((tmp_path / "work" / EVAL_RESULTS).read_text())
    assert results["num_processes"] == 2 and results["metrics"]["mIoU"] >= 80.0, results["metrics"]
