"""Fault injection, each case a real run in a subprocess: a full disk (a small tmpfs) while a
checkpoint, the final export or the evaluation results are written, a read-only work dir, a
resume of another model, crafted pickles, each file of a checkpoint damaged in turn, an alias
bomb, and the Hub's failures. Every case checks the exit code, the one line, and that what was
complete before is intact (sha256)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, accelerate_launch, run_script, script_env, tiny_config, write_yaml
from tests.integration.test_resume_e2e import KILLER

TRAIN = str(REPO / "scripts/train.py")

FAULT_HOOKS = textwrap.dedent("""
    import os

    from seg_accel.engine.hooks import Hook
    from seg_accel.registry import HOOKS


    def fill(folder):
        with open(os.path.join(folder, "filler"), "ab") as f:
            try:
                while True:
                    f.write(b"\\0" * 65536)
                    f.flush()
            except OSError:
                pass


    @HOOKS.register()
    class FillDisk(Hook):
        \"\"\"Fills the file system of `folder` at iteration `at` (after_train_iter) or at the end.\"\"\"

        def __init__(self, folder: str, at: int = 0):
            self.folder, self.at = folder, at

        def after_train_iter(self, runner):
            if self.at and runner.iter == self.at:
                fill(self.folder)

        def after_run(self, runner):
            if not self.at:
                fill(self.folder)
""")


def sha256_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (``size`` bytes) mounted under tmp_path; skipped where mounting is not allowed."""
    mounts = []

    def mount(name: str, size: int) -> Path:
        point = tmp_path / name
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): a full disk needs one")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fault_config(tmp_path: Path, **keys) -> dict:
    (tmp_path / "fault_hooks.py").write_text(FAULT_HOOKS)
    cfg = tiny_config(custom_imports={"imports": ["fault_hooks"]}, **keys)
    cfg["runner"]["max_iters"] = 10
    return cfg


def train(tmp_path: Path, cfg: dict, work: Path, *extra: str, name: str = "exp") -> subprocess.CompletedProcess:
    path = write_yaml(tmp_path / f"{name}.yaml", cfg)
    return run_script([TRAIN, str(path), "--work-dir", str(work), *extra], cwd=tmp_path)


def test_disk_full_during_a_checkpoint(tmp_path, tmpfs):
    disk = tmpfs("checkpoints", 16 * 2**20)
    cfg = fault_config(tmp_path, checkpoint_config={"interval": 2, "out_dir": str(disk)},
                       custom_hooks=[{"type": "FillDisk", "folder": str(disk), "at": 6, "priority": 45}])
    proc = train(tmp_path, cfg, tmp_path / "work")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "could not write checkpoint iter_6" in lines[0] and "No space left" in lines[0], lines
    from seg_accel.runtime.manifest import verify

    assert sorted(p.name for p in disk.iterdir() if p.name != "filler") == ["iter_2", "iter_4"]  # no partial one
    assert verify(disk / "iter_2") is None and verify(disk / "iter_4") is None  # every file by its sha256
    assert lines[0].removeprefix("error: ") in next((tmp_path / "work").glob("*.log")).read_text()
    assert not (tmp_path / "work" / "final").exists()


def test_disk_full_during_the_final_export(tmp_path, tmpfs):
    disk = tmpfs("work", 4 * 2**20)
    cfg = fault_config(tmp_path, custom_hooks=[{"type": "FillDisk", "folder": str(disk), "priority": 75}])
    proc = train(tmp_path, cfg, disk)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and f"could not write the export {disk / 'final'}" in lines[0], lines
    assert not (disk / "final").exists() and not (disk / ".final.tmp").exists()  # nothing that looks exported
    assert json.loads((disk / "eval_results.json").read_text())["iter"] == 10  # the evaluation before it, whole


def test_disk_full_while_writing_the_evaluation_results(tmp_path, tmpfs):
    disk = tmpfs("work", 4 * 2**20)
    cfg = fault_config(tmp_path, evaluation={"interval": 4, "final": False},
                       custom_hooks=[{"type": "FillDisk", "folder": str(disk), "at": 8, "priority": 65}])
    proc = train(tmp_path, cfg, disk)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and f"could not write the evaluation results {disk / 'eval_results.json'}" in lines[0]
    assert json.loads((disk / "eval_results.json").read_text())["iter"] == 4  # the previous one, whole


