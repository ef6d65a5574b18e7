"""MMSegmentation's own architectures (``model.type: EncoderDecoder``), in its keys, defaults and
parameter names, so that its configs' ``model`` sections and its checkpoints load as they are.

``model: {type: EncoderDecoder, pretrained: open-mmlab://resnet50_v1c, backbone: {type:
ResNetV1c, depth: 50, ...}, decode_head: {type: PSPHead, in_channels: 2048, ...},
auxiliary_head: {type: FCNHead, ...}}`` builds MMSegmentation 0.30's network (backbones in
``mmseg_backbones``, heads in ``mmseg_heads``); the heads' ``loss_decode``, ``sampler``,
``ignore_index`` and ``align_corners`` are seg-accel's losses, applied as MMSegmentation's
``forward_train`` applies them. Every option is checked at validation against the
component's signature, and the features each head reads are checked against what the
backbone gives (a forward pass on the meta device: no memory, no weights).

The parameter names are MMSegmentation's (``backbone.layer1.0.conv1.weight``,
``decode_head.conv_seg.weight``), so the name map between an MMSegmentation state dict and
this family is the identity: ``torch_files.checkpoint_tensors`` unwraps a checkpoint
(``state_dict``, ``module.`` of DDP) and ``write_mmseg_checkpoint`` writes one back. ``.pth``
files are read as data only (``torch_files``).
"""
from __future__ import annotations

import inspect
import json
import logging
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from seg_accel.errors import ConfigError, did_you_mean
from seg_accel.models.families import register_family
from seg_accel.models.interface import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    RETURN_AUX,
    ModelFamily,
    export_class_count,
    label_maps,
    load_export_weights,
)
from seg_accel.models.mmseg_backbones import ACT_TYPES, BACKBONES, NORM_TYPES, ResNet
from seg_accel.models.mmseg_heads import HEADS, BaseDecodeHead
from seg_accel.models.torch_files import checkpoint_tensors, read_torch_checkpoint
from seg_accel.registry import MODELS
from seg_accel.version import __version__

if TYPE_CHECKING:
    from seg_accel.config.schema import HeadConfig, ModelConfig

logger = logging.getLogger("seg_accel")

EXPORT_KEY = "mmseg_model"  # config.json: the architecture (backbone and head options)
# mmcv's model zoo (mmcv/model_zoo/open_mmlab.json, mmcv 1.7.2): the ImageNet backbones of the
# MMSegmentation configs
OPEN_MMLAB = {
    "resnet18_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet18_v1c-b5776b93.pth",
    "resnet50_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    "resnet101_v1c": "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
    "resnet50_v1d": "https://download.openmmlab.com/pretrain/third_party/resnet50_v1d-c17ce6c0.pth",
    "resnet101_v1d": "https://download.openmmlab.com/pretrain/third_party/resnet101_v1d-74daf72d.pth",
}
# options MMSegmentation's components take that seg-accel's take only at their default value
_INERT: dict[str, tuple[Any, ...]] = {"conv_cfg": (None,), "with_cp": (False,), "plugins": (None,), "dcn": (None,),
                                      "init_cfg": (None,)}
_HEAD_INERT = ("conv_cfg", "init_cfg")
_IGNORED = ("stage_with_dcn",)  # meaningful only with dcn, which must be None
# the head keys seg-accel's loss side reads (schema.HeadConfig), not the head module
_LOSS_SIDE = ("loss_decode", "sampler", "ignore_index", "out_channels", "threshold")
_HEAD_DEFAULT_INIT = {"type": "Normal", "std": 0.01, "override": {"name": "conv_seg"}}


