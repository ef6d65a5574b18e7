"""SegFormer, UperNet (ConvNeXt), DPT and BEiT build from YAML-style configs and train."""
from __future__ import annotations

import pytest
import torch

from seg_accel.config.schema import ModelConfig
from seg_accel.config.types import parse_section
from seg_accel.errors import ConfigError
from seg_accel.losses import HeadLosses
from seg_accel.models import (
    build_model,
    needs_unused_parameter_search,
    segmentation_logits,
)
from seg_accel.models.builder import check_model_config

CLASSES = ["background", "a", "b"]

ARCHITECTURES = {
    "segformer": {
        "type": "SegformerForSemanticSegmentation",
        "config": {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2],
                   "decoder_hidden_size": 32},
    },
    "upernet_convnext": {
        "type": "UperNetForSemanticSegmentation",
        "config": {"hidden_size": 32, "auxiliary_channels": 16,
                   "backbone_config": {"model_type": "convnext", "hidden_sizes": [8, 16, 32, 64],
                                       "depths": [1, 1, 1, 1],
                                       "out_features": ["stage1", "stage2", "stage3", "stage4"]}},
    },
    "dpt": {
        "type": "DPTForSemanticSegmentation",
        "config": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
                   "image_size": 32, "patch_size": 8, "neck_hidden_sizes": [8, 16, 32, 32],
                   "fusion_hidden_size": 16, "backbone_out_indices": [0, 1, 2, 3]},
    },
    "beit": {
        "type": "BeitForSemanticSegmentation",
        "config": {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64,
                   "image_size": 32, "patch_size": 8, "out_indices": [0, 1, 2, 3], "pool_scales": [1, 2],
                   "auxiliary_channels": 16},
    },
}


def model_cfg(name: str) -> ModelConfig:
    return parse_section(ARCHITECTURES[name], ModelConfig, "model")


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_builds_and_trains(name):
    torch.manual_seed(0)
    model = build_model(model_cfg(name), CLASSES)
    assert model.config.id2label == {0: "background", 1: "a", 2: "b"} and model.config.num_labels == 3
    gen = torch.Generator().manual_seed(1)
    # smooth random images; the label is a function of the colour, so it can be learnt
    pixel_values = torch.nn.functional.interpolate(torch.randn(2, 3, 4, 4, generator=gen), size=(32, 32),
                                                   mode="bilinear")
    red, green = pixel_values[:, 0] > 0.3, pixel_values[:, 1] > 0.3
    labels = red.long() + (green & ~red).long() * 2
    labels[:, :4] = 255
    losses = HeadLosses([{"type": "CrossEntropyLoss"}], 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    history = []
    for _ in range(15):
        logits = segmentation_logits(model, pixel_values)
        loss, logs = losses(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    assert history[-1] < history[0] * 0.9, history  # it learns the fixed batch
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # the auxiliary head is off unless configured; DPT's own unused parameters are known
    assert bool(unused) == needs_unused_parameter_search(model), unused
    assert getattr(model, "auxiliary_head", None) is None


def test_unknown_backbone_option_is_named():
    cfg = ARCHITECTURES["upernet_convnext"] | {}
    cfg = {"type": cfg["type"], "config": dict(cfg["config"])}
    cfg["config"]["backbone_config"] = {**cfg["config"]["backbone_config"], "hidden_size": [1, 2]}
    with pytest.raises(ConfigError) as info:
        check_model_config(parse_section(cfg, ModelConfig, "model"))
    assert info.value.key == "model.config.backbone_config.hidden_size" and "hidden_sizes" in str(info.value)


def test_auto_model_needs_model_type_without_pretrained():
    with pytest.raises(ConfigError, match="model_type"):
        check_model_config(parse_section({"type": "AutoModelForSemanticSegmentation"}, ModelConfig, "model"))
    cfg = parse_section({"type": "AutoModelForSemanticSegmentation",
                         "config": {"model_type": "segformer", "hidden_sizes": [8, 16, 32, 64],
                                    "decoder_hidden_size": 16}}, ModelConfig, "model")
    check_model_config(cfg)
    assert type(build_model(cfg, CLASSES)).__name__ == "SegformerForSemanticSegmentation"


def test_pretrained_local_folder_and_missing_hub_id(tmp_path):
    model = build_model(model_cfg("segformer"), CLASSES)
    model.save_pretrained(tmp_path / "m")
    cfg = parse_section({"type": "SegformerForSemanticSegmentation", "pretrained": str(tmp_path / "m")},
                        ModelConfig, "model")
    loaded = build_model(cfg, ["x", "y"])  # new class names: head re-initialised, backbone kept
    assert loaded.config.num_labels == 2
    key = "segformer.stages.0.patch_embeddings.proj.weight"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])
    cfg = parse_section({"type": "SegformerForSemanticSegmentation", "pretrained": "nobody/no-such-model"},
                        ModelConfig, "model")
    with pytest.raises(ConfigError) as info:
        build_model(cfg, CLASSES)
    assert info.value.key == "model.pretrained"