def test_a_read_only_work_dir_is_one_line(tmp_path, tmpfs):
    disk = tmpfs("readonly", 2**20)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    proc = train(tmp_path, tiny_config(), disk / "work")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and str(disk / "work") in lines[0] and "Read-only file system" in lines[0], lines


def test_a_resume_of_another_model_keeps_the_runs_config(tmp_path):
    cfg = tiny_config(checkpoint_config={"interval": 2})
    cfg["runner"]["max_iters"] = 4
    work = tmp_path / "work"
    assert train(tmp_path, cfg, work).returncode == 0
    before = sha256_tree(work)
    other = tiny_config(checkpoint_config={"interval": 2})
    other["model"]["config"]["decoder_hidden_size"] = 48
    proc = train(tmp_path, other, work, "--resume-from", str(work / "iter_4"), name="other")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "iter_4 was made with another model" in lines[0] and "resume_from" in lines[0], lines
    after = sha256_tree(work)
    assert {k: after[k] for k in before} == before  # config.yaml, checkpoints, export: untouched
    assert [k for k in after if k not in before and not k.endswith((".log", ".log.json", ".config.yaml"))] == []


PAYLOAD = textwrap.dedent("""
    import os
    import sys

    import torch


    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sys.argv[2]}",))


    torch.save(Payload(), sys.argv[1])
""")


def plant(path: Path, marker: Path, tmp_path: Path) -> None:
    (tmp_path / "payload.py").write_text(PAYLOAD)
    subprocess.run([sys.executable, str(tmp_path / "payload.py"), str(path), str(marker)], check=True)


