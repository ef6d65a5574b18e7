"""The MMSegmentation-architectures family (seg_accel/models/mmseg.py) against MMSegmentation 0.30
itself: the same logits from the same weights, the state dict round trip, parameter counts,
the losses of a training step; MMSegmentation checkpoints (.pth) loading as data; config checks.

Where MMSegmentation 0.30 is installed the comparisons run against it live; elsewhere against
its outputs saved by tests/references/make_mmseg_030.py (tests/references/mmseg_030.*)."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from seg_accel.config.loader import load_config
from seg_accel.errors import ConfigError
from seg_accel.validate import validate_train_config
from tests.conftest import NORMALIZE, binary_shape_folders, write_yaml
from tests.references import mmseg_case as case

LIVE = case.reference_available()
FACTS = json.loads(case.REFERENCE_FACTS.read_text())
CITYSCAPES = [f"c{i}" for i in range(19)]


def shipped(name: str):
    """A shipped config (validated), and its model section without ImageNet weights."""
    cfg = validate_train_config(load_config(f"seg_accel::{name}"))
    return cfg, dataclasses.replace(cfg.model, pretrained=None)


def build(model_cfg, classes):
    from seg_accel.models import build_model

    return build_model(model_cfg, list(classes))


@pytest.fixture(scope="module")
def saved() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(case.REFERENCE))


def reference_outputs(network: str, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MMSegmentation's decode/auxiliary logits (and, live, encode_decode) for the seeded case."""
    if not LIVE:
        return {"decode": saved[f"{network}.decode"], "auxiliary": saved[f"{network}.auxiliary"]}
    model = case.mmseg_model(case.CASES[network][0])
    model.load_state_dict(case.seeded_state(model.state_dict()), strict=True)
    model.eval()
    x = case.seeded_input()
    with torch.no_grad():
        features = model.extract_feat(x)
        return {"decode": model.decode_head.forward_test(features, None, None),
                "auxiliary": model.auxiliary_head.forward_test(features, None, None),
                "encode_decode": model.encode_decode(x, case.image_metas(x.shape))}


@pytest.mark.parametrize("network", list(case.CASES))
def test_logits_equal_mmsegmentation_030_with_the_same_weights(network, saved):
    cfg, model_cfg = shipped(case.CASES[network][1])
    model = build(model_cfg, cfg.classes)
    model.load_state_dict(case.seeded_state(model.state_dict()), strict=True)
    model.eval()
    x = case.seeded_input()
    with torch.no_grad():
        logits = model(x)
        features = model.backbone(x)
        aux = model.auxiliary_head(features)
    want = reference_outputs(network, saved)
    assert logits.shape == want["decode"].shape
    # the seeded weights make logits of a few thousand: float32 carries ~7 digits, and the summation
    # order of the convolutions differs between CPUs, so equal is to 1e-5 of the outputs' scale
    tol = 1e-5 * max(1.0, want["decode"].abs().max().item())
    assert torch.allclose(logits, want["decode"], atol=tol, rtol=0), (logits - want["decode"]).abs().max() / tol
    tol_aux = 1e-5 * max(1.0, want["auxiliary"].abs().max().item())
    assert torch.allclose(aux, want["auxiliary"], atol=tol_aux, rtol=0), (aux - want["auxiliary"]).abs().max()
    assert want["decode"].abs().max() > 0.05  # the case is not degenerate (logits far from zero)
    if "encode_decode" in want:  # at the input size, as MMSegmentation's inference resizes
        full = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=model.align_corners)
        assert torch.allclose(full, want["encode_decode"], atol=tol, rtol=0)


