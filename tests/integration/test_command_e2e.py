"""The ``seg-accel`` command as users run it: installed with ``pip install .`` into a fresh
environment, several processes from any directory, a bad config under a launcher, Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, script_env, tiny_config, write_yaml


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install .`` (a wheel built from the checkout, no editable link) into a new venv that
    borrows the dependencies (torch, accelerate, ...) of the project's environment."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    # --system-site-packages: what the base interpreter has (as scripts/setup.sh's .venv sees it)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # the project's packages, but not its editable seg_accel: only a path, whose .pth files are not read
    Path(site, "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return venv


def command(venv: Path, *args: str, cwd: Path, timeout: float = 600, **extra: str) -> subprocess.CompletedProcess:
    env = {**script_env(), **extra}
    env = {k: v for k, v in env.items() if v != ""}  # an empty value: not set
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
    return subprocess.run([str(venv / "bin" / "seg-accel"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.multiprocess
def test_pip_install_then_train_the_demo_on_two_processes_from_any_directory(installed, tmp_path):
    where = subprocess.run([str(installed / "bin" / "python"), "-c", "import seg_accel; print(seg_accel.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(installed)), where  # the installed wheel, not the checkout
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    proc = command(installed, "train", "configs/demo/segformer_synthetic.yaml", "--num-processes", "2",
                   "--cfg-options", "runner.max_iters=20", "data.val.num_samples=16", "log_config.interval=10",
                   cwd=elsewhere, OMP_NUM_THREADS="")  # as a user starts it: no thread setting of our own
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "Iter [20/20]" in proc.stdout
    from seg_accel.threads import available_cores

    budget = max(1, available_cores() // 2)  # the thread budget: the cores shared by the 2 processes
    assert f"threads: 2 process(es) x {budget} torch thread(s) ({available_cores()} core(s) / 2 process(es))" \
        in proc.stdout + proc.stderr
    work = elsewhere / "work_dirs" / "segformer_synthetic"
    assert (work / "final" / "model.safetensors").is_file() and (work / "eval_results.json").is_file()
    listed = command(installed, "list-configs", cwd=elsewhere)
    assert "demo/segformer_synthetic" in listed.stdout.split()


@pytest.mark.multiprocess
def test_a_bad_config_under_two_processes_is_one_line_and_exit_2(installed, tmp_path):
    cfg = tiny_config()
    cfg["optimizer"]["lr"] = "fast"
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = command(installed, "train", str(path), "--num-processes", "2", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines == [f"error: {path}: optimizer.lr: expected a number, got 'fast' (str)"]
    assert not (tmp_path / "work_dirs").exists()  # no process was started


PID_HOOK = textwrap.dedent("""
    import os

    from seg_accel.engine.hooks import Hook
    from seg_accel.registry import HOOKS


    @HOOKS.register()
    class NotePids(Hook):
        def before_run(self, runner):
            with open(f"pid_{runner.accelerator.process_index}", "w") as f:
                f.write(str(os.getpid()))
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split()[2] != "Z"


@pytest.mark.multiprocess
def test_ctrl_c_stops_every_process_with_one_line(tmp_path):
    (tmp_path / "pid_hooks.py").write_text(PID_HOOK)
    cfg = tiny_config(custom_imports={"imports": ["pid_hooks"]}, custom_hooks=[{"type": "NotePids"}],
                      checkpoint_config={"interval": 5})
    cfg["runner"]["max_iters"] = 100000
    cfg["data"]["val"] = None
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    work = tmp_path / "work"
    parent = subprocess.Popen([sys.executable, "-m", "seg_accel", "train", str(path), "--num-processes", "2",
                               "--work-dir", str(work)], cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              # a terminal's Ctrl-C reaches a foreground command; a test run started in the
                              # background (`cmd &` in a script) ignores SIGINT, and its children inherit that
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (work / "iter_10").is_dir() and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.2)
    assert (work / "iter_10").is_dir(), parent.communicate()[1][-3000:]
    pids = [int((tmp_path / f"pid_{rank}").read_text()) for rank in (0, 1)]
    os.killpg(parent.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground process group
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 130
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err
    final = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(final) == 1 and err.rstrip().endswith(final[0]), err[-600:]
    latest = max((p for p in work.glob("iter_*") if (p / "meta.json").is_file()), key=lambda p: int(p.name[5:]))
    assert f"the last checkpoint is {latest}" in final[0] and f"--resume-from {latest}" in final[0]
    assert not any(alive(pid) for pid in pids)
    assert not (work / "final").exists()


@pytest.mark.multiprocess
def test_accelerate_launch_module_and_evaluating_a_work_dir(tmp_path):
    """`accelerate launch -m seg_accel.train` trains on 2 processes; `seg-accel evaluate WORK_DIR`
    takes the run's config and final/ export and writes beside it; --num-processes 2 gives the
    same confusion matrix."""
    import json

    from tests.conftest import accelerate_launch, run_script

    cfg = tiny_config(checkpoint_config={"interval": 2})
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    work = tmp_path / "work"
    proc = accelerate_launch(["-m", "seg_accel.train", str(path), "--work-dir", str(work)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    one = run_script(["-m", "seg_accel", "evaluate", str(work)], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    results = json.loads((work / "eval" / "final" / "results.json").read_text())
    assert results["checkpoint"] == str(work / "final") and (work / "eval" / "final" / "results_iou.png").is_file()
    assert results["confusion_matrix"] == json.loads((work / "eval_results.json").read_text())["confusion_matrix"]
    two = run_script(["-m", "seg_accel", "evaluate", str(work), str(work / "iter_4"), "--num-processes", "2",
                      "--out", str(tmp_path / "two.json")], cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / "two.json").read_text())["confusion_matrix"] == results["confusion_matrix"]


@pytest.mark.multiprocess
def test_the_users_omp_num_threads_is_kept(tmp_path):
    cfg = tiny_config()
    cfg["runner"]["max_iters"] = 2
    cfg["data"]["val"] = None
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    env = {**script_env(), "OMP_NUM_THREADS": "3"}
    proc = subprocess.run([sys.executable, "-m", "seg_accel", "train", str(path), "--num-processes", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "threads: 2 process(es) x 3 torch thread(s) (OMP_NUM_THREADS set by you)" in output


def test_a_config_error_stops_the_launch_with_one_line(tmp_path):
    """--num-processes 2 checks the config while the launcher starts: an error is said once, by
    the parent, the launcher and its processes are stopped, nothing else is printed."""
    cfg = tiny_config()
    cfg["optimizer"]["lr"] = "fast"  # not a number: found by the full check, not by parsing
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "seg_accel", "train", str(path), "--num-processes", "2",
                           "--work-dir", str(tmp_path / "work")],
                          cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "optimizer" in lines[0], proc.stderr[-3000:]
    assert "threads:" not in proc.stdout + proc.stderr  # no process of the launch got to start training
