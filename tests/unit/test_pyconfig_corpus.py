"""A corpus of configs in MMSegmentation's own syntax (tests/data/mmseg_configs: 0.x and 1.x, bases
chained three and four files deep, models, schedules, runtime and datasets, ``_delete_``,
variables such as ``crop_size`` and ``norm_cfg`` used across files, ``{{_base_.x}}``): each
top-level config converts, validates and builds, its ``convert-config`` YAML resolves to the same
config, and the 0.x and 1.x forms of the same recipe resolve to the same seg-accel config."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

from seg_accel.cli.convert_config import converted_yaml
from seg_accel.config import load_config
from seg_accel.config.schema import parse_train_config
from seg_accel.models.builder import build_model
from seg_accel.optim import build_lr_scheduler, build_momentum_scheduler, build_optimizer
from seg_accel.validate import validate_train_config

CORPUS = Path(__file__).resolve().parents[1] / "data" / "mmseg_configs"
TOP = sorted(p for p in CORPUS.rglob("*.py") if "_base_" not in p.parts)
NO_WEIGHTS = ["model.pretrained=null"]  # the Hub is unreachable here: random initialisation


def test_the_corpus_is_large_enough():
    files = list(CORPUS.rglob("*.py"))
    assert len(files) >= 25
    assert {"0x", "1x"} <= {p.relative_to(CORPUS).parts[0] for p in files}
    texts = [p.read_text() for p in files]
    assert any("_delete_=True" in t for t in texts) and any("{{_base_." in t for t in texts)
    assert any(re.search(r"= _base_\.", t) for t in texts)  # mmengine's plain `_base_.x` reference
    # a chain four files deep: headlr -> ohem -> pspnet -> the four bases
    assert "ohem" in (CORPUS / "1x/pspnet/pspnet_r50-d8_4xb2-80k_cityscapes-512x1024_headlr.py").read_text()


@pytest.mark.parametrize("path", TOP, ids=[str(p.relative_to(CORPUS)) for p in TOP])
def test_each_config_converts_validates_and_builds(path, tmp_path):
    cfg = load_config(path, NO_WEIGHTS)
    train_cfg = validate_train_config(cfg)
    # the convert-config YAML resolves to the same config and validates too
    out = tmp_path / f"{path.stem}.yaml"  # the work dir follows the file name
    out.write_text(converted_yaml(cfg, str(path)))
    again = load_config(out)
    assert again.dict == cfg.dict
    assert validate_train_config(again) == train_cfg
    # builds: the model (random init), the optimizer's groups, the schedules
    model = build_model(train_cfg.model, train_cfg.classes)
    optimizer = build_optimizer(model, train_cfg.optimizer)
    length = train_cfg.runner.max_iters or train_cfg.runner.max_epochs
    for section, builder in (("lr_config", build_lr_scheduler), ("momentum_config", build_momentum_scheduler)):
        scheduler = builder(getattr(train_cfg, section), optimizer, length)
        if scheduler is not None:
            scheduler.apply(length // 2)
            assert all(v > 0 for v in scheduler.get_last_values())
    with torch.no_grad():
        model.eval()
        logits = model(torch.zeros(1, 3, 64, 64))
    assert logits is not None


PAIRS = {
    "pspnet": ("0x/pspnet/pspnet_r50-d8_512x1024_40k_cityscapes.py",
               "1x/pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py"),
    "pspnet ohem": ("0x/pspnet/pspnet_r50-d8_512x1024_40k_cityscapes_ohem.py",
                    "1x/pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024_ohem.py"),
    "deeplabv3plus": ("0x/deeplabv3plus/deeplabv3plus_r50-d8_512x1024_40k_cityscapes.py",
                      "1x/deeplabv3plus/deeplabv3plus_r50-d8_4xb2-40k_cityscapes-512x1024.py"),
    "unet drive": ("0x/unet/fcn_unet_s5-d16_64x64_40k_drive.py", "1x/unet/unet-s5-d16_fcn_4xb4-40k_drive-64x64.py"),
    "unet ce + dice": ("0x/unet/fcn_unet_s5-d16_ce-1.0-dice-3.0_64x64_40k_drive.py",
                       "1x/unet/unet-s5-d16_fcn_4xb4-ce-1.0-dice-3.0-40k_drive-64x64.py"),
    "adam + step": ("0x/misc/delete_optimizer.py", "1x/misc/delete_optimizer.py"),
    "segformer": ("0x/segformer/segformer_mit-b0_512x512_160k_ade20k.py",
                  "1x/segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py"),
}
# MMSegmentation's own SegFormer recipe changed its schedule between 0.x and 1.x: 0.x multiplies
# poly over all 160k iterations by the warmup; 1.x's PolyLR starts after the 1500-iteration LinearLR
SAME_SCHEDULE = [name for name in PAIRS if name != "segformer"]


def _typed(path: str):
    return parse_train_config(load_config(CORPUS / path, NO_WEIGHTS).dict)


@pytest.mark.parametrize("name", list(PAIRS))
def test_the_0x_and_1x_forms_of_a_recipe_resolve_to_the_same_config(name):
    old, new = (_typed(p) for p in PAIRS[name])
    assert new.lr_config["policy"] == "chain"  # MMEngine's schedulers, value for value
    assert dataclasses.replace(old, lr_config=None) == dataclasses.replace(new, lr_config=None)


def _lrs(cfg, steps: list[int], length: int) -> list[float]:
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                                 {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}], lr=cfg.optimizer["lr"])
    scheduler = build_lr_scheduler(cfg.lr_config, optimizer, length)
    return [v for i in steps for v in (scheduler.apply(i) or scheduler.get_last_values())]


@pytest.mark.parametrize("name", SAME_SCHEDULE)
def test_the_0x_and_1x_schedules_of_a_recipe_give_the_same_lr(name):
    """mmcv's closed forms and MMEngine's chained ones. MMSegmentation's own 0.x and 1.x poly
    schedules differ by one iteration: mmcv's poly runs over max_iters (it never reaches min_lr),
    MMEngine's PolyLR over end - begin - 1 (it reaches eta_min at the last iteration); so the 1.x
    values are mmcv's poly of a run one iteration shorter, and the step schedules are equal."""
    old, new = (_typed(p) for p in PAIRS[name])
    length = old.runner.max_iters
    steps = list(range(0, length, 997)) + [length - 2, length - 1]
    expected_length = length - 1 if old.lr_config["policy"] == "poly" else length
    assert _lrs(new, steps, length) == pytest.approx(_lrs(old, steps, expected_length), rel=1e-12, abs=1e-18)
    if old.lr_config["policy"] == "poly":  # the difference is there: 1.x reaches min_lr, 0.x does not
        assert _lrs(new, [length - 1], length)[0] == pytest.approx(old.lr_config["min_lr"], rel=1e-12)
        assert _lrs(old, [length - 1], length)[0] > old.lr_config["min_lr"]


