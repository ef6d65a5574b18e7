"""Checkpoints and exact resume (docs/behaviour.md section 7, 12)."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from seg_accel.runtime.checkpoints import latest_checkpoint
from tests.conftest import (
    NORMALIZE,
    REPO,
    accelerate_launch,
    make_trainer,
    run_script,
    tiny_config,
    write_yaml,
)
from tests.parquet_data import CLASSES, write_parquet_dataset

KILLER = textwrap.dedent("""
    import os
    import signal

    from seg_accel.engine.hooks import Hook
    from seg_accel.registry import HOOKS


    @HOOKS.register()
    class KillAfterCheckpoint(Hook):
        \"\"\"SIGKILL the whole run right after the checkpoint of iteration `at` is complete.\"\"\"

        def __init__(self, at: int):
            self.at = at

        def after_train_iter(self, runner):
            if runner.iter == self.at and (runner.checkpoint_dir / f"iter_{self.at}" / "meta.json").is_file():
                runner.accelerator.wait_for_everyone()
                os.killpg(os.getpgrp(), signal.SIGKILL)


    @HOOKS.register()
    class KillInsideSave(Hook):
        \"\"\"SIGKILL in the middle of the save of iteration `at`: after Accelerate wrote the state,
        before the folder is renamed to its final name.\"\"\"

        def __init__(self, at: int):
            self.at = at

        def before_run(self, runner):
            original = runner.accelerator.save_state

            def save_state(output_dir, *args, **kwargs):
                original(output_dir, *args, **kwargs)
                if runner.iter == self.at:
                    os.kill(os.getpid(), signal.SIGKILL)

            runner.accelerator.save_state = save_state


    @HOOKS.register()
    class KillAfterIteration(Hook):
        \"\"\"SIGKILL right after every other hook of iteration `at` has run (priority 99).\"\"\"

        priority = 99

        def __init__(self, at: int):
            self.at = at

        def after_train_iter(self, runner):
            if runner.iter == self.at:
                os.kill(os.getpid(), signal.SIGKILL)
