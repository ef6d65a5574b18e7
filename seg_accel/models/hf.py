"""The transformers family: ``*ForSemanticSegmentation`` classes (SegFormer, UperNet, DPT, BEiT, ...).

``model.type`` is a transformers class name (or ``AutoModelForSemanticSegmentation``);
``model.pretrained`` a Hub id or ``save_pretrained`` folder; without it ``model.config``
holds the config kwargs for a random init. transformers accepts unknown config kwargs
silently, so they are checked here. Exports are ``save_pretrained`` folders that
``AutoModelForSemanticSegmentation.from_pretrained`` and ``pipeline`` load.
"""
from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from seg_accel.config.types import join_key, parse_value, type_hints
from seg_accel.errors import ConfigError, did_you_mean
from seg_accel.models.families import register_family
from seg_accel.models.interface import LayerIds, ModelFamily, SegOutput, as_seg_output, label_maps, run_model

if TYPE_CHECKING:
    from seg_accel.config.schema import ModelConfig

logger = logging.getLogger("seg_accel")

# Config keys every transformers config takes besides its own signature.
_COMMON_CONFIG_KEYS = {"num_labels", "id2label", "label2id", "model_type", "output_attentions"}
# Model types whose segmentation forward leaves parameters without gradients even
# with the auxiliary head off (DPT: the backbone's final layernorm and the first
# fusion layer's residual unit), so DDP must look for unused parameters.
_UNUSED_PARAMETER_MODEL_TYPES = {"dpt"}


def auto_class() -> Any:
    import transformers

    return transformers.AutoModelForSemanticSegmentation


def is_transformers_class(obj: Any) -> bool:
    from transformers import PreTrainedModel

    return obj is auto_class() or (inspect.isclass(obj) and issubclass(obj, PreTrainedModel))


def config_class(model_cls: Any, config_kwargs: dict, key: str) -> Any | None:
    """The config class for ``model.config`` kwargs, or None when only known after loading."""
    from transformers import CONFIG_MAPPING

    model_type = config_kwargs.get("model_type")
    if model_cls is auto_class():
        if model_type is None:
            return None
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(
                f"unknown transformers model_type '{model_type}'." + did_you_mean(model_type, CONFIG_MAPPING.keys(), False),
                key=f"{key}.config.model_type",
            )
        return CONFIG_MAPPING[model_type]
    return getattr(model_cls, "config_class", None)


def allowed_config_keys(config_cls: Any) -> tuple[set[str], dict[str, Any]]:
    params = inspect.signature(config_cls.__init__).parameters
    allowed = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    allowed |= set(config_cls().to_dict()) | _COMMON_CONFIG_KEYS
    return allowed, type_hints(config_cls.__init__)


def check_config_kwargs(config_cls: Any, kwargs: dict, key: str) -> None:
    """Unknown keys and wrong value types in ``model.config`` are errors (with suggestions)."""
    from transformers import CONFIG_MAPPING

    allowed, hints = allowed_config_keys(config_cls)
    for name, value in kwargs.items():
        item_key = join_key(key, name)
        if name not in allowed:
            raise ConfigError(
                f"{config_cls.__name__} has no option '{name}'." + did_you_mean(str(name), sorted(allowed), False),
                key=item_key,
            )
        if name == "backbone_config" and isinstance(value, dict):
            backbone_type = value.get("model_type")
            if backbone_type not in CONFIG_MAPPING:
                raise ConfigError(
                    f"needs 'model_type' naming a transformers backbone config (e.g. convnext), got {backbone_type!r}",
                    key=item_key,
                )
            sub = {k: v for k, v in value.items() if k != "model_type"}
            check_config_kwargs(CONFIG_MAPPING[backbone_type], sub, item_key)
            continue
        if name in hints and name not in ("id2label", "label2id"):
            parse_value(value, hints[name], item_key)


