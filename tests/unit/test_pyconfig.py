"""MMSegmentation's ``.py`` configs, read without running them: the subset of Python that is read,
what is refused (with file and line, and nothing of it runs: marker-file tests), the limits, the
variables, ``{{_base_.x}}`` / ``_base_.x``, and the errors of the 1.x vocabulary."""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from seg_accel.config import load_config
from seg_accel.errors import ConfigError
from seg_accel.validate import validate_train_config
from tests.conftest import script_env, tiny_config, write_yaml

CORPUS = Path(__file__).resolve().parents[1] / "data" / "mmseg_configs"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def tiny_base(tmp_path: Path) -> Path:
    """A complete small seg-accel config (YAML) that .py files can extend."""
    return write_yaml(tmp_path / "tiny.yaml", tiny_config())


# --------------------------------------------------------------------------- the subset
def test_the_subset_of_python_is_evaluated(tmp_path):
    tiny_base(tmp_path)
    path = write(tmp_path / "a.py", """\
        '''A docstring is allowed.'''
        _base_ = './tiny.yaml'
        crop_size = (32, 32)
        base_lr = 0.001 * 2
        steps = 10 // 3 + 2 ** 3 - 7 % 4 - -1
        name = 'data' + '/' + 'x'
        scales = [1.0, 1.5] + [2.0]
        first = scales[0]
        tail = scales[1:]
        table = {'head': dict(lr_mult=10.), 3: 'three'}
        lookup = table['head']['lr_mult']
        extra = dict(lr=base_lr, **dict(weight_decay=0.05))
        optimizer = dict(lr=base_lr, weight_decay=extra['weight_decay'],
                         paramwise_cfg=dict(custom_keys={'head': dict(lr_mult=lookup)}))
        runner = dict(max_iters=steps)
        steps += 1
        model = dict(test_cfg=dict(mode='slide', crop_size=crop_size, stride=list((16, 16))))
        """)
    cfg = load_config(path)
    assert cfg.dict["optimizer"] == {"type": "AdamW", "lr": 0.002, "weight_decay": 0.05,
                                     "paramwise_cfg": {"custom_keys": {"head": {"lr_mult": 10.0}}}}
    assert cfg.dict["runner"]["max_iters"] == 10 // 3 + 2**3 - 7 % 4 + 1
    assert cfg.dict["model"]["test_cfg"] == {"mode": "slide", "crop_size": [32, 32], "stride": [16, 16]}
    for variable in ("crop_size", "base_lr", "steps", "name", "scales", "first", "tail", "table", "lookup", "extra"):
        assert variable not in cfg.dict  # MMSegmentation's variables are not config keys
    assert "variables of the .py files" in " ".join(cfg.notices)
    validate_train_config(cfg)


def test_names_and_references_of_the_bases(tmp_path):
    write(tmp_path / "base.py", """\
        crop_size = (48, 48)
        norm_cfg = dict(type='BN', requires_grad=True)
        model = dict(type='EncoderDecoder', backbone=dict(norm_cfg=norm_cfg))
        """)
    path = write(tmp_path / "child.py", """\
        _base_ = ['./base.py']
        a = {{_base_.crop_size}}
        b = _base_.model.backbone.norm_cfg.type
        c = crop_size[0] * 2
        d = _base_.crop_size[1]
        model = dict(backbone=dict(norm_cfg=dict(type=b + 'x')), size=a, twice=c, second=d)
        """)
    cfg = load_config(path, ["runner.max_iters=1"])
    assert cfg.dict["model"] == {"type": "EncoderDecoder", "backbone": {"norm_cfg": {"type": "BNx",
                                                                                    "requires_grad": True}},
                                 "size": [48, 48], "twice": 96, "second": 48}


def test_delete_and_packaged_and_shipped_bases(tmp_path):
    path = write(tmp_path / "adam.py", """\
        _base_ = './pspnet_r50-d8_512x1024_40k_cityscapes.py'
        optimizer = dict(_delete_=True, type='Adam', lr=0.0003, weight_decay=0.0001)
        """)
    cfg = load_config(path)
    assert cfg.dict["optimizer"] == {"type": "Adam", "lr": 0.0003, "weight_decay": 0.0001}
    assert any("using seg-accel's seg_accel::pspnet_r50-d8_512x1024_40k_cityscapes" in n for n in cfg.notices)
    packaged = write(tmp_path / "p.py", "_base_ = 'seg_accel::pspnet_r50-d8_512x1024_40k_cityscapes'\n")
    assert load_config(packaged).dict["model"]["decode_head"]["type"] == "PSPHead"


