"""The smp family (seg_accel/models/smp.py): segmentation_models_pytorch architectures from YAML,
their options checked, the FCN auxiliary head, inputs of any size, smp's export format."""
from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from seg_accel.config.schema import ModelConfig
from seg_accel.config.types import parse_section
from seg_accel.errors import ConfigError
from seg_accel.registry import MODELS, SMP_ARCHITECTURES
from tests.conftest import NORMALIZE, REPO, binary_shape_folders, json_log, make_trainer, run_script, tiny_config, write_yaml

smp = pytest.importorskip("segmentation_models_pytorch")

# one small configuration of each architecture (random init; the encoders are the smallest that
# each decoder takes: resnet18, mit_b0 for Segformer, a tiny timm ViT for DPT)
TINY = {
    "Unet": {"encoder_name": "resnet18", "decoder_channels": [16, 16, 16, 16, 16]},
    "UnetPlusPlus": {"encoder_name": "resnet18", "decoder_channels": [16, 16, 16, 16, 16]},
    "FPN": {"encoder_name": "resnet18", "decoder_pyramid_channels": 32, "decoder_segmentation_channels": 32},
    "PSPNet": {"encoder_name": "resnet18", "psp_out_channels": 16},
    "DeepLabV3": {"encoder_name": "resnet18", "decoder_channels": 16},
    "DeepLabV3Plus": {"encoder_name": "resnet18", "decoder_channels": 16},
    "Linknet": {"encoder_name": "resnet18"},
    "MAnet": {"encoder_name": "resnet18", "decoder_channels": [16, 16, 16, 16, 16], "decoder_pab_channels": 8},
    "PAN": {"encoder_name": "resnet18", "decoder_channels": 16},
    "UPerNet": {"encoder_name": "resnet18", "decoder_channels": 16},
    "Segformer": {"encoder_name": "mit_b0", "decoder_segmentation_channels": 16},
    "DPT": {"encoder_name": "tu-vit_tiny_patch16_224", "decoder_intermediate_channels": [16, 16, 16, 16],
            "decoder_fusion_channels": 16, "encoder_params": {"img_size": 64}},
}
# the image side each trains on (PAN's pyramid attention needs 128; DPT's ViT takes its img_size)
SIDE = {"PAN": 128}


def smp_model(arch: str, **extra) -> dict:
    return {"type": f"smp.{arch}", "encoder_weights": None, **copy.deepcopy(TINY[arch]), **extra}


def smp_config(arch: str = "Unet", iters: int = 2, **model_extra) -> dict:
    side = SIDE.get(arch, 64)
    cfg = tiny_config(model=smp_model(arch, **model_extra))
    cfg["runner"]["max_iters"] = iters
    for split in ("train", "val"):
        cfg["data"][split]["img_size"] = [side, side]
    cfg["data"]["train"]["num_samples"] = 8
    cfg["data"]["val"]["num_samples"] = 2
    return cfg


def build(model: dict, classes=("a", "b", "c")) -> nn.Module:
    from seg_accel.models import build_model
    from seg_accel.models.builder import check_model_against_data

    cfg = parse_section(copy.deepcopy(model), ModelConfig, "model")
    check_model_against_data(cfg, list(classes))
    return build_model(cfg, list(classes))


def check(model: dict) -> None:
    from seg_accel.models.builder import check_model_against_data

    check_model_against_data(parse_section(copy.deepcopy(model), ModelConfig, "model"), ["a", "b", "c"])


def test_the_architecture_list_is_smps_own():
    from segmentation_models_pytorch.base import SegmentationModel

    exported = [name for name in smp.__all__ if inspect.isclass(getattr(smp, name, None))
                and issubclass(getattr(smp, name), SegmentationModel)]
    assert sorted(exported) == sorted(SMP_ARCHITECTURES)
    assert sorted(TINY) == sorted(SMP_ARCHITECTURES)


