"""``model.backbone_pretrained``: ImageNet backbone weights into UperNet's backbone and into
DPT's ViT encoder (the recipes' pretrained checkpoints), from save_pretrained folders."""
from __future__ import annotations

import pytest
import torch

from seg_accel.config.schema import HeadConfig, ModelConfig
from seg_accel.errors import ConfigError
from seg_accel.models.builder import build_model

CLASSES = ["a", "b", "c"]
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def upernet(backbone: dict, source: str) -> ModelConfig:
    return ModelConfig(type="UperNetForSemanticSegmentation", backbone_pretrained=source,
                       config={"hidden_size": 16, "auxiliary_channels": 8,
                               "backbone_config": {**backbone, "out_features": STAGES}},
                       auxiliary_head=HeadConfig())


def test_convnext_and_swin_weights_load_into_upernet(tmp_path):
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        SwinConfig,
        SwinForImageClassification,
    )

    convnext = {"model_type": "convnext", "hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 2, 1]}
    swin = {"model_type": "swin", "embed_dim": 8, "depths": [1, 1, 2, 1], "num_heads": [1, 1, 2, 2],
            "window_size": 2, "image_size": 32}
    for name, backbone, source in (
        ("convnext", convnext, ConvNextForImageClassification(ConvNextConfig(**{k: v for k, v in convnext.items()
                                                                                if k != "model_type"}))),
        ("swin", swin, SwinForImageClassification(SwinConfig(**{k: v for k, v in swin.items() if k != "model_type"}))),
    ):
        source.save_pretrained(tmp_path / name)
        model = build_model(upernet(backbone, str(tmp_path / name)), CLASSES)
        prefix = source.base_model_prefix
        expected = {k.removeprefix(prefix + "."): v for k, v in source.state_dict().items()}
        loaded = model.backbone.state_dict()
        same = [k for k in loaded if (e := expected.get(k.removeprefix(prefix + "."))) is not None
                and torch.equal(loaded[k], e)]
        # every backbone tensor but the output norms UperNet adds (new in MMSegmentation too)
        assert len(same) == len([k for k in loaded if not k.startswith("hidden_states_norms")]) > 20, name


def test_vit_weights_load_into_dpt_under_their_old_names(tmp_path):
    from transformers import ViTConfig, ViTModel

    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8))
    vit.save_pretrained(tmp_path / "vit")
    cfg = ModelConfig(type="DPTForSemanticSegmentation", backbone_pretrained=str(tmp_path / "vit"),
                      config={"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
                              "intermediate_size": 64, "image_size": 32, "patch_size": 8,
                              "backbone_out_indices": [0, 1, 2, 3], "neck_hidden_sizes": [8, 16, 32, 32],
                              "fusion_hidden_size": 16})
    model = build_model(cfg, CLASSES)
    for i in range(4):  # transformers 5's ViT names (q_proj) vs DPT's (attention.attention.query)
        assert torch.equal(model.dpt.encoder.layer[i].attention.attention.query.weight,
                           vit.layers[i].attention.q_proj.weight)
        assert torch.equal(model.dpt.encoder.layer[i].output.dense.weight, vit.layers[i].mlp.fc2.weight)
    assert torch.equal(model.dpt.embeddings.position_embeddings, vit.embeddings.position_embeddings)
    with torch.no_grad():  # a 64x64 input: DPT resizes the 4x4 position grid it was given
        assert model(pixel_values=torch.randn(1, 3, 64, 64)).logits.shape[1] == 3


def test_a_backbone_of_another_architecture_is_a_config_error(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)).save_pretrained(tmp_path / "vit")
    convnext = {"model_type": "convnext", "hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}
    with pytest.raises(ConfigError, match="model.backbone_pretrained"):
        build_model(upernet(convnext, str(tmp_path / "vit")), CLASSES)
    with pytest.raises(ConfigError, match=r"model.backbone_pretrained.*cannot load backbone weights"):
        build_model(upernet(convnext, str(tmp_path / "missing")), CLASSES)