# --------------------------------------------------------------------------- nothing runs
MARKER = "MARKER"
HOSTILE = {
    "import os": ("import os\nos.system('touch {m}')\n", 1, "import"),
    "from import": ("x = 1\nfrom os import system\nsystem('touch {m}')\n", 2, "import"),
    "__import__": ("x = __import__('os').system('touch {m}')\n", 1, "a call of __import__('os').system()"),
    "lambda": ("f = (lambda: __import__('os').system('touch {m}'))()\n", 1, "lambda"),
    "comprehension": ("x = [__import__('os').system('touch {m}') for _ in [1]]\n", 1, "comprehension"),
    "attribute call": ("a = 1\nb = 2\nx = open('{m}', 'w').write('x')\n", 3, "a call of open('{m}', 'w').write()"),
    "f-string": ("x = f\"{{__import__('os').system('touch {m}')}}\"\n", 1, "f-string"),
    "read_base": ("from mmengine.config import read_base\nwith read_base():\n    from .x import *\n", 1, "import"),
    "read_base only": ("with read_base():\n    x = open('{m}', 'w')\n", 1, "read_base"),
    "builtin call": ("x = exec(\"open('{m}', 'w')\")\n", 1, "a call of exec()"),
    "conditional": ("x = open('{m}', 'w') if True else 1\n", 1, "conditional"),
    "walrus in list": ("x = [(y := open('{m}', 'w'))]\n", 1, "assignment expression"),
    "def": ("def f():\n    open('{m}', 'w')\nx = f()\n", 1, "function definition"),
    "class": ("class A:\n    open('{m}', 'w')\n", 1, "class definition"),
    "bare call": ("print(open('{m}', 'w'))\n", 1, "assignments only"),
    "dunder attribute": ("x = ().__class__.__bases__[0].__subclasses__()\n", 1, "a call of"),
    "a later line": ("a = 1\nb = dict(x=a)\n\n\nc = getattr(b, 'x')\n", 5, "a call of getattr()"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_code_in_a_config_is_refused_with_file_and_line_and_never_runs(name, tmp_path, monkeypatch):
    text, line, construct = HOSTILE[name]
    marker = tmp_path / MARKER
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "evil.py", text.format(m=marker))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    assert f"line {line}:" in message, message
    assert construct.format(m=marker) in message, message
    assert not marker.exists()


def test_the_command_refuses_it_in_one_line_with_exit_2(tmp_path):
    marker = tmp_path / MARKER
    path = write(tmp_path / "evil.py", f"import os\nos.system('touch {marker}')\n")
    for command in (["train"], ["train", "--num-processes", "2"], ["print-config"], ["param-groups"],
                    ["convert-config"]):
        run = subprocess.run([sys.executable, "-m", "seg_accel", command[0], str(path), *command[1:]],
                             capture_output=True, text=True, env=script_env(), timeout=120, cwd=tmp_path)
        assert run.returncode == 2, run.stderr
        assert run.stderr.strip().count("\n") == 0 and "line 1: an import is not allowed" in run.stderr, run.stderr
        assert not marker.exists()


@pytest.mark.parametrize("text, message", [
    ("a = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"{n} = [{', '.join([p] * 10)}]\n" for p, n in zip("abcde", "bcdef")), "MAX_CONFIG_VALUES"),
    ("x = 10 ** 10 ** 10\n", "too large"),
    ("s = 'aaaaaaaaaaaaaaaa'\n" + "s = s + s\n" * 20, "grows past"),
    ("x = " + "[" * 70 + "]" * 70 + "\n", "nests"),
    ("x = 1 / 0\n", "division by zero"),
    ("x = 'a' * 3\n", "str * int is not allowed"),
    ("x = [1] * 3\n", "list * int is not allowed"),
    ("x = 1 << 40\n", "operator LShift"),
    ("x = {1, 2}\n", "sets are not config values"),
    ("x = y\n", "name 'y' is not assigned above"),
    ("x = _base_.crop_size\n", "this file has no _base_"),
    ("x = dict(1, a=2)\n", "dict(key=value"),
    ("x, y = 1, 2\n", "only `name = value`"),
    ("x = b'bytes'\n", "not allowed"),
])
def test_limits_and_mistakes(tmp_path, text, message):
    path = write(tmp_path / "bad.py", text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)


def test_a_large_file_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.py"
    path.write_text("x = '" + "a" * (5 * 2**20) + "'\n")
    with pytest.raises(ConfigError, match="MAX_CONFIG_BYTES"):
        load_config(path)


# --------------------------------------------------------------------------- vocabulary errors
def test_a_typo_of_a_key_is_an_error_naming_the_key(tmp_path):
    tiny_base(tmp_path)
    path = write(tmp_path / "typo.py", "_base_ = './tiny.yaml'\noptimzer = dict(lr=0.1)\n")
    with pytest.raises(ConfigError, match=r"typo\.py: optimzer: unknown top-level key 'optimzer'.*Did you mean: optimizer"):
        load_config(path)


@pytest.mark.parametrize("text, where, message", [
    ("optim_wrapper = dict(type='ApexOptimWrapper', optimizer=dict(type='SGD', lr=0.1))\n",
     "optim_wrapper.type", "ApexOptimWrapper has no seg-accel equivalent"),
    ("optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.1), clip_grad=dict(type='value', clip_value=1))\n",
     "optim_wrapper.clip_grad", "clips the gradient norm"),
    ("optim_wrapper = dict(type='AmpOptimWrapper', optimizer=dict(type='SGD', lr=0.1), loss_scale=512.)\n",
     "optim_wrapper.loss_scale", "dynamically"),
    ("param_scheduler = [dict(type='ReduceOnPlateauLR', by_epoch=False)]\n", "param_scheduler.0.type",
     "unknown scheduler 'ReduceOnPlateauLR'"),
    ("train_cfg = dict(type='IterBasedTrainLoop', max_iters=4, val_begin=2)\n", "train_cfg.val_begin", "val_begin"),
    ("default_hooks = dict(profiler=dict(type='ProfilerHook'))\n", "default_hooks.profiler", "no seg-accel meaning"),
    ("randomness = dict(seed=1, diff_rank_seed=True)\n", "randomness.diff_rank_seed", "one seed"),
    ("val_evaluator = dict(type='CityscapesMetric')\n", "val_evaluator.type", "no seg-accel equivalent"),
    ("model = dict(type='EncoderDecoder', backbone=dict(type='SwinTransformer'))\n", "model.backbone.type",
     "line 2: MMSegmentation's SwinTransformer is not built by seg-accel (its EncoderDecoder builds the backbones "
     "ResNet, ResNetV1c, ResNetV1d, UNet with the heads FCNHead, PSPHead, ASPPHead, DepthwiseSeparableASPPHead, "
     "UPerHead); it offers UperNetForSemanticSegmentation"),
    ("x = 1\nmodel = dict(\n    type='EncoderDecoder',\n    backbone=dict(type='BiSeNetV1'))\n", "model.backbone.type",
     "line 3: MMSegmentation's BiSeNetV1 is not built by seg-accel"),
    ("model = dict(type='EncoderDecoder', backbone=dict(type='ResNetV1c'), decode_head=dict(type='OCRHead'))\n",
     "model.decode_head.type", "OCRHead is not built by seg-accel (its EncoderDecoder builds"),
    ("model = dict(type='CascadeEncoderDecoder')\n", "model.type", "it offers EncoderDecoder"),
])
def test_keys_without_a_seg_accel_meaning_are_one_error(tmp_path, text, where, message):
    tiny_base(tmp_path)
    path = write(tmp_path / "x.py", "_base_ = './tiny.yaml'\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == where and message in str(caught.value), str(caught.value)
    assert str(caught.value).startswith(str(path))


def test_num_classes_in_a_head_is_accepted_when_it_fits_the_data_in_yaml_too(tmp_path):
    cfg = tiny_config()
    cfg["model"]["decode_head"] = {"num_classes": 4}  # SyntheticShapes: background and three shapes
    validate_train_config(load_config(write_yaml(tmp_path / "ok.yaml", cfg)))
    cfg["model"]["decode_head"] = {"num_classes": 19}
    with pytest.raises(ConfigError, match="num_classes is 19 but the data has 4 classes") as caught:
        validate_train_config(load_config(write_yaml(tmp_path / "bad.yaml", cfg)))
    assert caught.value.key == "model.decode_head.num_classes"


def test_machinery_keys_are_one_notice(tmp_path):
    tiny_base(tmp_path)
    path = write(tmp_path / "m.py", """\
        _base_ = './tiny.yaml'
        default_scope = 'mmseg'
        log_processor = dict(by_epoch=False)
        visualizer = dict(type='SegLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')])
        log_level = 'INFO'
        """)
    cfg = load_config(path)
    ignored = [n for n in cfg.notices if n.startswith("ignored")]
    assert len(ignored) == 1 and all(k in ignored[0] for k in ("default_scope", "log_processor", "visualizer",
                                                                "log_level"))
    validate_train_config(cfg)


def test_cfg_options_take_the_files_own_vocabulary(tmp_path):
    cfg = load_config(CORPUS / "1x/pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py",
                      ["train_cfg.max_iters=100", "optimizer.lr=0.5", "data.samples_per_gpu=1"])
    assert cfg.dict["runner"] == {"type": "IterBasedRunner", "max_iters": 100}
    assert cfg.dict["optimizer"]["lr"] == 0.5 and cfg.dict["data"]["samples_per_gpu"] == 1


def test_the_vocabulary_knows_what_the_encoder_decoder_builds():
    from seg_accel.config import vocabulary
    from seg_accel.models.mmseg_backbones import BACKBONES
    from seg_accel.models.mmseg_heads import HEADS

    assert set(vocabulary.ENCODER_DECODER_BACKBONES) == set(BACKBONES)
    assert set(vocabulary.ENCODER_DECODER_HEADS) == set(HEADS)


def test_loop_defaults_are_mmengines(tmp_path):
    """IterBasedTrainLoop validates every 1000 iterations unless told, EpochBasedTrainLoop every epoch."""
    tiny_base(tmp_path)
    for loop, expected in (("dict(type='IterBasedTrainLoop', max_iters=4000)", 1000),
                           ("dict(type='EpochBasedTrainLoop', max_epochs=3)", 1)):
        path = write(tmp_path / "loop.py", f"_base_ = './tiny.yaml'\ntrain_cfg = {loop}\n"
                                           "val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])\n")
        cfg = load_config(path)
        assert cfg.dict["evaluation"] == {"interval": expected, "metric": "mIoU"}