# --------------------------------------------------------------------------- the network
class EncoderDecoder(nn.Module):
    """MMSegmentation's ``EncoderDecoder``: a backbone, a decode head and optionally an
    auxiliary head reading the backbone's features. The forward returns the decode head's
    logits at its stride; in training with an auxiliary head (and for the losses of a
    workflow's val phase, see ``interface.RETURN_AUX``), ``{"logits", "aux_logits"}``."""

    def __init__(self, num_classes: int, backbone: dict[str, Any], decode_head: dict[str, Any],
                 auxiliary_head: dict[str, Any] | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.backbone = _build_backbone(backbone)
        self.decode_head = _build_head(decode_head, num_classes)
        self.auxiliary_head = _build_head(auxiliary_head, num_classes) if auxiliary_head is not None else None
        self.align_corners = self.decode_head.align_corners
        self.seg_accel_spec = {"type": "EncoderDecoder", "backbone": dict(backbone), "decode_head": dict(decode_head),
                               "auxiliary_head": dict(auxiliary_head) if auxiliary_head is not None else None}

    def forward(self, pixel_values: torch.Tensor) -> Any:
        features = self.backbone(pixel_values)
        logits = self.decode_head(features)
        if self.auxiliary_head is not None and (self.training or getattr(self, RETURN_AUX, False)):
            return {"logits": logits, "aux_logits": self.auxiliary_head(features)}
        return logits


MODELS.register("EncoderDecoder")(EncoderDecoder)


def _build_backbone(options: dict[str, Any]) -> nn.Module:
    options = dict(options)
    kind = options.pop("type")
    return BACKBONES[kind](**_module_kwargs(options))


def _build_head(options: dict[str, Any], num_classes: int) -> BaseDecodeHead:
    options = dict(options)
    kind = options.pop("type")
    return HEADS[kind](num_classes=num_classes, **_module_kwargs(options))


def _module_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    """The options the module itself takes (the inert MMSegmentation ones dropped)."""
    kwargs = {k: v for k, v in options.items() if k not in _INERT and k not in _IGNORED
              and k not in ("act_cfg", "upsample_cfg", "num_classes", "pretrained")}
    return {k: tuple(v) if isinstance(v, list) and k != "in_channels" and k != "in_index" else v
            for k, v in kwargs.items()}


# --------------------------------------------------------------------------- option checks
def _classes(kind: str, head: bool) -> list[Any]:
    """The classes whose ``__init__`` arguments a backbone or head type takes (a head's
    include its bases' up to ``BaseDecodeHead``; ``ResNetV1c``/``V1d`` are ``ResNet``'s)."""
    if head:
        return [cls for cls in HEADS[kind].__mro__ if isinstance(cls, type) and issubclass(cls, BaseDecodeHead)]
    return [BACKBONES["UNet"]] if kind == "UNet" else [ResNet]


def _parameters(kind: str, head: bool) -> dict[str, inspect.Parameter]:
    params: dict[str, inspect.Parameter] = {}
    for cls in _classes(kind, head):
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(name, p)
    if not head and kind in ("ResNetV1c", "ResNetV1d"):
        params.pop("deep_stem", None)
        params.pop("avg_down", None)
    params.pop("num_classes", None)
    return params


def _hints(kind: str, head: bool) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for cls in reversed(_classes(kind, head)):
        hints.update(typing.get_type_hints(cls.__init__))
    return hints


def check_component(options: Mapping[str, Any], key: str, head: bool, outputs: int | None = None) -> None:
    """One backbone or head section: its type, then every option against the type's signature
    and annotations, MMSegmentation's inert options at their default, ``norm_cfg``/``act_cfg``."""
    from seg_accel.config.types import parse_value

    table = HEADS if head else BACKBONES
    kind = options.get("type")
    if not isinstance(kind, str) or kind not in table:
        what = "head" if head else "backbone"
        raise ConfigError(f"{'unknown' if kind else 'missing'} {what} type {kind!r} (seg-accel's MMSegmentation "
                          f"family builds {', '.join(table)})." + (did_you_mean(str(kind), table, list_all=False)
                                                                   if kind else ""), key=f"{key}.type")
    params = _parameters(kind, head)
    hints = _hints(kind, head)
    for name, value in options.items():
        where = f"{key}.{name}"
        if name == "type" or name in _IGNORED or head and name in _LOSS_SIDE:
            continue
        if name in _INERT and (not head or name in _HEAD_INERT):
            allowed = _INERT[name] + ((_HEAD_DEFAULT_INIT,) if head and name == "init_cfg" else ())
            if value not in allowed:
                hint = " (weights: model.pretrained or backbone_pretrained)" if name == "init_cfg" else ""
                raise ConfigError(f"{name} {value!r} is not supported by seg-accel's MMSegmentation family; it takes "
                                  f"{' or '.join(repr(v) for v in allowed)}{hint}", key=where)
            continue
        if name == "norm_cfg":
            _check_norm(value, where)
            continue
        if name == "act_cfg":
            if not isinstance(value, Mapping) or value.get("type") not in ACT_TYPES or len(value) > 2:
                raise ConfigError(f"act_cfg must be {{type: ReLU}}, got {value!r}", key=where)
            continue
        if name == "upsample_cfg" and not head:
            if not isinstance(value, Mapping) or value.get("type") != "InterpConv" or len(value) > 1:
                raise ConfigError(f"upsample_cfg must be {{type: InterpConv}} (the UNet of MMSegmentation's configs), "
                                  f"got {value!r}", key=where)
            continue
        if name == "num_classes" and head:
            if outputs is not None and value != outputs:
                raise ConfigError(f"the data has {outputs} output class(es) (decode_head.out_channels or the class "
                                  f"names); num_classes is {value!r}: remove it or make it {outputs}", key=where)
            continue
        if name == "pretrained" and not head:
            raise ConfigError("set the backbone's ImageNet weights with model.pretrained (MMSegmentation 0.x) or "
                              "model.backbone_pretrained", key=where)
        if name == "in_channels" and not head and value != 3:
            raise ConfigError(f"the data pipeline gives 3-channel (RGB) images; in_channels must be 3, got {value!r}",
                              key=where)
        if name not in params:
            known = [*params, *(_HEAD_INERT if head else _INERT), "act_cfg", "norm_cfg"]
            raise ConfigError(f"{kind} has no option '{name}'." + did_you_mean(name, known), key=where)
        if name in hints:
            parse_value(value, hints[name], where)
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise ConfigError(f"{kind} needs {', '.join(missing)}", key=f"{key}.{missing[0]}")
    if not head:
        _check_backbone_values(kind, options, key)


def _check_norm(value: Any, where: str) -> None:
    if not isinstance(value, Mapping) or value.get("type") not in NORM_TYPES:
        raise ConfigError(f"norm_cfg type must be one of {', '.join(NORM_TYPES)} (BatchNorm; SyncBN syncs on "
                          f"multi-GPU runs), got {value!r}", key=where)
    unknown = [k for k in value if k not in ("type", "requires_grad", "eps", "momentum")]
    if unknown:
        raise ConfigError(f"norm_cfg has no option '{unknown[0]}' (type, requires_grad, eps, momentum)", key=where)


def _check_backbone_values(kind: str, options: Mapping[str, Any], key: str) -> None:
    if kind == "UNet":
        stages = int(options.get("num_stages", 5))
        for name, length in (("strides", stages), ("enc_num_convs", stages), ("enc_dilations", stages),
                             ("dec_num_convs", stages - 1), ("downsamples", stages - 1), ("dec_dilations", stages - 1)):
            if name in options and len(options[name]) != length:
                raise ConfigError(f"must have {length} entries (num_stages {stages}{' - 1' if length < stages else ''}), "
                                  f"got {len(options[name])}", key=f"{key}.{name}")
        return
    from seg_accel.models.mmseg_backbones import ARCH_SETTINGS

    depth = options.get("depth")
    if depth not in ARCH_SETTINGS:
        raise ConfigError(f"ResNet depth must be one of {', '.join(map(str, ARCH_SETTINGS))}, got {depth!r}",
                          key=f"{key}.depth")
    stages = int(options.get("num_stages", 4))
    if not 1 <= stages <= 4:
        raise ConfigError(f"must be 1 to 4, got {stages}", key=f"{key}.num_stages")
    for name in ("strides", "dilations"):
        if name in options and len(options[name]) < stages:
            raise ConfigError(f"needs one entry per stage ({stages}), got {len(options[name])}", key=f"{key}.{name}")
    if any(not 0 <= i < stages for i in options.get("out_indices", ())):
        raise ConfigError(f"stage indices are 0 to {stages - 1}", key=f"{key}.out_indices")
    if options.get("style", "pytorch") not in ("pytorch", "caffe"):
        raise ConfigError(f"style is pytorch or caffe, got {options['style']!r}", key=f"{key}.style")


def head_options(head: HeadConfig, with_fields: bool) -> dict[str, Any]:
    """A head section's module options (``type``, MMSegmentation's keys, ``align_corners``)."""
    options: dict[str, Any] = {"type": head.type, **head.options}
    if with_fields:  # the auxiliary head's FCN options are schema fields
        options.update(head.head_options())
    options["align_corners"] = head.align_corners
    return options


def model_spec(model_cfg: ModelConfig) -> dict[str, Any]:
    """The ``EncoderDecoder`` arguments of a config (what the export records)."""
    spec = {"backbone": dict(model_cfg.options["backbone"]),
            "decode_head": head_options(model_cfg.decode_head, with_fields=False),
            "auxiliary_head": head_options(model_cfg.auxiliary_head, with_fields=True)
            if model_cfg.auxiliary_head is not None else None}
    return spec


def feature_channels(backbone: dict[str, Any], key: str) -> list[tuple[int, int]]:
    """``(channels, stride)`` of each feature the backbone gives (a forward on the meta device)."""
    try:
        with torch.device("meta"):
            module = _build_backbone(backbone)
        size = 64 * (module.downsample_rate() if hasattr(module, "downsample_rate") else 1)
        with torch.no_grad():
            outs = module(torch.empty(1, 3, size, size, device="meta"))
    except (TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise ConfigError(f"cannot build {backbone.get('type')}: {type(exc).__name__}: {exc}", key=key) from exc
    return [(int(o.shape[1]), size // int(o.shape[-1])) for o in outs]


def check_head_inputs(options: Mapping[str, Any], features: list[tuple[int, int]], key: str) -> None:
    """The head's ``in_index``/``in_channels`` against the backbone's features."""
    kind = options["type"]
    transform = options.get("input_transform", "multiple_select" if kind == "UPerHead" else None)
    index = options.get("in_index", -1)
    channels = options["in_channels"]
    indices = list(index) if isinstance(index, (list, tuple)) else [index]
    wanted = list(channels) if isinstance(channels, (list, tuple)) else [channels]
    if transform is None and (len(indices) != 1 or len(wanted) != 1):
        raise ConfigError("in_index and in_channels are lists only with input_transform (resize_concat or "
                          "multiple_select)", key=f"{key}.in_index")
    if transform not in (None, "resize_concat", "multiple_select"):
        raise ConfigError(f"input_transform is resize_concat, multiple_select or null, got {transform!r}",
                          key=f"{key}.input_transform")
    if len(indices) != len(wanted):
        raise ConfigError(f"in_index has {len(indices)} entries, in_channels {len(wanted)}", key=f"{key}.in_channels")
    have = [c for c, _ in features]
    for i, c in zip(indices, wanted, strict=True):
        if not -len(have) <= i < len(have):
            raise ConfigError(f"the backbone gives {len(have)} features (channels {have}): in_index {i} is out of "
                              "range", key=f"{key}.in_index")
        if have[i] != c:
            raise ConfigError(f"the backbone's feature {i} has {have[i]} channels (features: {have}); in_channels "
                              f"says {c}", key=f"{key}.in_channels")
    if kind == "DepthwiseSeparableASPPHead" and options.get("c1_in_channels", 0) > 0 \
            and have[0] != options["c1_in_channels"]:
        raise ConfigError(f"c1 reads the backbone's feature 0, which has {have[0]} channels (features: {have})",
                          key=f"{key}.c1_in_channels")


# --------------------------------------------------------------------------- checkpoints
def to_mmseg_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This family's state dict under MMSegmentation's names (the same names)."""
    return {k: v.detach().clone() for k, v in state.items()}


def write_mmseg_checkpoint(state: Mapping[str, torch.Tensor], classes: list[str], path: Path) -> None:
    """An MMSegmentation 0.30 checkpoint (``{"meta": ..., "state_dict": ...}``) that its
    ``load_checkpoint`` and ``torch.load(weights_only=True)`` read."""
    from seg_accel.runtime.storage import atomic_file

    with atomic_file(path) as tmp:
        torch.save({"meta": {"CLASSES": list(classes), "seg_accel_version": __version__},
                    "state_dict": to_mmseg_state_dict(state)}, str(tmp))


def _download(url: str, source: str, key: str | None) -> Path:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=True)
    except Exception as exc:  # any failure to fetch is one line: offline, proxy, HTTP error
        raise ConfigError(f"cannot download {source} ({url}; no network?): {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''} - put the file at {target}, or give "
                          "the path of a local .pth", key=key) from exc
    return target


def _timm_resnet_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ``resnet*c``/``resnet*d`` state dict under MMSegmentation's ResNet names (the deep
    stem ``conv1.{0,1,3,4,6}`` and ``bn1`` become ``stem.{0,1,3,4,6,7}``)."""
    stem = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4.",
            "conv1.6.": "stem.6.", "bn1.": "stem.7."}
    out = {}
    for name, tensor in state.items():
        for old, new in stem.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = tensor
    return out


# --------------------------------------------------------------------------- the family
@register_family(order=30)
class MmsegFamily(ModelFamily):
    """MMSegmentation's ``EncoderDecoder`` networks (``model.type: EncoderDecoder``)."""

    name = "mmseg"
    builds_auxiliary_head = True
    builds_heads = True

    @classmethod
    def from_entry(cls, entry: Any, type_name: str) -> MmsegFamily | None:
        return cls() if entry is EncoderDecoder else None

    @classmethod
    def from_model(cls, model: nn.Module) -> MmsegFamily | None:
        return cls() if isinstance(model, EncoderDecoder) else None

    @classmethod
    def from_export(cls, config: dict[str, Any]) -> MmsegFamily | None:
        return cls() if isinstance(config.get(EXPORT_KEY), dict) else None

    # -- config ---------------------------------------------------------------------------
    def check(self, model_cfg: ModelConfig, classes: list[str], key: str) -> None:
        if model_cfg.config:
            raise ConfigError("model.config holds transformers config options; EncoderDecoder takes backbone, "
                              "decode_head and auxiliary_head", key=f"{key}.config")
        if model_cfg.pretrained is not None and model_cfg.backbone_pretrained is not None:
            raise ConfigError("pretrained (MMSegmentation 0.x: the backbone's ImageNet weights) and "
                              "backbone_pretrained say the same: keep one", key=f"{key}.backbone_pretrained")
        for name, value in model_cfg.options.items():
            if name == "train_cfg" and value in ({}, None):
                continue
            if name == "neck":
                raise ConfigError("necks are not built by seg-accel's MMSegmentation family (its configs here have "
                                  "none)", key=f"{key}.neck")
            if name != "backbone":
                raise ConfigError(f"EncoderDecoder has no option '{name}'." +
                                  did_you_mean(name, ["backbone", "decode_head", "auxiliary_head", "pretrained",
                                                      "test_cfg", "train_cfg", "backbone_pretrained"]),
                                  key=f"{key}.{name}")
        backbone = model_cfg.options.get("backbone")
        if not isinstance(backbone, Mapping):
            raise ConfigError("EncoderDecoder needs backbone: {type: ResNetV1c | ResNetV1d | ResNet | UNet, ...}",
                              key=f"{key}.backbone")
        check_component(backbone, f"{key}.backbone", head=False)
        outputs = (model_cfg.decode_head.out_channels or len(classes)) if classes else None
        features = feature_channels(dict(backbone), f"{key}.backbone")
        spec = model_spec(model_cfg)
        for name in ("decode_head", "auxiliary_head"):
            options = spec[name]
            if options is None:
                continue
            if options.get("type") is None:
                raise ConfigError(f"EncoderDecoder needs {name}.type ({', '.join(HEADS)})", key=f"{key}.{name}.type")
            check_component(options, f"{key}.{name}", head=True, outputs=outputs)
            check_head_inputs(options, features, f"{key}.{name}")
            try:  # the head's own consistency checks (num_convs 0 with other channels, ...)
                from accelerate import init_empty_weights

                with init_empty_weights():
                    _build_head(options, outputs or 2)
            except (TypeError, ValueError) as exc:
                raise ConfigError(str(exc), key=f"{key}.{name}") from exc

    def build(self, model_cfg: ModelConfig, classes: list[str], key: str) -> nn.Module:
        model = self._build(model_cfg, classes)
        if model_cfg.pretrained is not None:  # (backbone_pretrained: the builder loads it after build)
            from seg_accel.models.builder import load_backbone_weights

            load_backbone_weights(model, model_cfg.pretrained, f"{key}.pretrained", self)
        return model

    def _build(self, model_cfg: ModelConfig, classes: list[str]) -> EncoderDecoder:
        outputs = model_cfg.decode_head.out_channels or len(classes)
        spec = model_spec(model_cfg)
        model = EncoderDecoder(outputs, spec["backbone"], spec["decode_head"], spec["auxiliary_head"])
        if any(str((cfg or {}).get("norm_cfg", {}).get("type")) == "SyncBN"
               for cfg in (spec["backbone"], spec["decode_head"], spec["auxiliary_head"])):
            model.seg_accel_sync_bn = True  # MMSegmentation's SyncBN: synced where several GPUs train
        return model

    def build_empty(self, model_cfg: ModelConfig, classes: list[str], key: str) -> nn.Module | None:
        from accelerate import init_empty_weights

        with init_empty_weights():
            return self._build(model_cfg, classes)

    def architecture_only(self, model_cfg: ModelConfig) -> ModelConfig:
        import dataclasses

        return dataclasses.replace(model_cfg, pretrained=None, backbone_pretrained=None)

    def has_auxiliary_head(self, model_cfg: ModelConfig) -> bool | None:
        return True

    # -- training -------------------------------------------------------------------------
    def backbone_weights(self, target_name: str, target: nn.Module,
                         source: str) -> tuple[str, Iterator[dict[str, torch.Tensor]]]:
        """ImageNet weights for the backbone: ``open-mmlab://<name>`` (mmcv's model zoo,
        downloaded once into torch's hub cache), a URL, a ``.pth`` file (read as data) or a
        ``.safetensors`` file or folder (a timm ``resnet50c``/``resnet50d``: renamed)."""
        from safetensors.torch import load_file

        key = None  # the builder names the key (model.pretrained or model.backbone_pretrained)
        path = Path(source)
        if source.startswith("open-mmlab://"):
            name = source[len("open-mmlab://"):]
            if name not in OPEN_MMLAB:
                raise ConfigError(f"unknown open-mmlab:// backbone '{name}'." + did_you_mean(name, OPEN_MMLAB), key=key)
            path = _download(OPEN_MMLAB[name], source, key)
        elif source.startswith(("http://", "https://")):
            path = _download(source, source, key)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise OSError(f"{path} holds no .safetensors file")
            state: dict[str, torch.Tensor] = {}
            for file in files:
                state.update(load_file(str(file)))
            name = files[0].name
        elif path.is_file() and path.suffix == ".safetensors":
            state, name = load_file(str(path)), path.name
        elif path.is_file():
            state, name = checkpoint_tensors(read_torch_checkpoint(path, key), path, key), path.name
        else:
            raise OSError(f"{source} is not a file, a folder, a URL or an open-mmlab:// name")

        def readings() -> Iterator[dict[str, torch.Tensor]]:
            yield state
            yield {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            yield _timm_resnet_names(state)

        return name, readings()

    # -- export ---------------------------------------------------------------------------
    def export(self, model: nn.Module, folder: Path, classes: list[str],
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        from seg_accel.models.modules import _unshared

        folder.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else model.state_dict()
        save_file(_unshared(dict(state)), str(folder / EXPORT_WEIGHTS), metadata={"format": "pt"})
        id2label, label2id = label_maps(list(classes), model.num_classes)
        spec = json.loads(json.dumps(model.seg_accel_spec, default=list))
        config = {EXPORT_KEY: spec, "num_classes": model.num_classes, "architectures": ["EncoderDecoder"],
                  "id2label": {str(k): v for k, v in id2label.items()}, "label2id": label2id,
                  "seg_accel_version": __version__}
        (folder / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))

    def load_export(self, folder: Path, config: dict[str, Any], trust_remote_code: bool = False) -> nn.Module:
        """The export's ``EncoderDecoder``, read as data: every component named must be one of
        this family's and its options fit its signature (no download: the weights are the
        folder's), every tensor must fit."""

        spec = config[EXPORT_KEY]
        outputs = export_class_count(config.get("num_classes"), folder, "num_classes")
        if not isinstance(spec.get("backbone"), dict) or not isinstance(spec.get("decode_head"), dict):
            raise ValueError(f"{folder}/config.json: {EXPORT_KEY} must hold backbone and decode_head")
        try:
            check_component(spec["backbone"], f"{EXPORT_KEY}.backbone", head=False)
            for name in ("decode_head", "auxiliary_head"):
                if spec.get(name) is not None:
                    check_component(spec[name], f"{EXPORT_KEY}.{name}", head=True, outputs=outputs)
            model = EncoderDecoder(outputs, spec["backbone"], spec["decode_head"], spec.get("auxiliary_head"))
        except (ConfigError, TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{folder}/config.json does not build an EncoderDecoder: {exc}") from exc
        load_export_weights(model, folder / EXPORT_WEIGHTS, "EncoderDecoder")
        return model

    def describe_export(self, config: dict[str, Any]) -> dict[str, str]:
        spec = config[EXPORT_KEY]
        backbone = spec["backbone"]
        depth = f"-{backbone['depth']}" if "depth" in backbone else ""
        return {"architecture": f"{spec['decode_head']['type']} on {backbone['type']}{depth} (MMSegmentation)",
                "library": "pytorch", "tag": "mmsegmentation"}

    def usage(self, repo_or_folder: str, config: dict[str, Any]) -> list[str]:
        return ["An MMSegmentation `EncoderDecoder` with MMSegmentation's parameter names: seg-accel loads it, and "
                "`seg-accel convert-checkpoint` writes the `.pth` MMSegmentation 0.30 loads.", "",
                "```python", "import seg_accel", "", f'model = seg_accel.load_model("{repo_or_folder}").eval()',
                "logits = model(pixel_values)  # (N, classes, H/8, W/8) for the D8 networks", "```", ""]

