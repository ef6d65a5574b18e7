"""``seg-accel env`` and the one line for a library that fails to import (issue 23, finding 11: a
broken torchvision made every command fail with an 80-line transformers traceback that never
named torchvision)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import script_env, tiny_config, write_yaml

BROKEN = 'raise RuntimeError("operator torchvision::nms does not exist")\n'


def test_env_lists_the_libraries_and_whether_torch_and_torchvision_match(capsys):
    from seg_accel.cli import env_cli
    from seg_accel.cli.env import torchvision_matches

    assert env_cli([]) == 0
    out = capsys.readouterr().out
    from importlib.metadata import version

    assert f"torch                        {version('torch')}" in out and "devices: cpu" in out  # the distribution's version
    assert torchvision_matches("2.14.1", "0.29.1") and torchvision_matches("2.9.1+cpu", "0.24.1")
    assert torchvision_matches("2.13.0", "0.29.1") is False and torchvision_matches("?", "0.29") is None


@pytest.mark.slow
def test_a_broken_torchvision_is_one_line_naming_it_and_env(tmp_path):
    fakes = tmp_path / "fakes" / "torchvision"
    fakes.mkdir(parents=True)
    (fakes / "__init__.py").write_text(BROKEN)
    cfg = tiny_config()
    cfg["runner"]["max_iters"] = 1
    env = script_env(PYTHONPATH=str(tmp_path / "fakes"))
    proc = subprocess.run([sys.executable, "-m", "seg_accel", "train", str(write_yaml(tmp_path / "exp.yaml", cfg)),
                           "--work-dir", str(tmp_path / "work")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert "torchvision::nms does not exist" in lines[0] and "`seg-accel env`" in lines[0]
    shown = subprocess.run([sys.executable, "-m", "seg_accel", "env"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert shown.returncode == 0
    assert "does not import: RuntimeError: operator torchvision::nms does not exist" in shown.stdout, shown.stdout
