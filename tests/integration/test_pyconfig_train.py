"""An MMSegmentation 1.x ``.py`` config trains on two processes, and the YAML that
``seg-accel convert-config`` writes from it trains to the same weights, bit for bit (same seed)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, script_env

CONFIG = REPO / "tests/data/mmseg_configs/1x/misc/tiny_segformer_synthetic.py"


def seg_accel(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seg_accel", *args], cwd=cwd, env=script_env(), capture_output=True,
                          text=True, timeout=600, start_new_session=True)


@pytest.mark.slow  # two two-process trainings, about 60 s
@pytest.mark.multiprocess
def test_the_converted_yaml_trains_bitwise_equal_to_the_py_on_two_processes(tmp_path):
    converted = tmp_path / "tiny_segformer_synthetic.yaml"
    run = seg_accel(["convert-config", str(CONFIG), "--out", str(converted)], tmp_path)
    assert run.returncode == 0, run.stderr
    text = converted.read_text()
    assert "# lr_config: from param_scheduler" in text and "# model: MixVisionTransformer + SegformerHead" in text
    weights, logs = [], []
    for name, config in (("py", CONFIG), ("yaml", converted)):
        run = seg_accel(["train", str(config), "--work-dir", str(tmp_path / name), "--num-processes", "2"], tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        logs.append(run.stdout + run.stderr)
        assert "2 process(es)" in logs[-1] and "Iter [6/6]" in logs[-1]
        weights.append(load_file(tmp_path / name / "final" / "model.safetensors"))
    assert "config: ignored (MMSegmentation's own machinery" in logs[0]  # the .py run says what it ignored
    assert "config: ignored" not in logs[1]  # the YAML has only seg-accel's keys left
    py, yml = weights
    assert py.keys() == yml.keys()
    assert all(torch.equal(py[k], yml[k]) for k in py)
    middle = load_file(tmp_path / "py" / "iter_3" / "model.safetensors")
    assert not all(torch.equal(middle[k], py[k]) for k in py)  # it trained after iteration 3
    # evaluate and param-groups take the .py as well
    run = seg_accel(["evaluate", str(CONFIG), str(tmp_path / "py"), "--num-processes", "2"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mIoU" in run.stdout + run.stderr
    run = seg_accel(["param-groups", str(CONFIG)], tmp_path)
    assert run.returncode == 0 and "custom_keys['head']" in run.stdout, run.stderr[-2000:]
