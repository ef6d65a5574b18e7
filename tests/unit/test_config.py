"""docs/behaviour.md section 1: YAML, _base_, _delete_, --cfg-options, custom_imports, work_dir."""
from __future__ import annotations

import sys
import textwrap

import pytest
import yaml

from seg_accel.config import (
    load_config,
    parse_cfg_options,
    parse_option_value,
    resolve_work_dir,
)
from seg_accel.validate import validate_train_config
from seg_accel.errors import ConfigError
from tests.conftest import tiny_config, write_yaml


def write(path, text):
    return write_yaml(path, textwrap.dedent(text))


# ----------------------------------------------------------------------------- _base_
def test_dicts_merge_recursively_and_lists_replace_whole(tmp_path):
    write(tmp_path / "base.yaml", """
        optimizer: {type: SGD, lr: 0.01, momentum: 0.9}
        data: {pipeline: [a, b, c], samples_per_gpu: 2}
    """)
    cfg = load_config(write(tmp_path / "child.yaml", """
        _base_: base.yaml
        optimizer: {lr: 0.05}
        data: {pipeline: [z]}
    """))
    assert cfg.dict["optimizer"] == {"type": "SGD", "lr": 0.05, "momentum": 0.9}
    assert cfg.dict["data"] == {"pipeline": ["z"], "samples_per_gpu": 2}
    assert "_base_" not in cfg.dict


def test_base_list_relative_paths_recursive(tmp_path):
    write(tmp_path / "configs/_base_/models/m.yaml", "model: {type: M, depth: 1}\n")
    write(tmp_path / "configs/_base_/schedules/s.yaml", "_base_: ../default_runtime.yaml\nrunner: {max_iters: 10}\n")
    write(tmp_path / "configs/_base_/default_runtime.yaml", "seed: 7\nlog_config: {interval: 5}\n")
    cfg = load_config(write(tmp_path / "configs/exp/e.yaml", """
        _base_: [../_base_/models/m.yaml, ../_base_/schedules/s.yaml]
        model: {depth: 2}
    """))
    assert cfg.dict == {"model": {"type": "M", "depth": 2}, "seed": 7, "log_config": {"interval": 5},
                        "runner": {"max_iters": 10}}
    # every key knows its file
    assert cfg.origin("model.type").endswith("models/m.yaml")
    assert cfg.origin("model.depth").endswith("exp/e.yaml")
    assert cfg.origin("seed").endswith("default_runtime.yaml")


def test_single_base_as_string_and_later_base_order(tmp_path):
    write(tmp_path / "a.yaml", "x: 1\n")
    cfg = load_config(write(tmp_path / "b.yaml", "_base_: a.yaml\ny: 2\n"))
    assert cfg.dict == {"x": 1, "y": 2}


def test_sibling_bases_with_same_top_level_key_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "optimizer: {type: SGD}\n")
    write(tmp_path / "b.yaml", "optimizer: {lr: 0.1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "c.yaml", "_base_: [a.yaml, b.yaml]\n"))
    err = info.value
    assert "optimizer" in str(err) and "a.yaml" in str(err) and "b.yaml" in str(err)
    assert err.file.endswith("c.yaml") and err.key == "_base_"


def test_base_cycle_is_detected(tmp_path):
    write(tmp_path / "a.yaml", "_base_: b.yaml\nx: 1\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\ny: 1\n")
    with pytest.raises(ConfigError, match="cycle") as info:
        load_config(tmp_path / "a.yaml")
    assert "a.yaml -> " in str(info.value) and "b.yaml" in str(info.value)


def test_self_include_is_a_cycle(tmp_path):
    with pytest.raises(ConfigError, match="cycle"):
        load_config(write(tmp_path / "a.yaml", "_base_: a.yaml\n"))


def test_missing_base_names_file_and_path(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "a.yaml", "_base_: nope/base.yaml\n"))
    assert "nope/base.yaml" in str(info.value) and info.value.file.endswith("a.yaml")


