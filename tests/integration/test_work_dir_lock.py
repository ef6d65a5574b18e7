"""One training run per work dir (issue 23, finding 2): a second run on a work dir in use stops
with one line naming the holder and the first run's checkpoints stay intact; a lock left by a
run that is gone is taken over with one warning."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from seg_accel.runtime.checkpoints import complete_checkpoints
from seg_accel.runtime.manifest import verify
from tests.conftest import REPO, script_env, tiny_config, write_yaml

SLOW = textwrap.dedent("""
    import time

    from seg_accel.engine.hooks import Hook
    from seg_accel.registry import HOOKS


    @HOOKS.register()
    class Slow(Hook):
        def __init__(self, seconds: float):
            self.seconds = seconds

        def after_train_iter(self, runner):
            time.sleep(self.seconds)
""")


@pytest.mark.slow
def test_a_second_run_on_a_work_dir_in_use_stops_with_one_line_and_the_first_finishes_intact(tmp_path):
    import hashlib
    import json

    (tmp_path / "slow.py").write_text(SLOW)
    cfg = tiny_config(custom_imports={"imports": ["slow"]}, custom_hooks=[{"type": "Slow", "seconds": 1.5}],
                      checkpoint_config={"interval": 4, "max_keep_ckpts": -1})
    cfg["runner"]["max_iters"] = 12
    cfg["data"]["val"] = None
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    work = tmp_path / "work"
    command = [sys.executable, str(REPO / "scripts/train.py"), str(path), "--work-dir", str(work)]
    first = subprocess.Popen(command, cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    deadline = time.monotonic() + 120
    while not (work / ".seg_accel.lock").is_file() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.1)
    assert (work / ".seg_accel.lock").is_file(), first.communicate()[1][-2000:]
    holder = json.loads((work / ".seg_accel.lock").read_text())
    second = subprocess.run(command, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first run ended before the second was refused: make it slower"
    assert second.returncode == 2
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "in use by another training run" in lines[0] \
        and f"pid {holder['pid']}" in lines[0], second.stderr
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    names = sorted(p.name for p in complete_checkpoints(work))
    assert names == ["iter_12", "iter_4", "iter_8"], names
    for checkpoint in complete_checkpoints(work):
        assert verify(checkpoint) is None  # every file's size and sha256 as the run wrote it
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        for name, entry in manifest["files"].items():
            assert hashlib.sha256((checkpoint / name).read_bytes()).hexdigest() == entry["sha256"]
    assert "saved checkpoint" not in second.stdout and not (work / ".seg_accel.lock").exists()
    assert len(list(work.glob("*.log"))) == 1  # the refused run wrote no log of its own


@pytest.mark.slow
def test_a_lock_whose_holder_is_gone_is_taken_over_with_a_warning_and_another_hosts_is_not(tmp_path):
    import json

    cfg = tiny_config()
    cfg["runner"]["max_iters"] = 2
    cfg["data"]["val"] = None
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    work = tmp_path / "work"
    work.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    import socket

    (work / ".seg_accel.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                                      "started": "2026-01-01T00:00:00", "command": "seg-accel train"}))
    command = [sys.executable, str(REPO / "scripts/train.py"), str(path), "--work-dir", str(work)]
    taken = subprocess.run(command, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert taken.stdout.count("taking over the lock of a run that is gone") == 1
    assert not (work / ".seg_accel.lock").exists()
    (work / ".seg_accel.lock").write_text(json.dumps({"host": "another-host", "pid": 1, "started": "x"}))
    refused = subprocess.run(command, cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "pid 1 on another-host" in refused.stderr, refused.stderr
