"""Registries: register, lookup (names and dotted paths), signature checks, list_*()."""
from __future__ import annotations

import inspect

import pytest
import torch

from seg_accel import registry
from seg_accel.errors import ConfigError
from seg_accel.registry import LOSSES, OPTIMIZERS, TRANSFORMS, Registry


def test_register_build_and_list():
    reg = Registry("widget")

    @reg.register()
    class Gear:
        def __init__(self, teeth: int, ratio: float = 1.0):
            self.teeth, self.ratio = teeth, ratio

    @reg.register("cog")
    def make_cog(size: int = 3):
        return ("cog", size)

    assert reg.names() == ["Gear", "cog"]
    gear = reg.build({"type": "Gear", "teeth": 12, "ratio": 2}, "parts.0")
    assert (gear.teeth, gear.ratio) == (12, 2)
    assert reg.build({"type": "cog"}) == ("cog", 3)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("Gear")(make_cog)


def test_build_errors_name_the_path():
    reg = Registry("widget")

    @reg.register()
    class Gear:
        def __init__(self, teeth: int, ratio: float = 1.0):
            pass

    with pytest.raises(ConfigError) as info:
        reg.build({"type": "Gaer", "teeth": 1}, "parts.0")
    assert info.value.key == "parts.0.type" and "Did you mean: Gear" in str(info.value)
    with pytest.raises(ConfigError) as info:
        reg.build({"type": "Gear", "teeth": 1, "ratoi": 2.0}, "parts.0")
    assert info.value.key == "parts.0.ratoi" and "ratio" in str(info.value)
    with pytest.raises(ConfigError) as info:
        reg.build({"type": "Gear"}, "parts.0")
    assert "needs option(s): teeth" in str(info.value)
    with pytest.raises(ConfigError) as info:
        reg.build({"type": "Gear", "teeth": "many"}, "parts.0")
    assert info.value.key == "parts.0.teeth" and "integer" in str(info.value)
    with pytest.raises(ConfigError, match="missing 'type'"):
        reg.build({"teeth": 3}, "parts.0")


def test_type_as_dotted_import_path():
    loss = LOSSES.build({"type": "seg_accel.losses.cross_entropy.CrossEntropyLoss", "loss_weight": 2.0}, "x")
    assert loss.loss_weight == 2.0
    opt = OPTIMIZERS.build({"type": "torch.optim.SGD", "lr": 0.1}, "optimizer",
                           params=[torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(opt, torch.optim.SGD)
    with pytest.raises(ConfigError, match="cannot import"):
        LOSSES.get("no_such_pkg.MyLoss", "x.type")
    with pytest.raises(ConfigError, match="has no attribute"):
        LOSSES.get("seg_accel.losses.NoSuchLoss", "x.type")


def test_runtime_args_cannot_come_from_the_config():
    with pytest.raises(ConfigError, match="set by seg-accel"):
        OPTIMIZERS.check({"type": "SGD", "lr": 0.1, "params": []}, "optimizer")


@pytest.mark.parametrize("name", [n for n in dir(torch.optim)
                                  if inspect.isclass(getattr(torch.optim, n))
                                  and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
                                  and n != "Optimizer"])
def test_every_torch_optimizer_builds_by_name(name):
    assert name in registry.list_optimizers()
    opt = OPTIMIZERS.build({"type": name, "lr": 0.01}, "optimizer", params=[torch.nn.Parameter(torch.zeros(3, 3))])
    assert type(opt).__name__ == name


def test_list_functions_cover_every_registry():
    assert "CrossEntropyLoss" in registry.list_losses()
    assert set(registry.list_transforms()) >= {"Resize", "RandomCrop", "RandomFlip", "Normalize", "Pad"}
    assert set(registry.list_datasets()) >= {"SyntheticShapes", "CustomDataset"}
    assert "poly" in registry.list_lr_policies()
    models = registry.list_models()
    for name in ("SegformerForSemanticSegmentation", "UperNetForSemanticSegmentation",
                 "DPTForSemanticSegmentation", "BeitForSemanticSegmentation", "AutoModelForSemanticSegmentation"):
        assert name in models


MINIMAL_TRANSFORM_ARGS = {
    "Resize": {"scale": [16, 12]},
    "RandomCrop": {"crop_size": [8, 8]},
    "RandomFlip": {"prob": 1.0},
    "Normalize": {"mean": [1.0, 2.0, 3.0], "std": [1.0, 1.0, 1.0]},
    "Pad": {"size": [20, 20]},
    "RandomResize": {"scale": [28, 20], "ratio_range": [0.5, 2.0]},
    "RandomChoiceResize": {"scales": [[28, 20], [40, 30], [16, 12]]},
    "PhotoMetricDistortion": {},
}


@pytest.mark.parametrize("name", registry.list_transforms())
def test_every_transform_builds_and_keeps_image_and_label_aligned(name):
    import numpy as np

    transform = TRANSFORMS.build({"type": name, **MINIMAL_TRANSFORM_ARGS[name]}, "pipeline.0")
    img = torch.arange(3 * 10 * 14, dtype=torch.float32).view(3, 10, 14)
    label = torch.arange(10 * 14).view(10, 14) % 5
    out = transform({"img": img, "gt_seg_map": label}, np.random.default_rng(0))
    assert out["img"].shape[-2:] == out["gt_seg_map"].shape
    assert out["gt_seg_map"].dtype == torch.int64
