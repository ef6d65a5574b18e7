"""Bad input exits with code 2 and one readable message naming the key and the file."""
from __future__ import annotations

from tests.conftest import REPO, run_script, tiny_config, write_yaml


def test_real_process_exit_code_and_no_traceback(tmp_path):
    cfg = tiny_config()
    cfg["optimzer"] = cfg.pop("optimizer")
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = run_script([str(REPO / "scripts/train.py"), str(path)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and "exp.yaml" in error_lines[0] and "optimzer" in error_lines[0]
    assert not (tmp_path / "work_dirs").exists()  # nothing was started


