"""segmentation_models_pytorch (smp) architectures on any smp or timm (``tu-<name>``) encoder.

``model: {type: smp.Unet, encoder_name: resnet34, encoder_weights: null, ...}`` builds
``segmentation_models_pytorch.Unet(..., classes=<from the data>)``; every option is one of
the architecture's constructor arguments, checked against its signature and annotations
(``encoder_params`` passes extra arguments to a timm encoder). seg-accel adds two things
around the smp model, neither of which changes its parameters' names or its export:

- inputs whose sides are not multiples of the encoder's output stride (slide windows,
  aug-test ratios, odd image sizes) are padded for the forward pass and the logits cropped
  back, where smp itself raises;
- ``model.auxiliary_head`` builds MMSegmentation's ``FCNHead`` on one encoder feature
  (``in_index`` into smp's feature list: 0 is the image, i the feature at stride 2**i); in
  training the forward then returns ``{"logits", "aux_logits"}``.

The export is smp's own folder (``config.json`` with ``_model_class``, ``model.safetensors``
without the auxiliary head), so ``segmentation_models_pytorch.from_pretrained(folder)``
loads it; seg-accel's entries in ``config.json`` start with ``_`` (smp passes every other key
to the constructor) and its image processor lies beside it.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
import sys
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from seg_accel.errors import ConfigError, did_you_mean
from seg_accel.models.families import register_family
from seg_accel.models.interface import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    RETURN_AUX,
    LayerIds,
    ModelFamily,
    export_class_count,
    label_maps,
    load_export_weights,
)
from seg_accel.registry import SMP_ARCHITECTURES
from seg_accel.version import __version__

if TYPE_CHECKING:
    from seg_accel.config.schema import ModelConfig

logger = logging.getLogger("seg_accel")

SMP_MODULE = "segmentation_models_pytorch"
CLASS_KEY = "_model_class"  # smp's own config.json entry naming the architecture
AUX_PREFIX = "auxiliary_head."
# options seg-accel sets or refuses, with why
_SET_BY_SEG_ACCEL = {"classes": "the number of output channels comes from the data (decode_head.out_channels: 1 for "
                                "a sigmoid head)"}
FCN_DEFAULTS = {"in_index": -2, "channels": 256, "num_convs": 1, "kernel_size": 3, "concat_input": False,
                "dropout_ratio": 0.1}


def _is_smp_class(entry: Any) -> bool:
    if not (inspect.isclass(entry) and str(getattr(entry, "__module__", "")).startswith(SMP_MODULE)):
        return False
    from segmentation_models_pytorch.base import SegmentationModel

    return issubclass(entry, SegmentationModel)


def is_smp_model(model: nn.Module) -> bool:
    if SMP_MODULE not in sys.modules:  # never imported: no model can be one
        return False
    from segmentation_models_pytorch.base import SegmentationModel

    return isinstance(model, SegmentationModel)


def constructor_parameters(arch_cls: Any) -> dict[str, inspect.Parameter]:
    """The architecture's named constructor arguments (not ``self``, not ``**kwargs``)."""
    params = inspect.signature(arch_cls.__init__).parameters
    return {name: p for name, p in params.items()
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


# --------------------------------------------------------------------------- the auxiliary head
class FCNHead(nn.Module):
    """MMSegmentation's ``FCNHead``: ``num_convs`` conv-BN-ReLU of ``channels`` on one feature,
    optionally concatenated with the input and fused (``concat_input``), dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 1,
                 kernel_size: int = 3, concat_input: bool = False, dropout_ratio: float = 0.1):
        super().__init__()
        if num_convs == 0 and in_channels != channels:
            raise ValueError(f"num_convs: 0 passes the feature through, so channels must be its {in_channels}")

        def block(cin: int, cout: int, k: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.convs = nn.Sequential(*[block(in_channels if i == 0 else channels, channels, kernel_size)
                                     for i in range(num_convs)])
        self.conv_cat = block(in_channels + channels, channels, kernel_size) if concat_input else None
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)  # MMSegmentation's init of conv_seg
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        out = self.convs(feature)
        if self.conv_cat is not None:
            out = self.conv_cat(torch.cat([feature, out], dim=1))
        return self.conv_seg(self.dropout(out))


# --------------------------------------------------------------------------- forward hooks
class _PadToStride:
    """Pads inputs to a multiple of the encoder's output stride and crops the logits back; with
    an auxiliary head, also computes its logits (training only) from the encoder's features.
    Installed as forward (pre-)hooks on the smp model, so its parameters and export stay smp's."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.sizes: list[tuple[int, int]] = []
        self.features: list[torch.Tensor] | None = None
        model.register_forward_pre_hook(self.before)
        model.register_forward_hook(self.after)
        model.encoder.register_forward_hook(self.keep_features)

    @staticmethod
    def stride(model: nn.Module) -> int:
        if not getattr(model, "requires_divisible_input_shape", True):
            return 1
        return int(getattr(model.encoder, "output_stride", 32))

    def before(self, model: nn.Module, args: tuple) -> tuple:
        x = args[0]
        height, width = int(x.shape[-2]), int(x.shape[-1])
        self.sizes.append((height, width))
        stride = self.stride(model)
        pad_h, pad_w = (-height) % stride, (-width) % stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return (x, *args[1:])

    def keep_features(self, encoder: nn.Module, args: tuple, features: Any) -> None:
        wanted = encoder.training or getattr(self.model, RETURN_AUX, False)
        self.features = features if wanted and _aux_head(encoder) is not None else None

    def after(self, model: nn.Module, args: tuple, logits: Any) -> Any:
        height, width = self.sizes.pop()
        padded_h, padded_w = int(args[0].shape[-2]), int(args[0].shape[-1])
        logits = logits[..., :height, :width] if (padded_h, padded_w) != (height, width) else logits
        head = getattr(model, "auxiliary_head", None)
        if head is None or not (model.training or getattr(model, RETURN_AUX, False)) or self.features is None:
            return logits
        features, self.features = self.features, None
        if isinstance(features, tuple) and features and isinstance(features[0], (list, tuple)):
            features = features[0]  # a ViT encoder (DPT): (features, prefix tokens)
        feature = features[model.seg_accel_aux_index]
        aux = head(feature)
        # crop the part that covers padding (the feature's stride divides the padded size)
        scale_h, scale_w = aux.shape[-2] / padded_h, aux.shape[-1] / padded_w
        aux = aux[..., :max(1, round(height * scale_h)), :max(1, round(width * scale_w))]
        return {"logits": logits, "aux_logits": aux}


def _aux_head(encoder: nn.Module) -> nn.Module | None:
    return getattr(encoder, "_seg_accel_aux_head", None)


def install_forward(model: nn.Module, aux_head: nn.Module | None = None, in_index: int = -2) -> nn.Module:
    """The hooks above, on a built or loaded smp model (an auxiliary head becomes
    ``model.auxiliary_head``)."""
    if aux_head is not None:
        model.auxiliary_head = aux_head
        model.seg_accel_aux_index = in_index
        object.__setattr__(model.encoder, "_seg_accel_aux_head", aux_head)  # not a submodule of the encoder
    _PadToStride(model)
    return model


# --------------------------------------------------------------------------- layer-wise decay
_TIMM_CONVNEXT = [(re.compile(r"^encoder\.model\.stem_\d+\."), "backbone.embeddings."),
                  (re.compile(r"^encoder\.model\.stages_(\d+)\.downsample\."),
                   r"backbone.encoder.stages.\1.downsampling_layer."),
                  (re.compile(r"^encoder\.model\.stages_(\d+)\.blocks\.(\d+)\."), r"backbone.encoder.stages.\1.layers.\2.")]
_TIMM_VIT = [(re.compile(r"^encoder\.model\.(?:model\.)?(?:patch_embed|cls_token|pos_embed|reg_token)"),
              "vit.embeddings."),
             (re.compile(r"^encoder\.model\.(?:model\.)?blocks\.(\d+)\."), r"vit.layers.\1.")]


def _encoder_kind(model: nn.Module) -> str | None:
    names = [name for name, _ in model.named_parameters()]
    if any(_TIMM_CONVNEXT[2][0].match(n) for n in names) and any(_TIMM_CONVNEXT[0][0].match(n) for n in names):
        return "convnext"
    if any(_TIMM_VIT[1][0].match(n) for n in names):
        return "vit"
    return None


def _as_transformers_name(name: str, kind: str) -> str:
    for pattern, replacement in (_TIMM_CONVNEXT if kind == "convnext" else _TIMM_VIT):
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


# --------------------------------------------------------------------------- the family
@register_family(order=40)
class SmpFamily(ModelFamily):
    """segmentation_models_pytorch architectures (``smp.<name>``)."""

    name = "smp"
    export_metadata_prefix = "_"  # smp's from_pretrained passes other config.json keys to the constructor
    builds_auxiliary_head = True

    def __init__(self, arch_name: str):
        self.arch_name = arch_name

    @property
    def arch_cls(self) -> Any:
        import segmentation_models_pytorch as smp

        return getattr(smp, self.arch_name)

    @classmethod
    def from_entry(cls, entry: Any, type_name: str) -> SmpFamily | None:
        return cls(entry.__name__) if _is_smp_class(entry) else None

    @classmethod
    def from_model(cls, model: nn.Module) -> SmpFamily | None:
        return cls(type(model).__name__) if is_smp_model(model) else None

    @classmethod
    def from_export(cls, config: dict[str, Any]) -> SmpFamily | None:
        name = config.get(CLASS_KEY)
        return cls(name) if isinstance(name, str) and name in SMP_ARCHITECTURES else None

    # -- config ---------------------------------------------------------------------------
    def check(self, model_cfg: ModelConfig, classes: list[str], key: str) -> None:
        label = f"smp.{self.arch_name}"
        if model_cfg.config:
            raise ConfigError(f"model.config holds transformers config options; {label} takes its options directly "
                              f"under {key} ({key}: {{type: {label}, encoder_name: resnet34, ...}})",
                              key=f"{key}.config")
        if model_cfg.pretrained is not None:
            raise ConfigError(f"pretrained loads transformers checkpoints; {label} starts from encoder_weights (the "
                              "encoder's ImageNet weights) or from saved weights with load_from", key=f"{key}.pretrained")
        options = dict(model_cfg.options)
        params = constructor_parameters(self.arch_cls)
        hints = typing.get_type_hints(self.arch_cls.__init__)
        for name, value in options.items():
            where = f"{key}.{name}"
            if name in _SET_BY_SEG_ACCEL:
                raise ConfigError(f"'{name}' is set by seg-accel: {_SET_BY_SEG_ACCEL[name]}", key=where)
            if name == "aux_params":
                if value is None:
                    continue
                raise ConfigError("smp's aux_params adds an image-level classification head (one label per image), "
                                  "not MMSegmentation's auxiliary segmentation head: remove it and configure "
                                  "model.auxiliary_head (an FCN head on an encoder stage, with its own loss_decode)",
                                  key=where)
            if name == "activation":
                if value is None:
                    continue
                raise ConfigError("seg-accel's losses, metrics and predict take logits: remove activation (a "
                                  "1-channel head's sigmoid and the softmax are applied where needed)", key=where)
            if name == "in_channels" and value != 3:
                raise ConfigError(f"the data pipeline gives 3-channel (RGB) images; in_channels must be 3, got "
                                  f"{value!r}", key=where)
            if name == "encoder_params":
                if not isinstance(value, dict):
                    raise ConfigError(f"expected a mapping of timm create_model arguments, got {value!r}", key=where)
                if value and not str(options.get("encoder_name", "")).startswith("tu-"):
                    raise ConfigError("encoder_params passes arguments to a timm encoder (encoder_name: tu-<name>); "
                                      f"{options.get('encoder_name', params['encoder_name'].default)} takes none",
                                      key=where)
                continue
            if name not in params:
                allowed = [p for p in params if p not in _SET_BY_SEG_ACCEL] + ["encoder_params"]
                raise ConfigError(f"{label} has no option '{name}'." + did_you_mean(name, allowed), key=where)
            if name in hints:
                from seg_accel.config.types import parse_value

                parse_value(value, hints[name], where)
        weights = options.get("encoder_weights", params["encoder_weights"].default)
        encoder = str(options.get("encoder_name", params["encoder_name"].default))
        if encoder.startswith("tu-") and weights not in (None, True, "imagenet"):
            raise ConfigError(f"a timm encoder takes its weights from its name (tu-<model>.<pretrained tag>): "
                              f"encoder_weights is null or imagenet (the default tag), got {weights!r}",
                              key=f"{key}.encoder_weights")

    def _kwargs(self, model_cfg: ModelConfig, classes: list[str], weights: bool = True) -> dict[str, Any]:
        options = dict(model_cfg.options)
        extra = dict(options.pop("encoder_params", None) or {})
        options["classes"] = model_cfg.decode_head.out_channels or len(classes)
        if not weights:
            options["encoder_weights"] = None
        return {**options, **extra}

    def _instantiate(self, kwargs: dict[str, Any], key: str) -> nn.Module:
        import warnings

        label = f"smp.{self.arch_name}"
        weights = kwargs.get("encoder_weights", constructor_parameters(self.arch_cls)["encoder_weights"].default)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*encoder_weights.*should be set to True.*")
                return self.arch_cls(**kwargs)
        except KeyError as exc:  # smp: a wrong encoder name or weights name
            text = str(exc.args[0]) if exc.args else str(exc)
            if text.startswith("Wrong encoder name"):
                import segmentation_models_pytorch as smp

                raise ConfigError(f"smp has no encoder '{kwargs.get('encoder_name')}'."
                                  + did_you_mean(str(kwargs.get("encoder_name")), smp.encoders.get_encoder_names(),
                                                 list_all=False) + " (timm models: tu-<timm name>)",
                                  key=f"{key}.encoder_name") from exc
            if text.startswith("Wrong pretrained weights"):
                raise ConfigError(text.split(". ")[0] + ": " + text.split(". ", 1)[-1], key=f"{key}.encoder_weights") \
                    from exc
            raise ConfigError(f"cannot build {label}: {text}", key=key) from exc
        except RuntimeError as exc:
            if "Unknown model" in str(exc):  # timm
                raise ConfigError(f"timm has no model '{str(kwargs.get('encoder_name'))[3:]}' ({exc})",
                                  key=f"{key}.encoder_name") from exc
            raise ConfigError(f"cannot build {label}: {exc}", key=key) from exc
        except (OSError, ValueError, TypeError, AssertionError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            if weights is not None and (isinstance(exc, OSError) or "hub" in type(exc).__module__.lower()):
                raise ConfigError(
                    f"cannot download encoder_weights {weights!r} for {kwargs.get('encoder_name')}"
                    f"{' (HF_HUB_OFFLINE is set)' if offline else ' (no network?)'}: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200] if str(exc) else ''} - set encoder_weights: null to start "
                    "from random weights, or run where the Hub is reachable once (they are cached)",
                    key=f"{key}.encoder_weights") from exc
            raise ConfigError(f"cannot build {label}: {type(exc).__name__}: {exc}", key=key) from exc

    def _aux_head(self, model: nn.Module, model_cfg: ModelConfig, outputs: int, key: str) -> tuple[nn.Module, int]:
        head_cfg = model_cfg.auxiliary_head
        options = {**FCN_DEFAULTS, **head_cfg.head_options()}
        channels = list(model.encoder.out_channels)
        index = options.pop("in_index")
        if not -len(channels) <= index < len(channels):
            raise ConfigError(f"the encoder gives {len(channels)} features (0: the image, i: stride 2**i; channels "
                              f"{channels}): in_index must be in [{-len(channels)}, {len(channels) - 1}], got {index}",
                              key=f"{key}.auxiliary_head.in_index")
        if channels[index] == 0:
            raise ConfigError(f"feature {index} of this encoder is empty (channels {channels}): choose another "
                              "in_index", key=f"{key}.auxiliary_head.in_index")
        try:
            return FCNHead(channels[index], outputs, **options), index
        except ValueError as exc:
            raise ConfigError(str(exc), key=f"{key}.auxiliary_head.channels") from exc

    def build(self, model_cfg: ModelConfig, classes: list[str], key: str) -> nn.Module:
        return self._build(model_cfg, classes, key, weights=True)

    def _build(self, model_cfg: ModelConfig, classes: list[str], key: str, weights: bool) -> nn.Module:
        kwargs = self._kwargs(model_cfg, classes, weights)
        model = self._instantiate(kwargs, key)
        aux, index = (None, -2)
        if model_cfg.auxiliary_head is not None:
            aux, index = self._aux_head(model, model_cfg, kwargs["classes"], key)
        return install_forward(model, aux, index)

    def build_empty(self, model_cfg: ModelConfig, classes: list[str], key: str) -> nn.Module | None:
        from accelerate import init_empty_weights

        with init_empty_weights():  # the architecture only: no download
            return self._build(model_cfg, classes, key, weights=False)

    def architecture_only(self, model_cfg: ModelConfig) -> ModelConfig:
        import dataclasses

        return dataclasses.replace(model_cfg, backbone_pretrained=None,
                                   options={**model_cfg.options, "encoder_weights": None})

    def has_auxiliary_head(self, model_cfg: ModelConfig) -> bool | None:
        return True

    # -- training -------------------------------------------------------------------------
    def needs_unused_parameter_search(self, model: nn.Module, aux_trained: bool) -> bool:
        """smp keeps encoder parameters its forward never uses: the stages beyond
        ``encoder_depth`` (PSPNet's default depth is 3) and a timm ViT's final norm and
        classifier (DPT); DDP must then look for them."""
        config = getattr(model, "config", None) or {}
        if int(config.get("encoder_depth", 5)) < 5:
            return True
        return any(name.startswith(("encoder.model.head.", "encoder.model.norm.", "encoder.model.fc_norm."))
                   for name, _ in model.named_parameters())

    def backbone(self, model: nn.Module) -> tuple[str, nn.Module] | None:
        return ("encoder", model.encoder)

    def backbone_weights(self, target_name: str, target: nn.Module,
                         source: str) -> tuple[str, Iterator[dict[str, torch.Tensor]]]:
        """An encoder's weights from a ``.safetensors`` file, a folder holding one (an smp export,
        a timm model folder) or a Hub repo id: under the names as stored, without an smp export's
        ``encoder.`` prefix, and as timm names inside smp's timm encoder (``model.``, ``stages_N``)."""
        from safetensors.torch import load_file

        path = Path(source)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise OSError(f"{path} holds no .safetensors file")
        else:
            from huggingface_hub import hf_hub_download

            files = [Path(hf_hub_download(source, "model.safetensors"))]
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(str(file)))

        def readings() -> Iterator[dict[str, torch.Tensor]]:
            yield state
            yield {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
            yield {"model." + re.sub(r"^(stem|stages)\.(\d+)\.", r"\1_\2.", k): v for k, v in state.items()}

        return files[0].name, readings()

    def layer_ids(self, model: nn.Module, num_layers: int, decay_type: str) -> LayerIds | None:
        from seg_accel.models.hf import layer_id

        kind = _encoder_kind(model)
        if kind is None:
            return None
        if decay_type == "stage_wise" and kind != "convnext":
            raise ConfigError("decay_type stage_wise is for ConvNeXt encoders", key="optimizer.paramwise_cfg.decay_type")
        return lambda name: layer_id(_as_transformers_name(name, kind), kind, num_layers, decay_type)

    def output_channels(self, model: nn.Module) -> int | None:
        config = getattr(model, "config", None) or {}
        return int(config["classes"]) if "classes" in config else None

    # -- export ---------------------------------------------------------------------------
    def export(self, model: nn.Module, folder: Path, classes: list[str],
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        from seg_accel.models.modules import _unshared

        folder.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else model.state_dict()
        weights = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)}  # smp's model only
        save_file(_unshared(weights), str(folder / EXPORT_WEIGHTS), metadata={"format": "pt"})
        config = _json_ready(dict(model.config))
        outputs = int(config["classes"])
        id2label, label2id = label_maps(list(classes), outputs)
        config.update({CLASS_KEY: type(model).__name__, "_id2label": {str(k): v for k, v in id2label.items()},
                       "_label2id": label2id, "_seg_accel_version": __version__})
        (folder / EXPORT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))

    def load_export(self, folder: Path, config: dict[str, Any], trust_remote_code: bool = False) -> nn.Module:
        """smp's folder format, read as data: the architecture must be one of smp's, its options
        fit the constructor (no download: the weights are the folder's), every tensor fits."""

        params = constructor_parameters(self.arch_cls)
        kwargs = {k: v for k, v in config.items() if k in params}
        if str(kwargs.get("encoder_name", "")).startswith("tu-"):  # a timm encoder's extra arguments (encoder_params)
            kwargs.update({k: v for k, v in config.items() if k not in params and not k.startswith("_")})
        export_class_count(kwargs.get("classes"), folder, "classes")
        kwargs["encoder_weights"] = None
        for name in ("aux_params", "activation"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{folder}/config.json sets {name}, which seg-accel does not load (logits only)")
        try:
            model = self.arch_cls(**kwargs)
        except (KeyError, RuntimeError, TypeError, ValueError, AssertionError) as exc:
            raise ValueError(f"{folder}/config.json does not build smp.{self.arch_name}: {exc}") from exc
        load_export_weights(model, folder / EXPORT_WEIGHTS, f"smp.{self.arch_name}")
        return install_forward(model)

    def id2label(self, config: dict[str, Any]) -> dict[str, str]:
        return dict(config.get("_id2label") or {})

    def describe_export(self, config: dict[str, Any]) -> dict[str, str]:
        return {"architecture": f"smp.{config[CLASS_KEY]} ({config.get('encoder_name')})",
                "library": "segmentation-models-pytorch", "tag": "segmentation-models-pytorch"}

    def usage(self, repo_or_folder: str, config: dict[str, Any]) -> list[str]:
        return [f"An smp `{config[CLASS_KEY]}` on a `{config.get('encoder_name')}` encoder, in smp's own format: "
                "`segmentation_models_pytorch` loads it as it is; seg-accel loads it with its image processor "
                "(normalisation) and class names.", "",
                "```python", "import segmentation_models_pytorch as smp", "",
                f'model = smp.from_pretrained("{repo_or_folder}").eval()  # logits (N, classes, H, W)', "```", "",
                "```python", "import seg_accel", "",
                f'model = seg_accel.load_model("{repo_or_folder}").eval()  # the same weights; any input size',
                "```", "",
                f"or from the command line: `seg-accel predict {repo_or_folder} IMAGES --out OUT`.", ""]


def _json_ready(config: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(config, default=list))