@pytest.mark.slow  # CI runs it in its slow step (keeps the README test command under 10 min)
def test_crafted_pickles_never_run(tmp_path):
    """The payload of the report (``custom_checkpoint_0.pkl``, run by the old auto_resume) and the
    same in the RNG and optimizer files: with the manifest as written the checkpoint is refused as
    damaged; with a manifest forged to match, the files are read with ``weights_only=True`` and
    refused. load_from and evaluate read safetensors only. The marker never appears."""
    cfg = tiny_config(checkpoint_config={"interval": 2})
    cfg["runner"]["max_iters"] = 4
    work = tmp_path / "work"
    assert train(tmp_path, cfg, work).returncode == 0
    marker = tmp_path / "PWNED"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        plant(work / "iter_4" / name, marker, tmp_path)
    resumed = train(tmp_path, {**cfg, "auto_resume": True}, work, name="again")
    assert resumed.returncode == 0 and "auto_resume: skipping iter_4" in resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "iter_2" in resumed.stdout
    assert not marker.exists()
    from seg_accel.runtime.manifest import write_manifest

    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):  # the run above saved it anew
        plant(work / "iter_4" / name, marker, tmp_path)
    write_manifest(work / "iter_4")  # forged to match the payloads
    forged = train(tmp_path, cfg, work, "--resume-from", str(work / "iter_4"), name="forged")
    assert forged.returncode == 2 and len(error_lines(forged)) == 1 and "Traceback" not in forged.stderr
    loaded = train(tmp_path, cfg, tmp_path / "load", "--load-from", str(work / "iter_4"), name="load")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    evaluated = run_script(["-m", "seg_accel", "evaluate", str(tmp_path / "forged.yaml"), str(work / "iter_4"),
                            "--out", str(tmp_path / "e.json")], cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert not marker.exists()


def damage(path: Path) -> None:
    if path.suffix == ".json":
        path.write_text("{ damaged")
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # truncated


@pytest.mark.slow  # CI runs it in its slow step (keeps the README test command under 10 min)
@pytest.mark.multiprocess
def test_each_damaged_file_of_the_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    (tmp_path / "killers.py").write_text(KILLER)
    cfg = tiny_config(custom_imports={"imports": ["killers"]}, checkpoint_config={"interval": 5})
    cfg["runner"]["max_iters"] = 15
    cfg["data"]["val"] = None
    whole = accelerate_launch([TRAIN, str(write_yaml(tmp_path / "a.yaml", cfg)), "--work-dir", str(tmp_path / "A")],
                              cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected = load_file(str(tmp_path / "A" / "final" / "model.safetensors"))
    killed_cfg = {**cfg, "custom_hooks": [{"type": "KillAfterCheckpoint", "at": 10, "priority": 55}]}
    killed = accelerate_launch([TRAIN, str(write_yaml(tmp_path / "b.yaml", killed_cfg)), "--work-dir",
                                str(tmp_path / "B")], cwd=tmp_path)
    assert killed.returncode != 0 and (tmp_path / "B" / "iter_10" / "manifest.json").is_file()
    names = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "random_states_1.pkl", "runner_state.json",
             "meta.json", "manifest.json"]
    assert set(names) <= {p.name for p in (tmp_path / "B" / "iter_10").iterdir()}
    resume = write_yaml(tmp_path / "resume.yaml", {**cfg, "auto_resume": True})
    for name in names:
        work = tmp_path / f"B_{name}"
        shutil.copytree(tmp_path / "B", work)
        damage(work / "iter_10" / name)
        proc = accelerate_launch([TRAIN, str(resume), "--work-dir", str(work)], cwd=tmp_path)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, (name, output[-3000:])
        warnings = [line for line in output.splitlines() if "auto_resume: skipping" in line]
        assert len(warnings) == 1 and "iter_10" in warnings[0], (name, warnings)
        assert "continuing at iteration 6" in output, name
        final = load_file(str(work / "final" / "model.safetensors"))
        assert all(torch.equal(final[k], expected[k]) for k in expected), name  # bitwise the uninterrupted run


def test_an_alias_bomb_config_is_refused_fast_and_small(tmp_path):
    lines = ["a0: &a0 [" + ",".join(["x"] * 10) + "]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1024
    # measured by a wrapper whose only child is the command: its peak memory and CPU time (CPU time,
    # not wall time, which a busy machine inflates)
    wrapper = textwrap.dedent(f"""
        import json, resource, subprocess, sys
        proc = subprocess.run([sys.executable, "-m", "seg_accel", "train", {str(path)!r}], capture_output=True, text=True)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(json.dumps({{"rc": proc.returncode, "stderr": proc.stderr, "cpu": usage.ru_utime + usage.ru_stime,
                          "maxrss_kib": usage.ru_maxrss}}))
    """)
    out = subprocess.run([sys.executable, "-c", wrapper], cwd=tmp_path, env=script_env(), capture_output=True,
                         text=True, timeout=120)
    measured = json.loads(out.stdout)
    assert measured["rc"] == 2 and [line for line in measured["stderr"].splitlines() if line] == [
        f"error: {path}: the YAML expands to more than 100,000 values (MAX_CONFIG_VALUES): aliases (*name) repeat "
        "their anchor's content; a config is far smaller"]
    assert measured["cpu"] < 2 and measured["maxrss_kib"] < 200 * 1024, measured


# --------------------------------------------------------------------------- the Hub
def test_push_to_a_new_branch_and_without_a_token(tmp_path, hub_server, monkeypatch):
    cfg = tiny_config()
    cfg["runner"]["max_iters"] = 2
    work = tmp_path / "work"
    assert train(tmp_path, cfg, work).returncode == 0
    pushed = run_script(["-m", "seg_accel", "push", str(work), "tester/branchy", "--revision", "iter100"],
                        cwd=tmp_path, HF_HUB_OFFLINE="0")
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    assert "model.safetensors" in hub_server.branch_files("tester/branchy", "iter100")
    assert "model.safetensors" not in hub_server.files("tester/branchy")  # main has the initial commit only
    env = {"HF_HUB_OFFLINE": "0", "HF_TOKEN": ""}
    tokenless = run_script(["-m", "seg_accel", "push", str(work), "tester/other", "--retries", "1"], cwd=tmp_path,
                           **env)
    output = tokenless.stdout + tokenless.stderr
    assert tokenless.returncode == 1
    assert "no valid access token: set HF_TOKEN or run `hf auth login`" in output
    assert "Training goes on" not in output  # no training here


def test_the_token_leaves_in_no_commit_message_and_no_local_path_is_uploaded(tmp_path, hub_server):
    from tests.hub_server import HF_TEST_TOKEN

    cfg = tiny_config(push_to_hub={"repo_id": "tester/leaky", "commit_message": f"run by {HF_TEST_TOKEN} ({{name}})"})
    cfg["runner"]["max_iters"] = 2
    work = tmp_path / "work"
    proc = run_script([TRAIN, str(write_yaml(tmp_path / "c.yaml", cfg)), "--work-dir", str(work)], cwd=tmp_path,
                      HF_HUB_OFFLINE="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    titles = [title for title, _ in hub_server.commit_history("tester/leaky")]
    assert titles and all(HF_TEST_TOKEN not in title for title in titles) and "<redacted" in titles[-1]
    uploaded = hub_server.files("tester/leaky")["training_config.yaml"].decode()
    assert str(tmp_path) not in uploaded and "work_dir: ." in uploaded


@pytest.mark.slow
def test_disk_full_during_predict_leaves_no_partial_file_and_earlier_outputs_intact(tmp_path, tmpfs):
    """Issue 23, finding 3: a full disk while predict writes probability maps."""
    import numpy as np
    from PIL import Image

    from tests.unit.test_evaluate import save_tiny_model

    save_tiny_model(tmp_path / "export")
    rng = np.random.default_rng(0)
    for name in ["first", *(f"img_{i:02d}" for i in range(12))]:
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    disk = tmpfs("out", 640 * 1024)
    predict = [sys.executable, "-m", "seg_accel", "predict", str(tmp_path / "export")]
    probs = ["--out", str(disk), "--probs", "npy", "--probs-dtype", "float32", "--no-overlays"]
    first = subprocess.run([*predict, str(tmp_path / "first.png"), *probs], cwd=tmp_path, env=script_env(),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    before = sha256_tree(disk)
    inputs = [str(tmp_path / f"img_{i:02d}.png") for i in range(12)]  # 12 x 64 KiB of float32 maps: more than fits
    full = subprocess.run([*predict, *inputs, *probs], cwd=tmp_path, env=script_env(), capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 1 and "Traceback" not in full.stderr, full.stderr[-3000:]
    lines = error_lines(full)
    assert len(lines) == 1 and "could not write" in lines[0] and "No space left on device" in lines[0], lines
    assert str(disk) in lines[0]  # names the file
    after = sha256_tree(disk)
    assert {k: after[k] for k in before} == before  # the earlier outputs, byte for byte
    assert not [name for name in after if Path(name).name.startswith(".")]  # no temporary file left
    for name in after:
        if name.endswith(".npy"):
            assert np.load(disk / name).shape == (4, 64, 64)  # every map there is whole


# --------------------------------------------------------------------------- multi-process faults
RANK_FAULTS = textwrap.dedent("""
    import os
    import signal
    import time

    from seg_accel.engine.hooks import Hook
    from seg_accel.registry import HOOKS, TRANSFORMS


    @HOOKS.register()
    class KillRank(Hook):
        \"\"\"SIGKILL process `rank` after iteration `at`; every iteration takes `seconds` at least.\"\"\"

        def __init__(self, at: int = 0, rank: int = 1, seconds: float = 0.0):
            self.at, self.rank, self.seconds = at, rank, seconds

        def after_train_iter(self, runner):
            time.sleep(self.seconds)
            if self.at and runner.iter == self.at and runner.accelerator.process_index == self.rank:
                os.kill(os.getpid(), signal.SIGKILL)


    @TRANSFORMS.register()
    class KillRankOne:
        \"\"\"In the evaluation of process 1: SIGKILL at its first image.\"\"\"

        def __call__(self, results, rng):
            if os.environ.get("RANK") == "1":
                os.kill(os.getpid(), signal.SIGKILL)
            return results
""")


def rank_fault_run(tmp_path: Path, **hook) -> tuple[list[str], Path, Path]:
    (tmp_path / "rank_faults.py").write_text(RANK_FAULTS)
    cfg = tiny_config(custom_imports={"imports": ["rank_faults"]}, checkpoint_config={"interval": 2},
                      custom_hooks=[{"type": "KillRank", **hook}])
    cfg["runner"]["max_iters"] = 12
    cfg["data"]["val"] = None
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    work = tmp_path / "work"
    return [sys.executable, "-m", "seg_accel", "train", str(path), "--num-processes", "2", "--work-dir", str(work)], \
        path, work


def one_error_line(proc_stderr: str) -> str:
    assert "Traceback" not in proc_stderr and "ChildFailedError" not in proc_stderr, proc_stderr[-3000:]
    assert "torch/distributed/elastic" not in proc_stderr, proc_stderr[-3000:]  # the launcher's log lines
    lines = [line for line in proc_stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_training_rank_killed_is_one_line_with_the_resume_command(tmp_path):
    command, path, work = rank_fault_run(tmp_path, at=5, rank=1)
    proc = subprocess.run(command, cwd=tmp_path, env=script_env(PYTHONPATH=str(tmp_path)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1
    line = one_error_line(proc.stderr)
    assert line == (f"error: process 1 of 2 was killed (SIGKILL): every process stopped; the last checkpoint is "
                    f"{work / 'iter_4'}. Resume with: seg-accel train {path} --work-dir {work} --resume-from "
                    f"{work / 'iter_4'} (or --auto-resume)"), line
    from seg_accel.runtime.manifest import verify

    assert verify(work / "iter_2") is None and verify(work / "iter_4") is None


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_to_the_parent_stops_every_process_with_one_line(tmp_path):
    import signal
    import time

    command, path, work = rank_fault_run(tmp_path, seconds=0.5)
    proc = subprocess.Popen(command, cwd=tmp_path, env=script_env(PYTHONPATH=str(tmp_path)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (work / "iter_2" / "manifest.json").is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    line = one_error_line(err)
    assert line.startswith("error: terminated (SIGTERM to seg-accel): every process stopped; the last checkpoint is ")
    assert f"--resume-from {work}/iter_" in line, line
    from seg_accel.runtime.checkpoints import complete_checkpoints
    from seg_accel.runtime.manifest import verify

    assert complete_checkpoints(work) and all(verify(p) is None for p in complete_checkpoints(work))
    time.sleep(1)
    leftover = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "processes of the run outlived it"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_an_evaluation_rank_killed_is_one_line(tmp_path):
    (tmp_path / "rank_faults.py").write_text(RANK_FAULTS)
    cfg = tiny_config(checkpoint_config={"interval": 2})
    cfg["runner"]["max_iters"] = 2
    trained = run_script([TRAIN, str(write_yaml(tmp_path / "exp.yaml", cfg)), "--work-dir", str(tmp_path / "work")],
                         cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    cfg["custom_imports"] = {"imports": ["rank_faults"]}
    cfg["data"]["val"]["pipeline"] = [{"type": "KillRankOne"}, *cfg["data"]["val"]["pipeline"]]
    path = write_yaml(tmp_path / "eval.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "seg_accel", "evaluate", str(path), str(tmp_path / "work" / "iter_2"),
                           "--num-processes", "2"], cwd=tmp_path, env=script_env(PYTHONPATH=str(tmp_path)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert one_error_line(proc.stderr) == "error: process 1 of 2 was killed (SIGKILL): every process stopped"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_config_mistake_found_when_the_processes_build_the_model_is_one_line_and_exit_2(tmp_path):
    cfg = tiny_config()
    cfg["model"]["pretrained"] = "nobody/no-such-model"
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "seg_accel", "train", str(path), "--num-processes", "2",
                           "--work-dir", str(tmp_path / "work")], cwd=tmp_path, env=script_env(HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line.startswith(f"error: {path}: model.pretrained: cannot load pretrained model 'nobody/no-such-model'")


def test_torch_save_on_a_full_disk_says_no_space_left(tmp_path, tmpfs):
    """Issue 23, finding 7: a full disk during the optimizer's torch.save said torch's
    "enforce fail ... unexpected pos" instead of "No space left on device"."""
    from seg_accel.runtime.storage import write_failure

    disk = tmpfs("small", 256 * 1024)
    with pytest.raises(Exception) as info:  # torch raises RuntimeError with its zip writer's message
        torch.save({"state": torch.zeros(1024, 1024)}, disk / "optimizer.bin")
    assert "No space left on device" in write_failure(info.value), str(info.value)


def test_a_path_over_the_name_limit_is_one_line(tmp_path, capsys):
    from seg_accel.cli import train_cli

    cfg = tiny_config()
    cfg["runner"]["max_iters"] = 1
    code = train_cli([str(write_yaml(tmp_path / "exp.yaml", cfg)), "--work-dir", str(tmp_path / ("w" * 300))])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 1 and len(err) == 1 and "File name too long" in err[0], err


@pytest.mark.slow
def test_export_onnx_on_a_full_disk_says_so_and_leaves_no_file(tmp_path, tmpfs):
    """Issue 23, finding 8: a full (or read-only) disk during export-onnx was reported as "cannot
    export ... try --exporter torchscript"."""
    pytest.importorskip("onnxruntime")
    from tests.unit.test_evaluate import save_tiny_model

    save_tiny_model(tmp_path / "export")
    disk = tmpfs("onnx", 64 * 1024)  # the tiny SegFormer's graph is ~0.5 MB
    proc = subprocess.run([sys.executable, "-m", "seg_accel", "export-onnx", str(tmp_path / "export"), "--out",
                           str(disk / "model.onnx"), "--size", "32", "32", "--exporter", "torchscript"],
                          cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc)
    assert len(lines) == 1 and "No space left on device" in lines[0] and "try --exporter" not in lines[0], lines
    assert list(disk.iterdir()) == []  # nothing half-written, no temporary folder