def test_the_converted_yaml_comments_each_mapped_key():
    cfg = load_config(CORPUS / "1x/misc/amp_clip_accumulate.py", NO_WEIGHTS)
    text = converted_yaml(cfg, "amp_clip_accumulate.py")
    for line in ("# optimizer_config: from optim_wrapper.clip_grad (MMSegmentation 1.x)",
                 "# gradient_accumulation_steps: from optim_wrapper.accumulative_counts (MMSegmentation 1.x)",
                 "# mixed_precision: from optim_wrapper.type: AmpOptimWrapper (MMSegmentation 1.x)",
                 "# momentum_config: from param_scheduler", "# seed: from randomness.seed",
                 "# log_config.hooks: from vis_backends", "#   default_scope (the registry scope"):
        assert line in text, line
    data = yaml.safe_load(text)
    assert data["optimizer_config"] == {"grad_clip": {"max_norm": 35, "norm_type": 2}}
    assert data["mixed_precision"] == "fp16" and data["gradient_accumulation_steps"] == 2
    assert data["evaluation"] == {"interval": 4000, "metric": "mIoU", "save_best": "mIoU", "rule": "greater"}
    assert data["log_config"]["hooks"] == [{"type": "TextLoggerHook", "by_epoch": False},
                                           {"type": "TensorboardLoggerHook"}]


def test_the_1x_segformer_is_transformers_segformer_of_the_same_size():
    cfg = _typed("1x/segformer/segformer_mit-b1_8xb2-160k_ade20k-512x512.py")
    assert cfg.model.type == "SegformerForSemanticSegmentation"
    assert cfg.model.config["hidden_sizes"] == [64, 128, 320, 512]
    assert cfg.model.config["depths"] == [2, 2, 2, 2] and cfg.model.config["decoder_hidden_size"] == 256
    shipped = parse_train_config(load_config("seg_accel::segformer_mit-b1_8xb2-160k_ade20k-512x512").dict)
    for key in ("hidden_sizes", "depths", "num_attention_heads", "sr_ratios", "patch_sizes", "strides",
                "mlp_ratios", "decoder_hidden_size", "drop_path_rate", "classifier_dropout_prob"):
        assert cfg.model.config[key] == shipped.model.config[key], key
    model = build_model(cfg.model, cfg.classes)
    shipped_model = build_model(dataclasses.replace(shipped.model, pretrained=None), shipped.classes)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in shipped_model.parameters())