""")


def json_records(work_dir):
    records = []
    for path in sorted(work_dir.glob("*.log.json")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["mode"] == "train"]


def killed_and_resumed(tmp_path, cfg: dict, at: int, last: int, keys: tuple[str, ...]):
    """Train ``cfg`` on 2 processes uninterrupted (work dir A) and again killed by SIGKILL right
    after the checkpoint of iteration ``at``, then resumed (B); the final weights are bitwise
    equal and so are the logged ``keys`` of iterations ``at + 1 .. last``. ``cfg`` imports the
    module ``killers`` (KILLER). Returns the path of A's config."""
    train = str(REPO / "scripts/train.py")
    (tmp_path / "killers.py").write_text(KILLER)
    path_a = write_yaml(tmp_path / "a.yaml", cfg)
    run_a = accelerate_launch([train, str(path_a), "--work-dir", str(tmp_path / "A")], cwd=tmp_path)
    assert run_a.returncode == 0, run_a.stdout[-3000:] + run_a.stderr[-3000:]
    path_b = write_yaml(tmp_path / "b.yaml", {**cfg, "custom_hooks": [{"type": "KillAfterCheckpoint", "at": at,
                                                                      "priority": 55}]})
    killed = accelerate_launch([train, str(path_b), "--work-dir", str(tmp_path / "B")], cwd=tmp_path)
    assert killed.returncode != 0 and latest_checkpoint(tmp_path / "B").name == f"iter_{at}"
    resumed = accelerate_launch([train, str(path_b), "--work-dir", str(tmp_path / "B"), "--cfg-options",
                                 "custom_hooks=[]", "auto_resume=true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"continuing at iteration {at + 1}" in resumed.stdout
    a = load_file(str(tmp_path / "A" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "B" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    logged_a = {r["iter"]: r for r in json_records(tmp_path / "A")}
    logged_b = {r["iter"]: r for r in json_records(tmp_path / "B")}
    for i in range(at + 1, last + 1):
        for key in keys:
            assert logged_b[i][key] == logged_a[i][key], (i, key)
    return path_a


def exact_resume_config(data_dir):
    cfg = tiny_config(
        custom_imports={"imports": ["killers"]},
        optimizer={"type": "AdamW", "lr": 0.002, "betas": [0.9, 0.999], "weight_decay": 0.01},
        lr_config={"policy": "poly", "power": 1.0, "min_lr": 1e-5, "warmup": "linear", "warmup_iters": 5,
                   "warmup_ratio": 0.1},
        momentum_config={"policy": "cyclic", "cyclic_times": 2},
        checkpoint_config={"interval": 10, "max_keep_ckpts": 2},
        log_config={"interval": 1},
    )
    cfg["runner"]["max_iters"] = 40
    cfg["model"]["decode_head"] = {"loss_decode": {"type": "CrossEntropyLoss"},
                                   "sampler": {"type": "OHEMPixelSampler", "thresh": 0.7, "min_kept": 50}}
    cfg["data"].update(workers_per_gpu=2, shuffle=True, shuffle_buffer_size=8, val=None, train={
        "type": "HubDataset", "path": str(data_dir), "streaming": True, "classes": CLASSES,
        "pipeline": [{"type": "RandomFlip", "prob": 0.5}, {"type": "PhotoMetricDistortion"}, NORMALIZE]})
    return cfg


@pytest.mark.multiprocess
def test_exact_resume_after_sigkill_on_two_processes(tmp_path):
    (tmp_path / "killers.py").write_text(KILLER)
    write_parquet_dataset(tmp_path / "ds", [9, 8, 8, 8])  # 33 samples, 4 shards: several epochs in 40 steps
    cfg = exact_resume_config(tmp_path / "ds")
    train = str(REPO / "scripts/train.py")

    path_a = write_yaml(tmp_path / "a.yaml", cfg)
    run_a = accelerate_launch([train, str(path_a), "--work-dir", str(tmp_path / "A")], cwd=tmp_path)
    assert run_a.returncode == 0, run_a.stdout[-3000:] + run_a.stderr[-3000:]

    cfg_b = {**cfg, "custom_hooks": [{"type": "KillAfterCheckpoint", "at": 20, "priority": 55}]}
    path_b = write_yaml(tmp_path / "b.yaml", cfg_b)
    killed = accelerate_launch([train, str(path_b), "--work-dir", str(tmp_path / "B")], cwd=tmp_path)
    assert killed.returncode != 0 and not (tmp_path / "B" / "final").exists()
    assert latest_checkpoint(tmp_path / "B").name == "iter_20"
    resumed = accelerate_launch([train, str(path_b), "--work-dir", str(tmp_path / "B"), "--cfg-options",
                                 "custom_hooks=[]", "auto_resume=true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "continuing at iteration 21" in resumed.stdout

    weights_a = load_file(str(tmp_path / "A" / "final" / "model.safetensors"))
    weights_b = load_file(str(tmp_path / "B" / "final" / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)  # bitwise
    logged_a = {r["iter"]: r for r in json_records(tmp_path / "A")}
    logged_b = {r["iter"]: r for r in json_records(tmp_path / "B")}
    for i in range(21, 41):
        for key in ("loss", "decode.loss_ce", "decode.ohem_kept", "lr", "momentum"):
            assert logged_b[i][key] == logged_a[i][key], (i, key)
    # rotation kept counting across the resume: the two newest
    assert sorted(p.name for p in (tmp_path / "B").glob("iter_*")) == ["iter_30", "iter_40"]


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    (tmp_path / "killers.py").write_text(KILLER)
    cfg = tiny_config(custom_imports={"imports": ["killers"]}, checkpoint_config={"interval": 5},
                      custom_hooks=[{"type": "KillInsideSave", "at": 10}])
    cfg["runner"]["max_iters"] = 15
    cfg["data"]["val"] = None
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    train = str(REPO / "scripts/train.py")
    killed = run_script([train, str(path), "--work-dir", str(tmp_path / "work")], cwd=tmp_path)
    assert killed.returncode == -9
    work = tmp_path / "work"
    assert (work / ".iter_10.tmp").is_dir() and not (work / "iter_10").exists()  # written, never renamed
    assert latest_checkpoint(work).name == "iter_5"
    resumed = run_script([train, str(path), "--work-dir", str(work), "--cfg-options", "custom_hooks=[]",
                          "auto_resume=true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing at iteration 6" in resumed.stdout
    assert not (work / ".iter_10.tmp").exists() and (work / "iter_10").is_dir() and (work / "iter_15").is_dir()




def best_folders(work):
    return sorted(p.name for p in work.glob("best_*") if (p / "manifest.json").is_file())


@pytest.mark.slow
def test_a_resume_at_a_checkpoint_that_was_also_the_best_keeps_the_best(tmp_path, fresh_accelerate):
    """The evaluation of iteration 4 is the best so far and 4 is also a checkpoint iteration; the run
    is killed right after it. The resumed run knows that best (score and folder), and at the end
    exactly one best_* folder exists: the best of every evaluation of both runs."""
    (tmp_path / "killers.py").write_text(KILLER)
    cfg = tiny_config(custom_imports={"imports": ["killers"]}, checkpoint_config={"interval": 4},
                      evaluation={"interval": 4, "save_best": "mIoU", "final": False}, log_config={"interval": 1})
    cfg["runner"]["max_iters"] = 8
    killed_cfg = {**cfg, "custom_hooks": [{"type": "KillAfterIteration", "at": 4}]}
    path = write_yaml(tmp_path / "killed.yaml", killed_cfg)
    work = tmp_path / "work"
    killed = run_script([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(work)], cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    first_eval = json.loads((work / "eval_results.json").read_text())
    assert first_eval["iter"] == 4 and best_folders(work) == ["best_mIoU_iter_4"]
    score_4 = first_eval["metrics"]["mIoU"]

    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        from seg_accel.engine.hooks import EvalHook

        trainer, _ = make_trainer(tmp_path, {**cfg, "auto_resume": True})
        evaluation = next(h for h in trainer.hooks if isinstance(h, EvalHook))
        assert trainer.iter == 4
        assert evaluation.best_score == pytest.approx(score_4) and evaluation.best_dir == "best_mIoU_iter_4"
        trainer.train()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("killers", None)
    score_8 = json.loads((work / "eval_results.json").read_text())["metrics"]["mIoU"]
    best = "best_mIoU_iter_8" if score_8 > score_4 else "best_mIoU_iter_4"
    assert best_folders(work) == [best]
    meta = json.loads((work / best / "runner_state.json").read_text())["hooks"]["EvalHook"]
    assert meta == {"best_score": pytest.approx(max(score_4, score_8)), "best_dir": best}
