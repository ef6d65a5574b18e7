"""MMSegmentation's "training tricks" and "customize runtime" tutorials as seg-accel configs
(docs/tutorials/*.yaml, on top of the shipped MMSegmentation configs; docs/tutorials.md shows
each beside the original): each validates at full size, and trains two iterations at a tiny
size (the same file under a small backbone, heads and data) doing what it says."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seg_accel.config.loader import load_config
from seg_accel.validate import validate_train_config
from tests.conftest import REPO, json_log, write_yaml

TUTORIALS = REPO / "docs" / "tutorials"
FILES = sorted(TUTORIALS.glob("*.yaml"))
NORMALIZE = {"type": "Normalize", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375], "to_rgb": True}


@pytest.fixture(autouse=True)
def own_registrations():
    """The tutorial modules register MyOptimizer, MyOptimizerConstructor and MyHook, names that other
    tests' modules register too in the same process: each test imports my_project afresh into
    registries without those names, and the registries are as they were afterwards."""
    import sys

    from seg_accel.registry import HOOKS, OPTIMIZER_CONSTRUCTORS, OPTIMIZERS

    registries = (OPTIMIZERS, OPTIMIZER_CONSTRUCTORS, HOOKS)
    for registry in registries:
        registry.names()  # seg-accel's own entries loaded first (they are loaded once per process)
    saved = [(registry, dict(registry._entries)) for registry in registries]
    for registry, _ in saved:
        for name in ("MyOptimizer", "MyOptimizerConstructor", "MyHook"):
            registry._entries.pop(name, None)
    modules = [name for name in sys.modules if name == "my_project" or name.startswith("my_project.")]
    for name in modules:
        del sys.modules[name]
    yield
    for registry, entries in saved:
        registry._entries.clear()
        registry._entries.update(entries)
    for name in [n for n in sys.modules if n == "my_project" or n.startswith("my_project.")]:
        del sys.modules[name]


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_tutorial_validates_at_full_size(path, monkeypatch):
    monkeypatch.chdir(TUTORIALS)  # custom_imports import my_project from the working directory
    cfg = validate_train_config(load_config(path))
    assert cfg.model.type == "EncoderDecoder" and cfg.runner.max_iters >= 40000


def tiny_folders(root: Path, classes: list[str], ignore: int) -> dict:
    """Two splits of 4 random 32x32 images whose labels use every class (and some ignored pixels)."""
    rng = np.random.default_rng(0)
    sections = {}
    for split in ("train", "val"):
        (root / split / "img").mkdir(parents=True)
        (root / split / "ann").mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / "img" / f"{i}.png")
            label = rng.integers(0, len(classes), (32, 32)).astype(np.uint8)
            label[:2] = ignore
            Image.fromarray(label).save(root / split / "ann" / f"{i}.png")
        sections[split] = {"_delete_": True, "type": "CustomDataset", "data_root": str(root / split), "img_dir": "img",
                           "ann_dir": "ann", "img_suffix": ".png", "classes": classes, "pipeline": [NORMALIZE]}
    return sections


def tiny_overlay(cfg: dict, root: Path) -> dict:
    """The tutorial's network at a tiny size (ResNetV1c-18 or an 8-channel UNet), tiny data of its
    classes, two iterations with an evaluation and a checkpoint."""
    model = cfg["model"]
    if model["backbone"]["type"] == "UNet":
        shrink = {"backbone": {"base_channels": 8}, "decode_head": {"in_channels": 8, "channels": 8},
                  "auxiliary_head": {"in_channels": 16, "channels": 8}}
    else:
        shrink = {"backbone": {"depth": 18}, "decode_head": {"in_channels": 512, "channels": 16},
                  "auxiliary_head": {"in_channels": 256, "channels": 16}}
    classes = cfg["data"]["train"]["classes"]
    test_cfg = {"mode": "slide", "crop_size": [32, 32], "stride": [21, 21]} if model["test_cfg"]["mode"] == "slide" \
        else {"mode": "whole"}
    return {"model": {**shrink, "pretrained": None, "test_cfg": test_cfg},
            "data": {"samples_per_gpu": 2, "workers_per_gpu": 0,
                     **tiny_folders(root, classes, model["decode_head"].get("ignore_index", 255))},
            "runner": {"max_iters": 2}, "evaluation": {"interval": 2}, "log_config": {"interval": 1},
            "checkpoint_config": {"interval": 2}}


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_tutorial_trains_two_iterations_at_a_tiny_size(path, tmp_path, monkeypatch, fresh_accelerate):
    from seg_accel.engine import Trainer

    monkeypatch.chdir(TUTORIALS)
    full = load_config(path).dict
    overlay = tiny_overlay(full, tmp_path)
    if path.stem == "custom_hooks":  # every iteration, so that two show it
        overlay["custom_hooks"] = [{**full["custom_hooks"][0], "a": 1}]
    wrapper = write_yaml(tmp_path / f"tiny_{path.stem}.yaml", {"_base_": str(path), **overlay})
    cfg = load_config(wrapper)
    work = tmp_path / "work"
    cfg.dict["work_dir"] = str(work)
    trainer = Trainer(validate_train_config(cfg), cfg, work)
    trainer.train()
    records = json_log(work)
    train = [r for r in records if r.get("mode") == "train"]
    assert len(train) == 2 and all(np.isfinite(r["loss"]) for r in train)
    assert (work / "final" / "config.json").is_file()
    EFFECTS[path.stem](trainer, full, train[-1], records, work)


def _optimizer(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def _first_train(records):
    return next(r for r in records if r.get("mode") == "train")


def _class_weight(trainer, full, last, records, work):
    weights = trainer.head_losses[0].losses[0].class_weight
    assert [round(float(w), 4) for w in weights] == full["model"]["decode_head"]["loss_decode"]["class_weight"]


def _constructor(trainer, full, last, records, work):
    groups = _optimizer(trainer).param_groups
    assert [g["weight_decay"] for g in groups] == [0.0005, 0.0] and "lr.group1" in last


def _hook(trainer, full, last, records, work):
    assert last["my_hook.scaled_lr"] == pytest.approx(2.0 * last["lr"])


def _ignore_index(trainer, full, last, records, work):
    assert [h.ignore_index for h in trainer.head_losses] == [0, 0]
    assert all(h.losses[0].avg_non_ignore for h in trainer.head_losses)


def _runtime_hooks(trainer, full, last, records, work):
    assert list(work.rglob("events.out.tfevents.*"))  # TensorboardLoggerHook wrote
    assert list(work.glob("checkpoints/*")) or list(work.glob("iter_*"))


# what each tutorial changes, seen in the run
EFFECTS = {
    "adam": lambda t, f, last, r, w: type(_optimizer(t)).__name__ == "Adam" or pytest.fail("not Adam"),
    "class_weight": _class_weight,
    "cosine": lambda t, f, last, r, w: last["lr"] < 0.0011 or pytest.fail(f"no warmup: lr {last['lr']}"),
    "custom_constructor": _constructor,
    "custom_hooks": _hook,
    "custom_optimizer": lambda t, f, last, r, w: type(_optimizer(t)).__name__ == "MyOptimizer"
    or pytest.fail("not MyOptimizer"),
    "cyclic_momentum": lambda t, f, last, r, w: last["momentum"] < 0.9 or pytest.fail("momentum did not cycle"),
    "grad_clip": lambda t, f, last, r, w: "grad_norm" in last or pytest.fail("no grad_norm logged"),
    "head_lr_mult": lambda t, f, last, r, w: _first_train(r)["lr.head"] == pytest.approx(
        10 * _first_train(r)["lr.default"]) or pytest.fail("heads not at 10x"),  # (then poly's min_lr is absolute)
    "ignore_index": _ignore_index,
    "multi_loss": lambda t, f, last, r, w: {"decode.loss_ce", "decode.loss_dice", "aux.loss_ce", "aux.loss_dice"}
    <= set(last) or pytest.fail(str(sorted(last))),
    "ohem": lambda t, f, last, r, w: "decode.ohem_kept" in last or pytest.fail("no OHEM"),
    "runtime_hooks": _runtime_hooks,
    "step_lr": lambda t, f, last, r, w: last["lr"] == pytest.approx(0.01) or pytest.fail(f"lr {last['lr']}"),
    "workflow": lambda t, f, last, r, w: any(x.get("mode") == "val" and "loss" in x for x in r)
    or pytest.fail("no val-mode losses"),
}


def test_every_tutorial_has_a_check_and_a_section_in_the_docs():
    page = (REPO / "docs" / "tutorials.md").read_text()
    assert sorted(EFFECTS) == [p.stem for p in FILES]
    for path in FILES:
        assert f"# docs/tutorials/{path.name}" in page, path.name
    for module in sorted((TUTORIALS / "my_project").glob("my_*.py")):  # the modules shown are the files
        shown = page.split(f"```python\n# my_project/{module.name}\n", 1)[1].split("```", 1)[0]
        assert shown.strip() == module.read_text().strip(), module.name


def test_the_ignore_index_trick_on_data_with_other_unlabelled_pixels_is_one_line_naming_the_sample(tmp_path,
                                                                                                 monkeypatch):
    """With ignore_index 0 the 255 pixels of Cityscapes are labels of no class: seg-accel stops
    at the first such sample, naming it (MMSegmentation's CrossEntropyLoss raises IndexError:
    Target 255 is out of bounds)."""
    from seg_accel.data import build_dataset
    from seg_accel.errors import DataError

    full = load_config(TUTORIALS / "ignore_index.yaml").dict
    data = tiny_folders(tmp_path, full["data"]["train"]["classes"], 255)
    section = {k: v for k, v in data["train"].items() if k != "_delete_"}
    dataset = build_dataset(section, "data.train", 0)
    with pytest.raises(DataError, match=r"0\.png.*label values \[255\] are neither a class id"):
        dataset[0]


# --------------------------------------------------------------------------- the Python snippets
def tutorial_snippets() -> dict[str, str]:
    """docs/tutorials.md's MMSegmentation originals (```text blocks), by the tutorial YAML shown
    after each."""
    import re

    text = (REPO / "docs" / "tutorials.md").read_text()
    pairs, pending = {}, None
    for kind, body in re.findall(r"```(text|yaml|python)\n(.*?)```", text, re.S):
        if kind == "text" and not body.startswith("seg-accel"):
            pending = body
        elif kind == "yaml" and pending is not None:
            pairs[Path(body.splitlines()[0].removeprefix("# ").strip()).stem] = pending
            pending = None
    return pairs


SNIPPETS = tutorial_snippets()
# What the pasted snippet gives as it is, where that is not the tutorial's YAML (the same in
# MMSegmentation 0.30, which merges these into the base the same way), and the edit that makes it
# the YAML; docs/tutorials.md says the same beside each.
AS_PASTED = {
    # MMSegmentation's snippet closes decode_head after auxiliary_head: the aux head lands inside it
    "ignore_index": ("model.decode_head.auxiliary_head: FCNHead has no option 'auxiliary_head'",
                     [("avg_non_ignore=True),\n    auxiliary_head", "avg_non_ignore=True)),\n    auxiliary_head"),
                      ("avg_non_ignore=True)),\n    ))", "avg_non_ignore=True)),\n    )")]),
    # merged into the base's SGD, which passes momentum to Adam
    "adam": ("optimizer.momentum: optimizer Adam has no option 'momentum'",
             [("dict(type='Adam'", "dict(_delete_=True, type='Adam'")]),
    # merged into the base's poly schedule, whose power the other policies do not take
    "cyclic_momentum": ("lr_config.power: lr policy cyclic has no option 'power'",
                        [("policy='cyclic',\n    target_ratio=(10, 1e-4)",
                          "_delete_=True,\n    policy='cyclic',\n    target_ratio=(10, 1e-4)")]),
    "cosine": ("lr_config.power: lr policy CosineAnnealing has no option 'power'",
               [("policy='CosineAnnealing',", "_delete_=True, by_epoch=False,\n    policy='CosineAnnealing',")]),
    # and the steps 9 and 10 are epochs of MMSegmentation's tutorial; PSPNet's runner counts iterations
    "step_lr": ("lr_config.power: lr policy step has no option 'power'",
                [("policy='step', step=[9, 10]", "_delete_=True, policy='step', step=[30000, 36000], by_epoch=False")]),
    # a_value and b_value are the tutorial's placeholders; MyHook is imported as the tutorial says
    "custom_hooks": ("name 'a_value' is not assigned above",
                     [("custom_hooks = [", "a_value = 10\nb_value = 2.0\ncustom_imports = dict(imports=["
                                           "'my_project.my_hook'], allow_failed_imports=False)\ncustom_hooks = [")]),
    # valid as pasted (every iteration); the YAML saves and evaluates every 4000 and keeps 3 checkpoints
    "runtime_hooks": (None, [("checkpoint_config = dict(interval=1)",
                              "checkpoint_config = dict(by_epoch=False, interval=4000, max_keep_ckpts=3, "
                              "save_optimizer=True)"),
                             ("evaluation = dict(interval=1, metric='mIoU')",
                              "evaluation = dict(interval=4000, metric='mIoU', pre_eval=True)")]),
}


@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_each_python_snippet_pasted_into_a_py_file_resolves_to_the_tutorial_yaml(name, tmp_path, monkeypatch):
    """The snippet as it is, after a `_base_` line naming the tutorial's base (a snippet that has
    its own `_base_ = './NAME.py'` keeps it: seg-accel's config of that name is used)."""
    import yaml

    from seg_accel.errors import ConfigError

    monkeypatch.chdir(TUTORIALS)  # custom_imports import my_project from the working directory
    yaml_path = TUTORIALS / f"{name}.yaml"
    snippet = SNIPPETS[name]
    base = yaml.safe_load(yaml_path.read_text())["_base_"]
    text = snippet if snippet.lstrip().startswith("_base_") else f"_base_ = '{base}'\n{snippet}"
    expected = load_config(yaml_path).dict
    pasted = tmp_path / f"{name}.py"
    pasted.write_text(text)
    error, edits = AS_PASTED.get(name, (None, []))
    if error is None:
        validate_train_config(load_config(pasted))
    else:
        with pytest.raises(ConfigError) as caught:
            validate_train_config(load_config(pasted))
        assert error in str(caught.value), str(caught.value)
    if edits:
        for old, new in edits:
            assert old in text, old
            text = text.replace(old, new)
        pasted.write_text(text)
    cfg = load_config(pasted)
    validate_train_config(cfg)
    assert cfg.dict == expected


def test_every_snippet_is_compared():
    assert set(SNIPPETS) == {p.stem for p in FILES} - {"custom_optimizer", "custom_constructor"}