def make_config(config_cls: Any, kwargs: dict, key: str) -> Any:
    """``config_cls(**kwargs)`` with transformers' validation errors turned into config errors."""
    try:
        return config_cls(**kwargs)
    except Exception as exc:  # transformers raises several types (TypeError, ValueError, strict-dataclass errors)
        reason = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in reason) if reason else type(exc).__name__
        raise ConfigError(f"invalid {config_cls.__name__}: {detail}", key=f"{key}.config") from exc


class AuxiliaryCapture:
    """Keeps the training-time output of ``model.auxiliary_head`` (transformers 5 returns no
    auxiliary logits from the forward), through a forward hook on the unwrapped model."""

    def __init__(self, model: nn.Module):
        head = getattr(model, "auxiliary_head", None)
        if head is None:
            raise ConfigError(f"{type(model).__name__} has no auxiliary head; remove auxiliary_head",
                              key="model.auxiliary_head")
        self.output = None
        head.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if module.training:  # evaluation never reads it: do not hold on to its memory
            self.output = output

    def pop(self) -> torch.Tensor:
        output, self.output = self.output, None
        if output is None:
            raise RuntimeError("the auxiliary head did not run in this forward pass")
        return output


@register_family(order=50)
class TransformersFamily(ModelFamily):
    """transformers ``*ForSemanticSegmentation`` models, called without labels (all losses are
    seg-accel's); the auxiliary head's output is captured from ``model.auxiliary_head``."""

    name = "transformers"

    def __init__(self, model_cls: Any):
        self.model_cls = model_cls

    @classmethod
    def from_entry(cls, entry: Any, type_name: str) -> TransformersFamily | None:
        return cls(entry) if is_transformers_class(entry) else None

    @classmethod
    def from_model(cls, model: nn.Module) -> TransformersFamily | None:
        from transformers import PreTrainedModel

        return cls(type(model)) if isinstance(model, PreTrainedModel) else None

    @classmethod
    def from_export(cls, config: dict[str, Any]) -> TransformersFamily | None:
        return cls(auto_class()) if "model_type" in config else None

    # -- config ---------------------------------------------------------------------------
    def _kwargs(self, model_cfg: ModelConfig, classes: list[str], key: str) -> tuple[Any, dict]:
        """(config class or None, config kwargs with the data's labels)."""
        outputs = model_cfg.decode_head.out_channels or len(classes)
        id2label, label2id = label_maps(classes, outputs)
        kwargs = dict(model_cfg.config)
        kwargs.update(num_labels=outputs, id2label=id2label, label2id=label2id)
        model_type = kwargs.pop("model_type", None)
        config_cls = config_class(self.model_cls, {"model_type": model_type}, key)
        if config_cls is not None and "use_auxiliary_head" in allowed_config_keys(config_cls)[0]:
            # The auxiliary head exists exactly when model.auxiliary_head gives it losses: one
            # nobody trains would leave parameters without gradients under DDP.
            kwargs["use_auxiliary_head"] = model_cfg.auxiliary_head is not None
        return config_cls, kwargs

    def check(self, model_cfg: ModelConfig, classes: list[str], key: str) -> None:
        if model_cfg.options:
            import dataclasses

            name = next(iter(model_cfg.options))
            known = [f.name for f in dataclasses.fields(model_cfg) if not f.metadata.get("extra")]
            raise ConfigError(f"unknown key '{name}' in '{key}' (a transformers model takes its config options in "
                              f"{key}.config)." + did_you_mean(str(name), known), key=f"{key}.{name}")
        config_cls = config_class(self.model_cls, model_cfg.config, key)
        kwargs = {k: v for k, v in model_cfg.config.items() if k != "model_type"}
        if model_cfg.pretrained is None:
            if config_cls is None:
                raise ConfigError(
                    "AutoModelForSemanticSegmentation without 'pretrained' needs model.config.model_type "
                    "(e.g. segformer) to know which architecture to build",
                    key=f"{key}.config",
                )
            check_config_kwargs(config_cls, kwargs, f"{key}.config")
            make_config(config_cls, kwargs, key)  # transformers' own checks
        elif config_cls is not None:
            check_config_kwargs(config_cls, kwargs, f"{key}.config")
        if classes:
            self._check_against_data(model_cfg, classes, config_cls, key)

    def _check_against_data(self, model_cfg: ModelConfig, classes: list[str], config_cls: Any, key: str) -> None:
        n = len(classes)
        outputs = model_cfg.decode_head.out_channels or n
        num_labels = model_cfg.config.get("num_labels")
        if num_labels is not None and num_labels != outputs:
            hint = ("; for one sigmoid channel set model.decode_head.out_channels: 1" if num_labels == 1 and n == 2
                    else "; remove num_labels (it is taken from the data) or fix the class names")
            raise ConfigError(
                f"num_labels is {num_labels} but the data defines {n} classes ({', '.join(classes)}){hint}",
                key=f"{key}.config.num_labels",
            )
        id2label = model_cfg.config.get("id2label")
        if id2label is not None:
            given = [id2label[k] for k in sorted(id2label, key=int)] if isinstance(id2label, dict) else None
            if given != list(classes):
                raise ConfigError(
                    f"id2label {id2label} disagrees with the data's classes {classes}; remove it (it is taken from "
                    "the data)", key=f"{key}.config.id2label",
                )
        if config_cls is None:  # a pretrained Auto model: known once loaded
            return
        switch = model_cfg.config.get("use_auxiliary_head")
        if switch is True and model_cfg.auxiliary_head is None:
            raise ConfigError("the auxiliary head would get no loss: configure model.auxiliary_head (its losses) "
                              "or remove use_auxiliary_head", key=f"{key}.config.use_auxiliary_head")
        if switch is False and model_cfg.auxiliary_head is not None:
            raise ConfigError("contradicts model.auxiliary_head; remove one of them",
                              key=f"{key}.config.use_auxiliary_head")

    def _instantiate(self, config: Any) -> nn.Module:
        return auto_class().from_config(config) if self.model_cls is auto_class() else self.model_cls(config)

    def build(self, model_cfg: ModelConfig, classes: list[str], key: str) -> nn.Module:
        config_cls, kwargs = self._kwargs(model_cfg, classes, key)
        if model_cfg.pretrained is not None:
            source = model_cfg.pretrained
            try:
                return self.model_cls.from_pretrained(source, ignore_mismatched_sizes=True, **kwargs)
            except OSError as exc:
                where = "local folder" if os.path.isdir(source) else "Hub id (or a local path that does not exist)"
                raise ConfigError(f"cannot load pretrained model '{source}' ({where}): {exc}",
                                  key=f"{key}.pretrained") from exc
        return self._instantiate(make_config(config_cls, kwargs, key))

    def build_empty(self, model_cfg: ModelConfig, classes: list[str], key: str) -> nn.Module | None:
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        config_cls, kwargs = self._kwargs(model_cfg, classes, key)
        if model_cfg.pretrained is not None:
            try:
                loader = config_cls if config_cls is not None else AutoConfig
                config = loader.from_pretrained(model_cfg.pretrained, **kwargs)
            except OSError:
                return None
        else:
            config = make_config(config_cls, kwargs, key)
        try:
            with init_empty_weights():
                return self._instantiate(config)
        except Exception as exc:  # any failure here is a config mistake; say which model and why
            raise ConfigError(
                f"{getattr(self.model_cls, '__name__', self.model_cls)} cannot be built from this config: "
                f"{type(exc).__name__}: {exc}",
                key=f"{key}.config",
            ) from exc

    def has_auxiliary_head(self, model_cfg: ModelConfig) -> bool | None:
        config_cls = config_class(self.model_cls, model_cfg.config, "model")
        if config_cls is None:  # a pretrained Auto model: known once loaded
            return None
        return "use_auxiliary_head" in allowed_config_keys(config_cls)[0]

    # -- training -------------------------------------------------------------------------
    def forward_fn(self, model: nn.Module, auxiliary: bool) -> Callable[[nn.Module, torch.Tensor], SegOutput]:
        capture = AuxiliaryCapture(model) if auxiliary else None

        def forward(wrapped: nn.Module, pixel_values: torch.Tensor) -> SegOutput:
            out = as_seg_output(run_model(wrapped, pixel_values))
            return SegOutput(out.logits, capture.pop()) if capture is not None else out

        return forward

    def needs_unused_parameter_search(self, model: nn.Module, aux_trained: bool) -> bool:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) in _UNUSED_PARAMETER_MODEL_TYPES:
            return True
        # an auxiliary head (e.g. of a pretrained Auto model) that gets no loss
        return getattr(model, "auxiliary_head", None) is not None and not aux_trained

    def backbone(self, model: nn.Module) -> tuple[str, nn.Module] | None:
        """The model's ``backbone`` (UperNet and other backbone-based models), else its base
        model (``dpt``, ``beit``, ``segformer``)."""
        found = super().backbone(model)
        if found is not None:
            return found
        prefix = getattr(model, "base_model_prefix", "")
        base = getattr(model, prefix, None) if prefix else None
        return (prefix, base) if isinstance(base, nn.Module) else None

    def backbone_weights(self, target_name: str, target: nn.Module,
                         source: str) -> tuple[str, Iterator[dict[str, torch.Tensor]]]:
        """The source model's tensors (those its checkpoint holds), then the same under the names
        ``save_pretrained`` writes: transformers 5 renamed some modules (ViT: layers.N.attention.
        q_proj) but not others (DPT's ViT encoder keeps encoder.layer.N.attention.attention.query)
        and writes checkpoints under the old names (one save to a temporary folder)."""
        from transformers import AutoModel

        if target_name == "backbone" and hasattr(target, "out_features"):
            # the backbone's own class (AutoBackbone asks the Hub first, even for a local folder)
            model, info = type(target).from_pretrained(source, out_features=list(target.out_features),
                                                       output_loading_info=True)
        else:  # its pooler, if any, matches nothing: unused
            model, info = AutoModel.from_pretrained(source, output_loading_info=True)
        missing = set(info.get("missing_keys", ()))

        def readings() -> Iterator[dict[str, torch.Tensor]]:
            yield {k: v for k, v in model.state_dict().items() if k not in missing}
            yield {k: v for k, v in saved_names(model).items() if k not in missing}

        return type(model).__name__, readings()

    def layer_ids(self, model: nn.Module, num_layers: int, decay_type: str) -> LayerIds | None:
        kind = backbone_kind(model)
        if kind is None:
            return None
        if decay_type == "stage_wise" and kind != "convnext":
            raise ConfigError("decay_type stage_wise is for ConvNeXt backbones", key="optimizer.paramwise_cfg.decay_type")
        return lambda name: layer_id(name, kind, num_layers, decay_type)

    def output_channels(self, model: nn.Module) -> int | None:
        config = getattr(model, "config", None)
        return int(config.num_labels) if hasattr(config, "num_labels") else None

    # -- export ---------------------------------------------------------------------------
    def export(self, model: nn.Module, folder: Path, classes: list[str],
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
        model.save_pretrained(folder, state_dict=state_dict)

    def load_export(self, folder: Path, config: dict[str, Any], trust_remote_code: bool = False) -> nn.Module:
        # transformers guards code named by a config (auto_map) behind the same switch
        return auto_class().from_pretrained(folder, trust_remote_code=trust_remote_code)

    def export_state_dict(self, folder: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loaded through transformers, which maps the checkpoint's key names to the model's."""
        return self.load_export(folder, config).state_dict()

    def describe_export(self, config: dict[str, Any]) -> dict[str, str]:
        return {"architecture": str((config.get("architectures") or ["?"])[0]), "library": "transformers",
                "tag": str(config.get("model_type", "model"))}

    def usage(self, repo_or_folder: str, config: dict[str, Any]) -> list[str]:
        repo = repo_or_folder
        return ["```python",
                "from transformers import pipeline", "",
                f'segmenter = pipeline("image-segmentation", model="{repo}")',
                'masks = segmenter("image.jpg")  # one {"label", "mask"} per class present', "```", "",
                "or, for the logits:", "", "```python",
                "import torch",
                "from PIL import Image",
                "from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation", "",
                f'processor = AutoImageProcessor.from_pretrained("{repo}")',
                f'model = AutoModelForSemanticSegmentation.from_pretrained("{repo}").eval()',
                'image = Image.open("image.jpg").convert("RGB")',
                "with torch.no_grad():",
                '    logits = model(**processor(image, return_tensors="pt")).logits',
                "logits = torch.nn.functional.interpolate(logits, size=image.size[::-1], mode=\"bilinear\")",
                "labels = logits.argmax(1)[0]  # (height, width) class indices; model.config.id2label names them",
                "```", ""]


def saved_names(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the names ``save_pretrained`` writes (the checkpoint format),
    without the base model prefix."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(os.listdir(tmp)):
            if file.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(tmp, file)))
    prefix = getattr(model, "base_model_prefix", "")
    return {k[len(prefix) + 1:] if prefix and k.startswith(prefix + ".") else k: v for k, v in tensors.items()}


# --------------------------------------------------------------------------- layer-wise lr decay
_VIT_EMBED = re.compile(r"^[^.]+\.embeddings\.")
_VIT_BLOCK = re.compile(r"^[^.]+\.(?:layers|encoder\.layer)\.(\d+)\.")
_CONVNEXT_STEM = re.compile(r"^backbone\.embeddings\.")
_CONVNEXT_DOWN = re.compile(r"^backbone\.encoder\.stages\.(\d+)\.downsampling_layer\.")
_CONVNEXT_BLOCK = re.compile(r"^backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.")


def backbone_kind(model: nn.Module) -> str | None:
    """'vit' for BEiT/ViT-style encoders (BEiT, Data2Vec-Vision, DPT), 'convnext' for a
    ConvNeXt backbone (UperNet), else None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    backbone = getattr(getattr(config, "backbone_config", None), "model_type", None)
    if backbone in ("convnext", "convnextv2"):
        return "convnext"
    if model_type in ("beit", "data2vec-vision", "dpt") and backbone is None:
        return "vit"
    return None


def layer_id(name: str, kind: str, num_layers: int, decay_type: str) -> int:
    """MMSegmentation's layer ids, for transformers parameter names. ``num_layers`` is
    paramwise_cfg.num_layers; ids run 0 .. num_layers + 1 (heads and necks: the last)."""
    if kind == "vit":
        if _VIT_EMBED.match(name):
            return 0
        block = _VIT_BLOCK.match(name)
        return int(block.group(1)) + 1 if block else num_layers + 1
    if decay_type == "stage_wise":
        if _CONVNEXT_STEM.match(name) or _CONVNEXT_DOWN.match(name):
            return 0
        block = _CONVNEXT_BLOCK.match(name)
        return int(block.group(1)) + 1 if block else num_layers + 1
    if _CONVNEXT_STEM.match(name):
        return 0
    down = _CONVNEXT_DOWN.match(name)
    if down:
        return {0: 0, 1: 2, 2: 3}.get(int(down.group(1)), num_layers)
    block = _CONVNEXT_BLOCK.match(name)
    if block:
        stage, index = int(block.group(1)), int(block.group(2))
        return {0: 1, 1: 2, 2: 3 + index // 3}.get(stage, num_layers)
    return num_layers + 1