@pytest.mark.parametrize("network", list(case.CASES))
def test_state_dicts_convert_both_ways_tensor_for_tensor(network, tmp_path):
    from seg_accel.models.mmseg import write_mmseg_checkpoint
    from seg_accel.models.torch_files import checkpoint_tensors, read_torch_checkpoint

    cfg, model_cfg = shipped(case.CASES[network][1])
    model = build(model_cfg, cfg.classes)
    names = FACTS["networks"][network]["state_dict"]
    if LIVE:
        reference = case.mmseg_model(case.CASES[network][0])
        names = {k: list(v.shape) for k, v in reference.state_dict().items()}
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == names  # same names, same shapes, same order
    # MMSegmentation's state dict (live: its model's; else one of its names, shapes and dtypes)
    original = case.seeded_state(reference.state_dict() if LIVE else model.state_dict())
    model.load_state_dict(original, strict=True)  # MMSegmentation's state dict, as it is
    out = tmp_path / "back.pth"
    write_mmseg_checkpoint(model.state_dict(), list(cfg.classes), out)
    back = checkpoint_tensors(read_torch_checkpoint(out, "x"))
    assert list(back) == list(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    if LIVE:  # and MMSegmentation's own loader takes it
        from mmcv.runner import load_checkpoint

        load_checkpoint(reference, str(out), strict=True)
        for name, tensor in reference.state_dict().items():
            assert torch.equal(tensor, original[name]), name


MMSEG_CONFIGS = Path(case.__file__).parents[2] / "seg_accel" / "configs" / "mmseg"


@pytest.mark.parametrize("name", sorted(p.stem for p in MMSEG_CONFIGS.glob("*.yaml")))
def test_shipped_configs_have_mmsegmentations_parameter_counts(name):
    import yaml

    from seg_accel.models import build_empty_model

    cfg = validate_train_config(load_config(f"seg_accel::{name}"))  # loads and validates at full size
    base = yaml.safe_load((MMSEG_CONFIGS / f"{name}.yaml").read_text())["_base_"]
    old_name = name if name in case.SHIPPED else Path(base).stem  # a 1.x name: its 0.x config
    model = build_empty_model(cfg.model, cfg.classes)  # the architecture, no weights, no download
    count = sum(p.numel() for p in model.parameters())
    assert count == FACTS["parameters"][old_name]
    if LIVE:
        assert count == sum(p.numel() for p in case.mmseg_model(case.SHIPPED[old_name]).parameters())


def test_a_pspnet_training_step_has_mmsegmentations_losses():
    """CE with the Cityscapes class weights and OHEM (thresh 0.7) on the decode head, CE 0.4 on
    the auxiliary head, BatchNorm in training mode, the same dropout draws."""
    from seg_accel.config.schema import AuxiliaryHeadConfig, DecodeHeadConfig
    from seg_accel.config.types import parse_section
    from seg_accel.losses.head import build_head_losses

    cfg, model_cfg = shipped(case.CASES["pspnet_r50-d8"][1])
    decode = parse_section({**_head_dict(model_cfg.decode_head), "loss_decode": case.LOSS_DECODE,
                            "sampler": case.LOSS_SAMPLER}, DecodeHeadConfig, "model.decode_head")
    aux = parse_section({**_head_dict(model_cfg.auxiliary_head), "loss_decode": case.LOSS_AUX}, AuxiliaryHeadConfig,
                        "model.auxiliary_head")
    model_cfg = dataclasses.replace(model_cfg, decode_head=decode, auxiliary_head=aux)
    model = build(model_cfg, cfg.classes)
    model.load_state_dict(case.loss_state(model.state_dict()), strict=True)
    model.train()
    images, labels = case.loss_batch()
    torch.manual_seed(case.DROPOUT_SEED)
    out = model(images)
    _, decode_logs = build_head_losses(decode, 19, "decode", "model.decode_head")(out["logits"], labels)
    _, aux_logs = build_head_losses(aux, 19, "aux", "model.auxiliary_head")(out["aux_logits"], labels)
    want = FACTS["losses"]
    if LIVE:
        want = case.mmseg_pspnet_losses()
    assert decode_logs["decode.loss_ce"].item() == pytest.approx(want["decode.loss_ce"], abs=1e-5)
    assert aux_logs["aux.loss_ce"].item() == pytest.approx(want["aux.loss_ce"], abs=1e-5)
    assert decode_logs["decode.ohem_kept"] < 1  # OHEM left pixels out


def _head_dict(head) -> dict:
    fields = {f.name: getattr(head, f.name) for f in dataclasses.fields(head) if f.name != "options"}
    return {**{k: v for k, v in fields.items() if v is not None}, **head.options}


# --------------------------------------------------------------------------- .pth checkpoints
UNET_TINY = {"type": "EncoderDecoder", "backbone": {"type": "UNet", "base_channels": 8, "num_stages": 3,
                                                     "strides": [1, 1, 1], "enc_num_convs": [1, 1, 1],
                                                     "dec_num_convs": [1, 1], "downsamples": [True, True],
                                                     "enc_dilations": [1, 1, 1], "dec_dilations": [1, 1]},
             "decode_head": {"type": "FCNHead", "in_channels": 8, "in_index": 2, "channels": 8, "num_convs": 1,
                             "concat_input": False},
             "auxiliary_head": {"type": "FCNHead", "in_channels": 16, "in_index": 1, "channels": 8, "num_convs": 1,
                                "concat_input": False, "loss_decode": {"type": "CrossEntropyLoss", "loss_weight": 0.4}}}


def unet_config(tmp_path: Path, **extra) -> Path:
    data = binary_shape_folders(tmp_path / "data", 4, 32, {"train": [NORMALIZE], "val": [NORMALIZE]})
    cfg = {"model": copy.deepcopy(UNET_TINY),
           "data": {"samples_per_gpu": 2, "workers_per_gpu": 0, "train": data["train"], "val": data["val"]},
           "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9},
           "lr_config": {"policy": "poly", "power": 0.9, "min_lr": 1e-4, "by_epoch": False},
           "runner": {"type": "IterBasedRunner", "max_iters": 2}, "log_config": {"interval": 1},
           "work_dir": str(tmp_path / "work"), **extra}
    return write_yaml(tmp_path / "unet.yaml", cfg)


def mmseg_pth(model, path: Path) -> Path:
    """A checkpoint in MMSegmentation's format ({meta, state_dict}, as mmcv's save_checkpoint)."""
    torch.save({"meta": {"mmseg_version": "0.30.0", "CLASSES": ["background", "shape"], "iter": 40000},
                "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}, str(path))
    return path


def tiny_unet(config: Path):
    cfg = validate_train_config(load_config(config))
    model = build(cfg.model, cfg.classes)
    model.load_state_dict(case.seeded_state(model.state_dict()))
    return cfg, model.eval()


def test_an_mmsegmentation_pth_evaluates_and_converts(tmp_path, capsys):
    from seg_accel.cli import convert_checkpoint_cli, evaluate_cli
    from seg_accel.models import load_model

    config = unet_config(tmp_path)
    cfg, model = tiny_unet(config)
    pth = mmseg_pth(model, tmp_path / "iter_40000.pth")
    assert evaluate_cli([str(config), str(pth), "--out", str(tmp_path / "pth.json")]) == 0
    export = tmp_path / "export"
    assert convert_checkpoint_cli([str(pth), "--config", str(config), "--out", str(export)]) == 0
    assert evaluate_cli([str(config), str(export), "--out", str(tmp_path / "export.json")]) == 0
    from_pth, from_export = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("pth", "export"))
    assert from_pth["metrics"] == from_export["metrics"] and from_pth["confusion_matrix"] == from_export["confusion_matrix"]
    loaded = load_model(export).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # and back to MMSegmentation's format
    back = tmp_path / "back.pth"
    assert convert_checkpoint_cli([str(export), "--config", str(config), "--out", str(back)]) == 0
    state = torch.load(str(back), weights_only=True)["state_dict"]
    assert len(state) == len(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_load_from_takes_an_mmsegmentation_pth_and_a_ddp_one(tmp_path):
    from seg_accel.models import load_weights

    config = unet_config(tmp_path)
    cfg, model = tiny_unet(config)
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, str(path))
    fresh = build(cfg.model, cfg.classes)
    load_weights(fresh, path, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


class _Payload:
    """Unpickling it would create the marker file (what a crafted checkpoint could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pth_with_a_pickled_payload_is_refused_and_never_runs(tmp_path, capsys):
    from seg_accel.cli import evaluate_cli
    from seg_accel.models import load_weights

    config = unet_config(tmp_path)
    cfg, model = tiny_unet(config)
    marker = tmp_path / "payload_ran"
    path = tmp_path / "crafted.pth"
    torch.save({"state_dict": model.state_dict(), "meta": _Payload(marker)}, str(path))
    assert not marker.exists()
    with pytest.raises(ConfigError, match="pickled Python objects"):
        load_weights(build(cfg.model, cfg.classes), path)
    assert evaluate_cli([str(config), str(path), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights_only=True" in err[0] and "crafted.pth" in err[0]
    assert not marker.exists()


# --------------------------------------------------------------------------- backbone weights
def test_pretrained_takes_an_mmcv_imagenet_pth_and_timm_resnet50c_is_the_same_network(tmp_path):
    """mmcv's ImageNet ResNetV1c checkpoints hold the backbone under MMSegmentation's names (plus
    fc); timm's resnet50c is the same network under other stem names: its weights load through
    the name map and give the same features, at output stride 8 as in the D8 configs."""
    timm = pytest.importorskip("timm")
    reference = timm.create_model("resnet50c", pretrained=False, output_stride=8).eval()
    timm_state = case.seeded_state(reference.state_dict())
    reference.load_state_dict(timm_state)
    path = tmp_path / "resnet50c.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm_state.items()}, str(path))
    cfg, model_cfg = shipped("pspnet_r50-d8_512x1024_40k_cityscapes")
    model = build(dataclasses.replace(model_cfg, pretrained=str(path)), cfg.classes).eval()
    x = case.seeded_input((1, 3, 64, 64))
    with torch.no_grad():
        y = reference.maxpool(reference.act1(reference.bn1(reference.conv1(x))))
        for i, layer in enumerate((reference.layer1, reference.layer2, reference.layer3, reference.layer4)):
            y = layer(y)
            assert torch.allclose(model.backbone(x)[i], y, atol=1e-5), i
    # the same tensors as an mmcv-style .pth (state_dict with fc, MMSegmentation's names)
    from seg_accel.models.mmseg import _timm_resnet_names

    pth = tmp_path / "resnet50_v1c.pth"
    torch.save({"state_dict": _timm_resnet_names(timm_state)}, str(pth))
    again = build(dataclasses.replace(model_cfg, backbone_pretrained=str(pth)), cfg.classes)
    assert all(torch.equal(a, b) for a, b in zip(again.backbone.state_dict().values(),
                                                  model.backbone.state_dict().values()))


def test_an_open_mmlab_name_offline_is_one_line_naming_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg, model_cfg = shipped("fcn_unet_s5-d16_64x64_40k_drive")
    with pytest.raises(ConfigError) as info:
        build(dataclasses.replace(model_cfg, pretrained="open-mmlab://resnet50_v1c"), cfg.classes)
    text = str(info.value)
    assert "model.pretrained" in text and "resnet50_v1c-2cccc1ad.pth" in text and "\n" not in text
    with pytest.raises(ConfigError, match="Did you mean: .*resnet50_v1c") as info:
        build(dataclasses.replace(model_cfg, backbone_pretrained="open-mmlab://resnet50_v1x"), cfg.classes)
    assert info.value.key == "model.backbone_pretrained"


# --------------------------------------------------------------------------- config checks
def check(tmp_path, change, message, key=None):
    cfg = load_config(unet_config(tmp_path))
    change(cfg.dict)
    with pytest.raises(ConfigError, match=message) as info:
        validate_train_config(cfg)
    if key is not None:
        assert info.value.key == key


@pytest.mark.parametrize("change, message, key", [
    (lambda d: d["model"]["backbone"].update(base_channel=8), "UNet has no option 'base_channel'.*base_channels",
     "model.backbone.base_channel"),
    (lambda d: d["model"]["backbone"].update(type="ResNetV1e"), "unknown backbone type.*ResNetV1c",
     "model.backbone.type"),
    (lambda d: d["model"]["decode_head"].update(in_channels=16), "feature 2 has 8 channels",
     "model.decode_head.in_channels"),
    (lambda d: d["model"]["decode_head"].update(in_index=5), "out of range", "model.decode_head.in_index"),
    (lambda d: d["model"]["decode_head"].update(num_classes=19), "2 output class", "model.decode_head.num_classes"),
    (lambda d: d["model"]["decode_head"].update(type="PSPHed"), "Did you mean: PSPHead", "model.decode_head.type"),
    (lambda d: d["model"]["decode_head"].update(pool_scale=[1]), "FCNHead has no option 'pool_scale'",
     "model.decode_head.pool_scale"),
    (lambda d: d["model"]["decode_head"].update(norm_cfg={"type": "GN"}), "norm_cfg type", None),
    (lambda d: d["model"]["backbone"].update(with_cp=True), "with_cp True is not supported", None),
    (lambda d: d["model"]["backbone"].update(strides=[1, 1]), "must have 3 entries", "model.backbone.strides"),
    (lambda d: d["model"].update(neck={"type": "FPN"}), "necks are not built", "model.neck"),
    (lambda d: d["model"]["backbone"].update(in_channels=4), "in_channels must be 3", None),
    (lambda d: d["model"]["decode_head"].update(num_convs=0, channels=16), "num_convs: 0 passes the feature", None),
])
def test_config_mistakes_are_one_line_naming_the_key(tmp_path, change, message, key):
    check(tmp_path, change, message, key)


def test_head_module_options_are_refused_for_models_that_bring_their_heads():
    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from seg_accel.models.builder import check_model_config
    from tests.conftest import TINY_SEGFORMER

    cfg = parse_section({**copy.deepcopy(TINY_SEGFORMER), "decode_head": {"type": "PSPHead"}}, ModelConfig, "model")
    with pytest.raises(ConfigError, match="unknown key 'type' in model.decode_head.*EncoderDecoder"):
        check_model_config(cfg, "model", ["a", "b"])


def test_a_resnet_d8_config_trains_two_iterations_from_yaml(tmp_path, fresh_accelerate):
    """ResNetV1c-18 D8 + PSPHead + FCN auxiliary head (the PSPNet recipe at a tiny size):
    both heads' losses are logged and the export loads back."""
    from seg_accel.models import load_model
    from tests.conftest import json_log, make_trainer

    data = binary_shape_folders(tmp_path / "data", 4, 32, {"train": [NORMALIZE], "val": [NORMALIZE]})
    model = {"type": "EncoderDecoder", "pretrained": None,
             "backbone": {"type": "ResNetV1c", "depth": 18, "dilations": [1, 1, 2, 4], "strides": [1, 2, 1, 1],
                          "contract_dilation": True, "norm_cfg": {"type": "SyncBN", "requires_grad": True}},
             "decode_head": {"type": "PSPHead", "in_channels": 512, "in_index": 3, "channels": 16,
                             "pool_scales": [1, 2, 3, 6],
                             "sampler": {"type": "OHEMPixelSampler", "thresh": 0.7, "min_kept": 100}},
             "auxiliary_head": {"type": "FCNHead", "in_channels": 256, "in_index": 2, "channels": 16, "num_convs": 1,
                                "concat_input": False,
                                "loss_decode": {"type": "CrossEntropyLoss", "loss_weight": 0.4}}}
    cfg = {"model": model, "data": {"samples_per_gpu": 2, "workers_per_gpu": 0, **data},
           "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                         "paramwise_cfg": {"custom_keys": {"head": {"lr_mult": 10.0}}}},
           "lr_config": {"policy": "poly", "power": 0.9, "min_lr": 1e-4, "by_epoch": False},
           "runner": {"type": "IterBasedRunner", "max_iters": 2}, "log_config": {"interval": 1},
           "evaluation": {"interval": 2, "metric": "mIoU"}}
    data["val"]["pipeline"] = [NORMALIZE]
    trainer, _ = make_trainer(tmp_path, cfg)
    trainer.train()
    records = [r for r in json_log(tmp_path / "work") if r.get("mode") == "train"]
    assert {"decode.loss_ce", "aux.loss_ce", "decode.ohem_kept"} <= set(records[-1])
    loaded = load_model(tmp_path / "work" / "final")
    assert type(loaded).__name__ == "EncoderDecoder" and loaded.num_classes == 2
