"""Checkpoints and exact resume (docs/behaviour.md section 7, 12)."""
from __future__ import annotations

import json

import torch

from tests.conftest import make_trainer, tiny_config, write_yaml


def test_rotation_keeps_the_two_newest_and_the_best_across_a_resume(tmp_path, fresh_accelerate):
    from accelerate.state import AcceleratorState, GradientState

    from tests.conftest import make_trainer

    cfg = tiny_config(checkpoint_config={"interval": 2, "max_keep_ckpts": 2},
                      evaluation={"interval": 2, "metric": "mIoU", "save_best": "mIoU"})
    cfg["runner"]["max_iters"] = 6
    trainer, _ = make_trainer(tmp_path, cfg)
    trainer.train()
    work = tmp_path / "work"
    assert sorted(p.name for p in work.glob("iter_*")) == ["iter_4", "iter_6"]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg["runner"]["max_iters"] = 10
    trainer, _ = make_trainer(tmp_path, {**cfg, "auto_resume": True})
    assert trainer.iter == 6
    trainer.train()
    assert sorted(p.name for p in work.glob("iter_*")) == ["iter_10", "iter_8"]
    best = list(work.glob("best_mIoU_iter_*"))
    assert len(best) == 1 and (best[0] / "pretrained" / "model.safetensors").is_file()
    scores = [json.loads(line) for p in work.glob("*.log.json") for line in p.read_text().splitlines()]
    evals = [r for r in scores if r["mode"] == "val"]
    best_iter = max(evals, key=lambda r: (r["mIoU"], -r["iter"]))["iter"]
    assert best[0].name == f"best_mIoU_iter_{best_iter}"
    assert sorted(p.name for p in work.iterdir() if p.is_dir()) == sorted(
        ["iter_8", "iter_10", best[0].name, "final"])


def test_load_from_takes_weights_only(tmp_path, fresh_accelerate):
    from tests.conftest import make_trainer

    cfg = tiny_config(checkpoint_config={"interval": 2})
    cfg["runner"]["max_iters"] = 2
    cfg["data"]["val"] = None
    trainer, _ = make_trainer(tmp_path / "first", cfg)
    trainer.train()
    trained = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for source in (tmp_path / "first/work/iter_2", tmp_path / "first/work/final"):
        trainer, _ = make_trainer(tmp_path / source.name, {**cfg, "load_from": str(source)})
        assert trainer.iter == 0  # weights only: a new run
        state = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        assert state.keys() == trained.keys() and all(torch.equal(state[k], v) for k, v in trained.items())
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_a_resume_with_a_changed_config_says_what_changed_and_a_changed_lr_takes_effect(tmp_path,
                                                                                      fresh_accelerate):
    """Issue 23, finding 6: a changed optimizer.lr was ignored on resume (the checkpoint's optimizer
    state brought its old lr back) while config.yaml recorded the new one."""
    from accelerate.state import AcceleratorState, GradientState

    cfg = tiny_config(checkpoint_config={"interval": 2}, lr_config=None, log_config={"interval": 1})
    cfg["data"]["val"] = None
    make_trainer(tmp_path, cfg)[0].train()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    changed = {**cfg, "resume_from": str(tmp_path / "work" / "iter_2"), "optimizer": {**cfg["optimizer"], "lr": 0.01},
               "data": {**cfg["data"], "samples_per_gpu": 4}}
    trainer, _ = make_trainer(tmp_path, changed)
    log = sorted((tmp_path / "work").glob("*.log"))[-1].read_text()  # the resumed run's log
    warnings = [line for line in log.splitlines() if "resuming from iter_2 with a config that differs" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], log
    assert "optimizer.lr: 0.001 -> 0.01 (takes effect: the optimizer's settings follow the config" in warnings[0]
    assert "data.samples_per_gpu: 2 -> 4 (takes effect: the data stream continues at the checkpoint's sample; not " \
           "an exact resume)" in warnings[0]
    assert "resume_from" not in warnings[0]  # how the run starts is no change
    assert all(group["lr"] == 0.01 for group in trainer.optimizer.param_groups)
    trainer.train()
    records = [json.loads(line) for path in sorted((tmp_path / "work").glob("*.log.json"))
               for line in path.read_text().splitlines()]  # both runs (one file when they start in one second)
    train = [r for r in records if r["mode"] == "train"]
    assert [(r["iter"], r["lr"]) for r in train] == [(1, 0.001), (2, 0.001), (3, 0.001), (4, 0.001), (3, 0.01),
                                                      (4, 0.01)]


def test_a_resume_at_or_past_the_end_is_one_line(tmp_path, fresh_accelerate, capsys):
    from seg_accel.cli import train_cli

    cfg = tiny_config(checkpoint_config={"interval": 2})
    cfg["data"]["val"] = None
    make_trainer(tmp_path, cfg)[0].train()
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    for options in (["runner.max_iters=4", "auto_resume=true"], ["runner.max_iters=3", f"resume_from={tmp_path}/work/iter_4"]):
        assert train_cli([str(path), "--work-dir", str(tmp_path / "work"), "--cfg-options", *options]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(err) == 1 and "iter_4 is at iteration 4: the run has already finished (runner.max_iters" in err[0]
