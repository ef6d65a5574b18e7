"""A model family that lives only here: the family-registry test trains, exports, reloads and
pushes with it, and no file of seg_accel knows it.

Its models (``ToyNet``) are plain modules, but the family is not seg-accel's module family:
it is asked first (order 10), writes its own export format (``toy.safetensors`` and a
``config.json`` with a ``toy`` section), numbers its layers for layer-wise lr decay and
writes its own model-card usage."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg_accel.errors import ConfigError
from seg_accel.models import ModelFamily, register_family
from seg_accel.registry import MODELS

WEIGHTS = "toy.safetensors"


@MODELS.register()
class ToyNet(nn.Module):
    """A stem at half resolution, ``depth`` stages and a 1x1 head."""

    def __init__(self, outputs: int, width: int = 8, depth: int = 2):
        super().__init__()
        self.outputs, self.width, self.depth = outputs, width, depth
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU())
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
                                    for _ in range(depth))
        self.head = nn.Conv2d(width, outputs, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.stem(pixel_values)
        for stage in self.stages:
            x = stage(x)
        return self.head(x)


@register_family(order=10)
class ToyFamily(ModelFamily):
    name = "toy"

    @classmethod
    def from_entry(cls, entry: Any, type_name: str) -> ToyFamily | None:
        return cls() if entry is ToyNet else None

    @classmethod
    def from_model(cls, model: nn.Module) -> ToyFamily | None:
        return cls() if isinstance(model, ToyNet) else None

    @classmethod
    def from_export(cls, config: dict[str, Any]) -> ToyFamily | None:
        return cls() if "toy" in config else None

    def check(self, model_cfg: Any, classes: list[str], key: str) -> None:
        unknown = set(model_cfg.options) - {"width", "depth"}
        if unknown:
            raise ConfigError(f"ToyNet takes width and depth, not {sorted(unknown)}", key=f"{key}.{sorted(unknown)[0]}")

    def build(self, model_cfg: Any, classes: list[str], key: str) -> nn.Module:
        return ToyNet(len(classes), **model_cfg.options)

    def layer_ids(self, model: nn.Module, num_layers: int, decay_type: str) -> Any:
        def layer_id(name: str) -> int:
            if name.startswith("stem."):
                return 0
            if name.startswith("stages."):
                return int(name.split(".")[1]) + 1
            return num_layers + 1

        return layer_id

    def output_channels(self, model: nn.Module) -> int | None:
        return model.outputs

    def export(self, model: nn.Module, folder: Path, classes: list[str],
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
        import json

        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in (state_dict or model.state_dict()).items()}, str(folder / WEIGHTS))
        config = {"toy": {"width": model.width, "depth": model.depth}, "outputs": model.outputs,
                  "id2label": {str(i): name for i, name in enumerate(classes)}}
        (folder / "config.json").write_text(json.dumps(config))

    def load_export(self, folder: Path, config: dict[str, Any], trust_remote_code: bool = False) -> nn.Module:
        from safetensors.torch import load_file

        model = ToyNet(config["outputs"], **config["toy"])
        model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
        return model

    def describe_export(self, config: dict[str, Any]) -> dict[str, str]:
        return {"architecture": "ToyNet", "library": "pytorch", "tag": "toy"}

    def usage(self, repo_or_folder: str, config: dict[str, Any]) -> list[str]:
        return ["```python", "import tests.integration.toy_family  # registers the toy family", "import seg_accel", "",
                f'model = seg_accel.load_model("{repo_or_folder}")  # a ToyNet', "```", ""]
