"""Checkpoints and exact resume (docs/behaviour.md section 7, 12)."""
from __future__ import annotations

import json

import torch

from tests.conftest import (
    tiny_config,
)


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