def test_delete_replaces_base_dict_and_never_reaches_constructors(tmp_path):
    write(tmp_path / "base.yaml", "optimizer: {type: SGD, lr: 0.01, momentum: 0.9, weight_decay: 0.0005}\n")
    cfg = load_config(write(tmp_path / "c.yaml", """
        _base_: base.yaml
        optimizer: {_delete_: true, type: AdamW, lr: 0.0001, nested: {_delete_: true, a: 1}}
    """))
    assert cfg.dict["optimizer"] == {"type": "AdamW", "lr": 0.0001, "nested": {"a": 1}}
    assert "_delete_" not in yaml.safe_dump(cfg.dict)


def test_delete_false_merges(tmp_path):
    write(tmp_path / "base.yaml", "optimizer: {type: SGD, lr: 0.01}\n")
    cfg = load_config(write(tmp_path / "c.yaml", "_base_: base.yaml\noptimizer: {_delete_: false, lr: 0.1}\n"))
    assert cfg.dict["optimizer"] == {"type": "SGD", "lr": 0.1}


def test_dict_over_non_dict_needs_delete(tmp_path):
    write(tmp_path / "base.yaml", "lr_config: null\nrunner: 5\n")
    with pytest.raises(ConfigError, match="_delete_") as info:
        load_config(write(tmp_path / "c.yaml", "_base_: base.yaml\nrunner: {max_iters: 3}\n"))
    assert info.value.key == "runner"
    # with _delete_ it is allowed; a None base is simply replaced
    cfg = load_config(write(tmp_path / "d.yaml", "_base_: base.yaml\nrunner: {_delete_: true, max_iters: 3}\n"
                                                 "lr_config: {policy: poly}\n"))
    assert cfg.dict["runner"] == {"max_iters": 3} and cfg.dict["lr_config"] == {"policy": "poly"}


