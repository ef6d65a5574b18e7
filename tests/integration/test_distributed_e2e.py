"""Scale-out correctness: 1 vs 2 processes, two "machines" on loopback, a failing or hanging
process, sync_bn. Every run here is a real ``accelerate launch`` (gloo on CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    REPO,
    _free_port,
    accelerate_launch,
    run_script,
    script_env,
    tiny_config,
    write_yaml,
)

pytestmark = pytest.mark.multiprocess

ITERS = 10
# Why not bitwise: float32 sums in another order (one backward over 4 images vs two over 2
# images, then gloo's all-reduce) differ in the last bits (~1e-7 relative). AdamW's step is
# lr * m / (sqrt(v) + eps): for almost every weight that is a ~1e-7 relative change of a step
# of ~lr = 1e-3 (measured: ~1e-7 after 10 iterations). A weight whose gradient nearly cancels
# to the size of eps = 1e-8 is the exception: there the step depends on g / eps, and rounding
# noise of ~1e-10 on such a gradient moves it by up to lr * 1e-10 / eps = 1e-5. Measured here:
# 1.3e-6 on one weight (stage 4's patch embedding, at the first steps), 1.2e-7 on every other;
# the weights move by ~1.5e-3 between iterations 5 and 10, and per-process BatchNorm moves
# them apart by far more than ATOL (the control run below).
ATOL = 1e-5


def equivalence_config(samples_per_gpu: int, norm_eval: bool = True) -> dict:
    """Tiny SegFormer, dropout and stochastic depth off (their masks come from each process's
    own RNG), BatchNorm (the decode head's) in eval mode, class-weighted CE, grad clipping,
    random flips (seeded by the sample's global position, so the same on any process count)."""
    cfg = tiny_config(checkpoint_config={"interval": 5})
    cfg["model"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  classifier_dropout_prob=0.0, drop_path_rate=0.0)
    cfg["model"]["norm_eval"] = norm_eval
    cfg["model"]["decode_head"] = {"loss_decode": {"type": "CrossEntropyLoss", "class_weight": [0.5, 1.0, 2.0, 1.5]}}
    cfg["optimizer_config"] = {"grad_clip": {"max_norm": 0.5, "norm_type": 2}}
    cfg["data"]["samples_per_gpu"] = samples_per_gpu
    cfg["runner"]["max_iters"] = ITERS
    cfg["log_config"] = {"interval": 5}
    del cfg["data"]["val"]
    return cfg


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> Path:
    """The reference: 2 processes x 2 images, 10 iterations."""
    tmp = tmp_path_factory.mktemp("two")
    path = write_yaml(tmp / "exp.yaml", equivalence_config(2))
    proc = accelerate_launch([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp / "work")], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "model.norm_eval: 1 BatchNorm layer(s)" in proc.stdout
    return tmp / "work"


def test_one_and_two_processes_give_the_same_weights(tmp_path, two_process_run):
    path = write_yaml(tmp_path / "exp.yaml", equivalence_config(4))
    proc = run_script([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "one")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = weights(tmp_path / "one" / "iter_10"), weights(two_process_run / "iter_10")
    initial = weights(tmp_path / "one" / "iter_5")
    difference = max_difference(one, two)
    print(f"max |w1 - w2| after {ITERS} iterations: {difference:.3g}")
    assert difference <= ATOL
    assert max_difference(one, initial) > 1e-3  # the weights did move: the comparison means something

    # control: the same comparison with the decode head's BatchNorm in training mode (statistics
    # of 4 images on 1 process, of 2 on each of 2): the runs drift apart far beyond ATOL
    path = write_yaml(tmp_path / "bn1.yaml", equivalence_config(4, norm_eval=False))
    proc = run_script([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "bn1")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = write_yaml(tmp_path / "bn2.yaml", equivalence_config(2, norm_eval=False))
    proc = accelerate_launch([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "bn2")],
                             cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    drift = max_difference(weights(tmp_path / "bn1" / "iter_10"), weights(tmp_path / "bn2" / "iter_10"))
    print(f"with per-process BatchNorm statistics: {drift:.3g}")
    assert drift > 10 * ATOL


def test_two_machines_on_loopback_match_the_single_node_run(tmp_path, two_process_run):
    """``num_machines: 2`` with one process each, ranks 0 and 1, main process on 127.0.0.1."""
    path = write_yaml(tmp_path / "exp.yaml", equivalence_config(2))
    port = str(_free_port())
    launches = []
    for machine_rank in (0, 1):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "accelerate_config.yaml"), "--num_machines", "2", "--machine_rank", str(machine_rank),
                   "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                   str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "work")]
        launches.append(subprocess.Popen(command, cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, start_new_session=True))
    outputs = [p.communicate(timeout=300) for p in launches]
    for p, (out, err) in zip(launches, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "2 process(es)" in outputs[0][0]
    for name in ("iter_5", "iter_10", "final"):
        assert max_difference(weights(tmp_path / "work" / name), weights(two_process_run / name)) == 0.0, name


FAULT_HOOKS = '''
import os
import time

from seg_accel.engine.hooks import Hook
from seg_accel.registry import HOOKS


@HOOKS.register()
class FailOnRank(Hook):
    """Raises (or, with hang, sleeps) on one process at one iteration; notes each process's pid."""

    def __init__(self, rank=1, at=5, hang=0.0, pid_dir="."):
        self.rank, self.at, self.hang, self.pid_dir = rank, at, hang, pid_dir

    def before_run(self, runner):
        with open(os.path.join(self.pid_dir, f"pid_{runner.accelerator.process_index}"), "w") as f:
            f.write(str(os.getpid()))

    def after_train_iter(self, runner):
        if runner.iter == self.at and runner.accelerator.process_index == self.rank:
            if self.hang:
                time.sleep(self.hang)
            raise RuntimeError(f"planted failure on rank {self.rank} at iteration {self.at}")
'''


def run_with_fault(tmp_path: Path, **hook) -> subprocess.CompletedProcess:
    (tmp_path / "fault_hooks.py").write_text(FAULT_HOOKS)
    timeout = hook.pop("timeout", 20)
    cfg = tiny_config(custom_imports={"imports": ["fault_hooks"]},
                      custom_hooks=[{"type": "FailOnRank", "pid_dir": str(tmp_path), **hook}])
    cfg["runner"]["max_iters"] = 50
    cfg["dist_timeout"] = timeout
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    # The limit that matters is the launch's timeout: 120 s, generous for a loaded machine, and far
    # below the hang (300 s) that the timeout test plants: a run that ends before it was stopped
    # by the failure (or by dist_timeout), not by the planted hang finishing.
    return accelerate_launch([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "work")],
                             cwd=tmp_path, timeout=120)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_failing_process_stops_every_process_and_its_error_is_shown_once(tmp_path):
    proc = run_with_fault(tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    pids = [int((tmp_path / f"pid_{rank}").read_text()) for rank in (0, 1)]
    assert not any(alive(pid) for pid in pids)  # nothing left running
    assert output.count("RuntimeError: planted failure on rank 1 at iteration 5") == 1, output[-4000:]
    assert "error: process 1 of 2: failed; the other processes are stopped." in output
    assert "Traceback" in output and "fault_hooks.py" in output  # the failing process's traceback
    # process 0 says in one line why it stopped (or was stopped by the launcher before it could)
    assert output.count("error: process 0 of 2") <= 1
    assert "process 0 of 2: failed" not in output
    assert (tmp_path / "work" / "final").exists() is False  # no export pretends the run finished


def test_a_hanging_process_fails_the_run_after_dist_timeout(tmp_path):
    proc = run_with_fault(tmp_path, hang=300, timeout=5)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "dist_timeout: a collective operation fails after 5 s" in output
    assert "error: process 0 of 2: stopped: a collective operation timed out" in output, output[-3000:]
    pids = [int((tmp_path / f"pid_{rank}").read_text()) for rank in (0, 1)]
    assert not any(alive(pid) for pid in pids)


def sync_bn_config() -> dict:
    cfg = tiny_config(sync_bn=True)
    cfg["runner"]["max_iters"] = 2
    return cfg


def test_sync_bn_on_two_cpu_processes_keeps_batchnorm_and_says_so_once(tmp_path):
    path = write_yaml(tmp_path / "exp.yaml", sync_bn_config())
    proc = accelerate_launch([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "work")],
                             cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert output.count("sync_bn: SyncBatchNorm runs on GPUs only (NCCL); this cpu run keeps its 1 BatchNorm") == 1
    log = next((tmp_path / "work").glob("*.log")).read_text()
    assert log.count("sync_bn:") == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm needs 2 GPUs (this machine has "
                                                          f"{torch.cuda.device_count()})")
def test_sync_bn_on_two_gpus(tmp_path):
    path = write_yaml(tmp_path / "exp.yaml", sync_bn_config())
    proc = accelerate_launch([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "work")],
                             cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "converted to SyncBatchNorm across 2 processes" in proc.stdout + proc.stderr