def test_seg_accel_imports_no_model_library_until_a_config_names_one():
    libraries = "('segmentation_models_pytorch', 'timm', 'torchvision')"
    code = ("import sys, seg_accel, seg_accel.models, seg_accel.cli, seg_accel.engine, seg_accel.inference\n"
            f"print(sorted(m for m in {libraries} if m in sys.modules))\n"
            "from seg_accel.models.families import model_family\n"
            "model_family('SegformerForSemanticSegmentation')\n"
            # transformers' modelling code imports torchvision itself where it is installed
            f"print(sorted(m for m in {libraries}[:2] if m in sys.modules))\n"
            "model_family('smp.Unet')\n"
            "print('segmentation_models_pytorch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[:3] == ["[]", "[]", "True"]


@pytest.mark.parametrize("arch", sorted(TINY))
def test_every_architecture_trains_from_yaml_and_exports_in_smps_format(arch, tmp_path, fresh_accelerate):
    trainer, _ = make_trainer(tmp_path, smp_config(arch))
    trainer.train()
    losses = [r["loss"] for r in json_log(tmp_path / "work") if r.get("mode") == "train"]
    assert losses and all(loss == loss and loss > 0 for loss in losses)  # finite, positive
    final = tmp_path / "work" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["_model_class"] == arch and config["classes"] == 4 and config["_seg_accel_family"] == "smp"
    # smp passes every other key to the constructor: its options and a timm encoder's extra arguments
    extra = set(TINY[arch].get("encoder_params", {}))
    assert {k for k in config if not k.startswith("_")} <= set(inspect.signature(getattr(smp, arch)).parameters) | extra

    from seg_accel.models import load_model

    trained = trainer.accelerator.unwrap_model(trainer.model).eval()
    by_smp = smp.from_pretrained(str(final)).eval()
    by_us = load_model(final).eval()
    side = SIDE.get(arch, 64)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        expected = trained(x)
        assert torch.equal(by_smp(x), expected) and torch.equal(by_us(x), expected)


def test_models_take_inputs_of_any_size_padding_to_the_output_stride():
    """FPN needs sides divisible by 32 (smp raises); seg-accel pads with zeros and crops."""
    model = build(smp_model("FPN")).eval()
    x = torch.randn(1, 3, 50, 70)
    with pytest.raises(RuntimeError, match="divisible by 32"):
        smp.FPN(**{k: v for k, v in smp_model("FPN").items() if k != "type"}, classes=3)(x)
    with torch.no_grad():
        logits = model(x)
        padded = nn.functional.pad(x, (0, 26, 0, 14))  # to 64 x 96
        reference = type(model).forward(model, padded)[..., :50, :70]  # smp's forward, without the hooks
    assert logits.shape == (1, 3, 50, 70) and torch.equal(logits, reference)


@pytest.mark.parametrize("arch", ["Unet", "DeepLabV3Plus", "FPN"])
def test_whole_slide_and_aug_test_inference(arch):
    from seg_accel.config.schema import TestConfig
    from seg_accel.inference.inferencer import Inferencer

    model = build(smp_model(arch)).eval()
    x = torch.randn(1, 3, 50, 70)
    whole = Inferencer(TestConfig()).scores(model, x, (50, 70))
    with torch.no_grad():
        assert torch.equal(whole, model(x))
    # one window covering the image is the whole image
    one = Inferencer(TestConfig(mode="slide", crop_size=[50, 70], stride=[50, 70])).scores(model, x, (50, 70))
    assert torch.equal(one, whole)
    slide = Inferencer(TestConfig(mode="slide", crop_size=[40, 40], stride=[20, 30])).scores(model, x, (50, 70))
    with torch.no_grad():  # windows at y 0, 10 and x 0, 30: the top-left corner is the first window's only
        assert torch.allclose(slide[..., :10, :30], model(x[..., :40, :40])[..., :10, :30], atol=1e-6)
    aug = Inferencer(TestConfig(img_ratios=[0.75, 1.25], flip=True)).scores(model, x, (50, 70))
    assert aug.shape == (1, 3, 50, 70) and torch.allclose(aug.sum(1), torch.ones(1, 50, 70), atol=1e-5)


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("option, value, key, message", [
    ("decoder_chanels", [16], "model.decoder_chanels", "has no option 'decoder_chanels'"),
    ("encoder_depth", "five", "model.encoder_depth", "expected"),
    ("decoder_channels", 16, "model.decoder_channels", "expected"),
    ("aux_params", {"classes": 3}, "model.aux_params", "image-level classification head"),
    ("activation", "softmax2d", "model.activation", "take logits"),
    ("classes", 3, "model.classes", "set by seg-accel"),
    ("in_channels", 4, "model.in_channels", "3-channel"),
    ("encoder_params", {"drop_path_rate": 0.1}, "model.encoder_params", "timm encoder"),
    ("encoder_name", "resnet19", "model.encoder_name", "smp has no encoder 'resnet19'"),
])
def test_option_mistakes_name_the_key(option, value, key, message):
    model = {**smp_model("Unet"), option: value}
    with pytest.raises(ConfigError, match=message) as info:
        from seg_accel.models import build_empty_model

        check(model)
        build_empty_model(parse_section(model, ModelConfig, "model"), ["a", "b", "c"])
    assert info.value.key == key


def test_an_unknown_architecture_and_head_options_elsewhere_are_config_errors():
    with pytest.raises(ConfigError, match="unknown segmentation_models_pytorch architecture 'smp.Unett'") as info:
        MODELS.get("smp.Unett", "model.type")
    assert info.value.key == "model.type" and "smp.Unet" in info.value.message
    MODELS.register("PlainUnet")(PlainUnet)
    try:  # a plain module's auxiliary head is its own: no FCN head options
        with pytest.raises(ConfigError, match="brings its own auxiliary head") as info:
            check({"type": "PlainUnet", "auxiliary_head": {"channels": 16}})
        assert info.value.key == "model.auxiliary_head.channels"
    finally:
        MODELS._entries.pop("PlainUnet", None)
    with pytest.raises(ConfigError, match="in_index must be in") as info:
        build(smp_model("Unet", auxiliary_head={"in_index": 6}))
    assert info.value.key == "model.auxiliary_head.in_index"


@pytest.mark.parametrize("option, value, key", [("decoder_chanels", [16], "model.decoder_chanels"),
                                                ("aux_params", {"classes": 4}, "model.aux_params")])
def test_the_train_command_stops_in_one_line_with_exit_2(option, value, key, tmp_path):
    cfg = smp_config()
    cfg["model"][option] = value
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = run_script([str(REPO / "scripts/train.py"), str(path)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {key}:"), lines


def test_unreachable_encoder_weights_are_one_line_naming_the_key(tmp_path, fresh_accelerate):
    cfg = smp_config()
    cfg["model"]["encoder_weights"] = "imagenet"
    with pytest.raises(ConfigError, match="cannot download encoder_weights 'imagenet' for resnet18 "
                                          r"\(HF_HUB_OFFLINE is set\)") as info:
        make_trainer(tmp_path, cfg)
    assert info.value.key == "model.encoder_weights" and "\n" not in info.value.message


# --------------------------------------------------------------------------- encoders
def test_a_timm_encoder_trains_with_layer_wise_decay_numbered_like_mmsegmentation(tmp_path, fresh_accelerate):
    cfg = smp_config(encoder_name="tu-convnext_atto")
    cfg["optimizer"] = {"type": "AdamW", "lr": 0.001, "weight_decay": 0.05,
                        "constructor": "LearningRateDecayOptimizerConstructor",
                        "paramwise_cfg": {"decay_rate": 0.9, "decay_type": "stage_wise", "num_layers": 12}}
    trainer, _ = make_trainer(tmp_path, cfg)
    from seg_accel.models.families import family_of_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    ids = family_of_model(model).layer_ids(model, 12, "stage_wise")
    # MMSegmentation's stage_wise ids: stem and downsampling layers 0, block j of stage i: i + 1,
    # everything else (decoder, head) num_layers + 1
    assert ids("encoder.model.stem_0.weight") == 0 and ids("encoder.model.stages_2.downsample.1.weight") == 0
    assert ids("encoder.model.stages_0.blocks.1.gamma") == 1 and ids("encoder.model.stages_3.blocks.0.gamma") == 4
    assert ids("decoder.blocks.0.conv1.0.weight") == 13 and ids("segmentation_head.0.weight") == 13
    layer = family_of_model(model).layer_ids(model, 12, "layer_wise")
    assert layer("encoder.model.stages_2.blocks.4.gamma") == 3 + 4 // 3 and layer("encoder.model.stages_1.downsample.1.weight") == 2
    lrs = {group["lr"] for group in trainer.optimizer.param_groups}
    assert len(lrs) == 6  # ids 0..4 and the head (13): base_lr * 0.9 ** (13 - id), distinct
    trainer.train()
    assert all(r["loss"] > 0 for r in json_log(tmp_path / "work") if r.get("mode") == "train")


def test_backbone_pretrained_fills_the_encoder(tmp_path):
    from seg_accel.models import export_model

    source = build(smp_model("Unet"))
    export_model(source, tmp_path / "src", ["a", "b", "c"])
    target = build(smp_model("Unet", backbone_pretrained=str(tmp_path / "src")))
    src, dst = source.state_dict(), target.state_dict()
    encoder = [k for k in dst if k.startswith("encoder.")]
    assert encoder and all(torch.equal(src[k], dst[k]) for k in encoder)
    assert not torch.equal(src["segmentation_head.0.weight"], dst["segmentation_head.0.weight"])


# --------------------------------------------------------------------------- heads
def test_the_auxiliary_fcn_head_trains_is_logged_and_stays_out_of_the_export(tmp_path, fresh_accelerate):
    from safetensors.torch import load_file

    aux = {"loss_decode": {"type": "CrossEntropyLoss", "loss_weight": 0.4}, "in_index": 3, "channels": 16,
           "num_convs": 2, "concat_input": True, "dropout_ratio": 0.1}
    trainer, _ = make_trainer(tmp_path, smp_config(iters=3, auxiliary_head=aux))
    model = trainer.accelerator.unwrap_model(trainer.model)
    head = model.auxiliary_head
    before = head.conv_seg.weight.detach().clone()
    assert head.convs[0][0].in_channels == model.encoder.out_channels[3] and head.conv_cat is not None
    trainer.train()
    assert not torch.equal(before, head.conv_seg.weight)  # it trained
    train = [r for r in json_log(tmp_path / "work") if r.get("mode") == "train"]
    for record in train:
        assert record["aux.loss_ce"] > 0 and record["loss"] == pytest.approx(record["decode.loss_ce"] + record["aux.loss_ce"], abs=2e-4)
    exported = load_file(str(tmp_path / "work" / "final" / "model.safetensors"))
    assert not any(k.startswith("auxiliary_head.") for k in exported)
    assert any(k.startswith("auxiliary_head.") for k in model.state_dict())  # checkpoints keep it (resume)
    smp.from_pretrained(str(tmp_path / "work" / "final"))  # strict: exactly smp's model


def test_a_one_channel_sigmoid_head(tmp_path, fresh_accelerate):
    cfg = smp_config(iters=2)
    cfg["data"].update(binary_shape_folders(tmp_path, 4, 64, {"train": [NORMALIZE], "val": [NORMALIZE]}))
    cfg["model"]["decode_head"] = {"out_channels": 1, "loss_decode": {"type": "CrossEntropyLoss", "use_sigmoid": True}}
    trainer, _ = make_trainer(tmp_path, cfg)
    assert trainer.accelerator.unwrap_model(trainer.model).segmentation_head[0].out_channels == 1
    results = trainer.train()
    assert len(results["per_class"]["IoU"]) == 2
    assert json.loads((tmp_path / "work" / "final" / "config.json").read_text())["_id2label"] == {"0": "shape"}


# --------------------------------------------------------------------------- same numbers as a plain module
class PlainUnet(nn.Module):
    """A plain ``nn.Module`` (the module family) holding the same smp Unet's parts under the same
    names: whatever differs in training is seg-accel's smp family, not the network."""

    def __init__(self, num_classes: int):
        super().__init__()
        net = smp.Unet(**{k: v for k, v in smp_model("Unet").items() if k != "type"}, classes=num_classes)
        self.encoder, self.decoder, self.segmentation_head = net.encoder, net.decoder, net.segmentation_head

    def forward(self, pixel_values):
        return self.segmentation_head(self.decoder(self.encoder(pixel_values)))


def test_ohem_two_losses_class_weights_and_paramwise_give_the_numbers_of_a_plain_module(tmp_path):
    MODELS.register("PlainUnet")(PlainUnet)
    try:
        cfg = smp_config(iters=4)
        cfg["model"]["decode_head"] = {
            "sampler": {"type": "OHEMPixelSampler", "thresh": 0.7, "min_kept": 100},
            "loss_decode": [{"type": "CrossEntropyLoss", "loss_weight": 1.0, "class_weight": [0.5, 1.0, 1.5, 2.0]},
                            {"type": "DiceLoss", "loss_weight": 0.5}]}
        cfg["optimizer"] = {"type": "AdamW", "lr": 0.001, "weight_decay": 0.01, "paramwise_cfg": {
            "custom_keys": {"decoder": {"lr_mult": 2.0}, "head": {"lr_mult": 10.0}, "encoder": {"decay_mult": 0.0}}}}
        cfg["log_config"] = {"interval": 1}
        plain = copy.deepcopy(cfg)
        plain["model"] = {"type": "PlainUnet", "decode_head": cfg["model"]["decode_head"]}
        runs = {}
        for name, config in (("smp", cfg), ("plain", plain)):
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            trainer, _ = make_trainer(tmp_path / name, config)
            runs[name] = (trainer, trainer.train())
        records = {name: [r for r in json_log(tmp_path / name / "work") if r.get("mode") == "train"] for name in runs}
        assert len(records["smp"]) == 4
        for a, b in zip(records["smp"], records["plain"]):
            for key in ("loss", "decode.loss_ce", "decode.loss_dice", "lr"):
                assert a[key] == b[key], key
        groups = {name: sorted((g["lr"], g["weight_decay"], len(g["params"])) for g in t.optimizer.param_groups)
                  for name, (t, _) in runs.items()}
        assert groups["smp"] == groups["plain"] and len(groups["smp"]) >= 3
        weights = {name: t.accelerator.unwrap_model(t.model).state_dict() for name, (t, _) in runs.items()}
        assert all(torch.equal(weights["smp"][k], weights["plain"][k]) for k in weights["plain"])
    finally:
        MODELS._entries.pop("PlainUnet", None)


def test_the_parameter_group_table_shows_what_head_decoder_and_encoder_match(tmp_path, fresh_accelerate, caplog):
    cfg = smp_config(iters=1)
    cfg["optimizer"]["paramwise_cfg"] = {"custom_keys": {"head": {"lr_mult": 10.0}}}
    trainer, _ = make_trainer(tmp_path, cfg)
    model = trainer.accelerator.unwrap_model(trainer.model)
    tenfold = [g for g in trainer.optimizer.param_groups if g["lr"] == pytest.approx(0.01)]
    names = {n for n, p in model.named_parameters() if any(p is q for g in tenfold for q in g["params"])}
    assert names == {"segmentation_head.0.weight", "segmentation_head.0.bias"}  # not the decoder


def test_predict_from_an_smp_export_names_its_classes(tmp_path):
    import numpy as np
    from PIL import Image

    from seg_accel.inference.predict import Predictor
    from seg_accel.models import export_model

    model = build(smp_model("DeepLabV3Plus"))
    export_model(model, tmp_path / "export", ["sky", "road", "car"])
    predictor = Predictor.from_export(tmp_path / "export")
    assert predictor.classes == ["sky", "road", "car"]
    Image.fromarray((np.random.default_rng(0).random((45, 61, 3)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    from seg_accel.cli import main

    assert main(["predict", str(tmp_path / "export"), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]) == 0
    label = np.asarray(Image.open(next((tmp_path / "out" / "labels").iterdir())))
    assert label.shape == (45, 61) and set(np.unique(label)) <= {0, 1, 2}


def test_sync_bn_converts_an_smp_model_and_its_auxiliary_head():
    from seg_accel.models.builder import convert_sync_bn

    model = build(smp_model("Unet", auxiliary_head={"channels": 16}))
    batch_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    converted, note = convert_sync_bn(model, 2, "cuda")  # what a 2-GPU run does (the conversion itself runs anywhere)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == batch_norms
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.auxiliary_head.modules())
    assert f"{batch_norms} BatchNorm layer(s) converted" in note
    with torch.no_grad():  # the padding and the head's hooks survive the conversion
        assert converted.eval()(torch.randn(1, 3, 50, 70)).shape == (1, 3, 50, 70)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_ddp_looks_for_unused_parameters_exactly_where_smp_leaves_some(arch):
    """A parameter without a gradient stops DDP unless find_unused_parameters: the family's
    answer must cover every architecture's (PSPNet's stages past encoder_depth, DPT's ViT head)."""
    from seg_accel.models import needs_unused_parameter_search

    model = build(smp_model(arch, auxiliary_head={"channels": 16})).train()
    side = SIDE.get(arch, 64)
    out = model(torch.randn(2, 3, side, side))
    (out["logits"].sum() + out["aux_logits"].sum()).backward()
    unused = [name for name, p in model.named_parameters() if p.grad is None]
    assert needs_unused_parameter_search(model, aux_trained=True) == bool(unused), unused