def test_yaml_syntax_error_has_line_number(tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  type: X\n  config: {a: 1\nrunner: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 4" in str(info.value) and info.value.file.endswith("bad.yaml")


def test_duplicate_key_in_one_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key 'seed'.*line 1"):
        load_config(write(tmp_path / "dup.yaml", "seed: 1\nwork_dir: x\nseed: 2\n"))


def test_non_mapping_file_and_non_yaml_suffix(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"YAML \(.yaml/.yml\) or MMSegmentation's Python \(.py\)"):
        load_config(write(tmp_path / "cfg.json", "{}\n"))  # (.py configs are read: tests/unit/test_pyconfig.py)


# ----------------------------------------------------------------------------- --cfg-options
@pytest.mark.parametrize(
    "text, expected",
    [
        ("1", 1), ("-3", -3), ("0.5", 0.5), ("1e-4", 1e-4), ("true", True), ("False", False),
        ("null", None), ("None", None), ("abc", "abc"), ("'1'", "1"), ('"a,b"', "a,b"),
        ("[1,2]", [1, 2]), ("[]", []), ("(1, 2)", [1, 2]), ("[[1,2],[3,4]]", [[1, 2], [3, 4]]),
        ("[1,(2,3),x]", [1, [2, 3], "x"]), ("1,2,3", [1, 2, 3]), ("[0.9, 0.999]", [0.9, 0.999]),
    ],
)
def test_option_values_are_typed(text, expected):
    value = parse_option_value(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("bad", ["a.b", "=1", "a..b=1", "a=", "a=[1,2", "a=[1,2]]", "a=(1", "a=1]"])
def test_malformed_options_are_errors(bad):
    with pytest.raises(ConfigError) as info:
        parse_cfg_options([bad])
    assert info.value.key == "--cfg-options"


def test_options_set_nested_keys_and_list_indices(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_config())
    cfg = load_config(path, [
        "optimizer.lr=0.01", "data.train.pipeline.0.prob=0.25", "data.train.img_size=[48,40]",
        "optimizer.betas=(0.8,0.9)", "model.config.depths.-1=2", "new.key=true", "seed=null",
    ])
    assert cfg.dict["optimizer"]["lr"] == 0.01
    assert cfg.dict["data"]["train"]["pipeline"][0] == {"type": "RandomFlip", "prob": 0.25}
    assert cfg.dict["data"]["train"]["img_size"] == [48, 40]
    assert cfg.dict["optimizer"]["betas"] == [0.8, 0.9]
    assert cfg.dict["model"]["config"]["depths"] == [1, 1, 1, 2]
    assert cfg.dict["new"] == {"key": True} and cfg.dict["seed"] is None
    assert cfg.origin("optimizer.lr") == "--cfg-options"
    assert cfg.origin("optimizer.type").endswith("c.yaml")


def test_option_index_errors(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_config())
    with pytest.raises(ConfigError, match="out of range"):
        load_config(path, ["data.train.pipeline.5.prob=1"])
    with pytest.raises(ConfigError, match="use a number"):
        load_config(path, ["data.train.pipeline.first.prob=1"])
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(path, ["seed.x=1"])


# ----------------------------------------------------------------------------- custom_imports
def test_custom_imports_register_a_component(tmp_path, monkeypatch):
    module = tmp_path / "my_losses_mod.py"
    module.write_text(textwrap.dedent("""
        import torch
        from seg_accel.registry import LOSSES

        @LOSSES.register()
        class ScaledCE(torch.nn.Module):
            def __init__(self, scale: float = 1.0, loss_name: str = "loss_scaled"):
                super().__init__()
                self.scale = scale
                self.loss_name = loss_name

            def forward(self, logits, labels, ignore_index=255):
                return self.scale * torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index)
    """))
    monkeypatch.chdir(tmp_path)  # modules next to where the command runs are importable
    cfg_dict = tiny_config(custom_imports={"imports": ["my_losses_mod"], "allow_failed_imports": False})
    cfg_dict["model"]["decode_head"] = {"loss_decode": {"type": "ScaledCE", "scale": 2.0}}
    cfg = load_config(write_yaml(tmp_path / "c.yaml", cfg_dict))
    train_cfg = validate_train_config(cfg)
    from seg_accel.losses.head import HeadLosses

    head = HeadLosses(train_cfg.model.decode_head.loss_cfgs(), 4)
    assert type(head.losses[0]).__name__ == "ScaledCE" and head.losses[0].scale == 2.0
    sys.modules.pop("my_losses_mod", None)


def test_custom_imports_missing_module(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_config(custom_imports={"imports": ["no_such_module_xyz"]}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "custom_imports.imports.0" and "no_such_module_xyz" in str(info.value)
    assert info.value.file.endswith("c.yaml")


def test_custom_imports_allow_failed(tmp_path, caplog):
    import logging

    path = write_yaml(tmp_path / "c.yaml", tiny_config(
        custom_imports={"imports": "no_such_module_xyz", "allow_failed_imports": True}))
    seg_logger = logging.getLogger("seg_accel")  # it does not propagate once the trainer set up its logging
    seg_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="seg_accel"):
            load_config(path)  # no error: a warning instead
    finally:
        seg_logger.removeHandler(caplog.handler)
    assert "custom_imports: could not import no_such_module_xyz" in caplog.text
    assert "allow_failed_imports" in caplog.text


# ----------------------------------------------------------------------------- work_dir, seed
def test_work_dir_resolution(tmp_path):
    path = write_yaml(tmp_path / "my_exp.yaml", tiny_config())
    cfg = load_config(path)
    assert resolve_work_dir(cfg, None) == "work_dirs/my_exp"
    cfg = load_config(path, ["work_dir=/data/runs/a"])
    assert resolve_work_dir(cfg, None) == "/data/runs/a"
    assert resolve_work_dir(cfg, "/cli/wins") == "/cli/wins"


def test_full_config_validates_with_defaults(tmp_path):
    train_cfg = validate_train_config(load_config(write_yaml(tmp_path / "c.yaml", tiny_config())))
    assert train_cfg.seed == 0 and train_cfg.gradient_accumulation_steps == 1
    assert train_cfg.classes == ["background", "circle", "square", "triangle"]
    assert train_cfg.model.decode_head.ignore_index == 255
    assert train_cfg.data.val_batch_size() == "auto"  # issue 15: same-size images batched by default
