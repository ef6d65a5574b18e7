"""A model family registered outside seg_accel (tests/integration/toy_family.py) trains, exports,
reloads and publishes through seg-accel with no change to seg_accel: the family is the only
place that knows it."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, make_trainer, tiny_config

TOY = REPO / "tests" / "integration" / "toy_family.py"


def test_no_file_of_seg_accel_names_the_toy_family():
    for path in (REPO / "seg_accel").rglob("*.py"):
        text = path.read_text()
        assert "toy_family" not in text and "ToyNet" not in text and "ToyFamily" not in text, path


@pytest.mark.slow
def test_a_family_registered_in_a_test_module_trains_exports_reloads_and_pushes(tmp_path, fresh_accelerate,
                                                                                hub_server):
    import seg_accel
    from seg_accel.hub.publish import publish
    from seg_accel.models import family_of_model, list_families, model_family

    cfg = tiny_config(custom_imports={"imports": ["tests.integration.toy_family"]},
                      model={"type": "ToyNet", "width": 8, "depth": 3},
                      optimizer={"type": "AdamW", "lr": 0.01, "weight_decay": 0.01,
                                 "constructor": "LearningRateDecayOptimizerConstructor",
                                 "paramwise_cfg": {"num_layers": 3, "decay_rate": 0.5}},
                      checkpoint_config={"interval": 2})
    trainer, _ = make_trainer(tmp_path, cfg)
    assert list_families()[0] == "toy" and model_family("ToyNet").name == "toy"
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert family_of_model(model).name == "toy"
    # layer-wise decay through the family's layer ids: stem 0, stages 1..3, head 4 (lr * 0.5 ** (5 - id - 1))
    lrs = {name: group["initial_lr"] if "initial_lr" in group else group["lr"]
           for group in trainer.optimizer.param_groups for name, p in model.named_parameters()
           if any(p is q for q in group["params"])}
    assert lrs["stem.0.weight"] == 0.01 * 0.5 ** 4 and lrs["stages.2.0.weight"] == 0.01 * 0.5 ** 1
    assert lrs["head.weight"] == 0.01
    trainer.train()

    final = tmp_path / "work" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["seg_accel_family"] == "toy" and config["toy"] == {"width": 8, "depth": 3}
    assert sorted(p.name for p in final.iterdir() if p.suffix == ".safetensors") == ["toy.safetensors"]
    reloaded = seg_accel.load_model(final)
    assert type(reloaded).__name__ == "ToyNet" and family_of_model(reloaded).name == "toy"
    trained = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    assert all(torch.equal(trained[k], v) for k, v in reloaded.state_dict().items())
    # load_from of the export and of a checkpoint folder (the family reads its own format)
    from seg_accel.models import build_model, load_weights

    fresh = build_model(trainer.cfg.model, trainer.classes)
    load_weights(fresh, final)
    assert all(torch.equal(trained[k], v) for k, v in fresh.state_dict().items())

    assert publish(tmp_path / "work", "tester/toy", retries=1, retry_wait=0.1)
    files = hub_server.files("tester/toy")
    assert "toy.safetensors" in files and json.loads(files["config.json"])["seg_accel_family"] == "toy"
    card = files["README.md"].decode()
    assert "import tests.integration.toy_family  # registers the toy family" in card and "library_name: pytorch" in card
    from_hub = seg_accel.load_model("tester/toy")
    assert all(torch.equal(trained[k], v) for k, v in from_hub.state_dict().items())
    assert torch.equal(load_file(str(final / "toy.safetensors"))["head.weight"], trained["head.weight"])
