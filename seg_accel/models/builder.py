"""Build, check and export models through their family (``seg_accel.models.families``), and the
model-wide settings training applies (backbone weights, BatchNorm modes, bf16 norms).

``model.type`` names an entry of ``MODELS`` (a transformers ``*ForSemanticSegmentation``
class, a registered ``nn.Module`` taking ``num_classes``) or a dotted import path; the
family that takes it does the rest. Loading is ``seg_accel.models.loading``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from seg_accel.errors import ConfigError
from seg_accel.models.families import EXPORT_FAMILY_KEY, attach_family, family_of_model, model_family
from seg_accel.models.interface import EXPORT_CONFIG, ModelFamily
from seg_accel.optim.param_groups import NORM_TYPES

if TYPE_CHECKING:
    from accelerate import Accelerator

    from seg_accel.config.schema import ModelConfig

logger = logging.getLogger("seg_accel")

# the losses that know a 1-channel sigmoid head (labels 0/1)
BINARY_HEAD_LOSSES = ("CrossEntropyLoss", "DiceLoss", "FocalLoss", "LovaszLoss")


def check_model_config(model_cfg: ModelConfig, key: str = "model", classes: list[str] | None = None) -> None:
    """Validation-time checks of the model section (no weights are touched); with ``classes``
    also against the data."""
    family = model_family(model_cfg.type, f"{key}.type")
    if model_cfg.auxiliary_head is not None and family.has_auxiliary_head(model_cfg) is False:
        raise ConfigError(f"{model_cfg.type} has no auxiliary head; remove auxiliary_head", key=f"{key}.auxiliary_head")
    if model_cfg.auxiliary_head is not None and not family.builds_auxiliary_head:
        options = model_cfg.auxiliary_head.head_options()
        if options:
            first = next(iter(options))
            raise ConfigError(f"{model_cfg.type} brings its own auxiliary head ({family.name} family): "
                              f"{', '.join(options)} are FCN head options for models whose head seg-accel builds "
                              "(smp); set the head's size in the model's own config", key=f"{key}.auxiliary_head.{first}")
    if not family.builds_heads:
        for name in ("decode_head", "auxiliary_head"):
            head = getattr(model_cfg, name)
            options = dict(head.options) if head is not None else {}
            if "num_classes" in options:  # every MMSegmentation head has it: accepted when it fits the data
                check_head_num_classes(options.pop("num_classes"), head, classes, f"{key}.{name}.num_classes")
            if head is not None and (head.type is not None or options):
                from dataclasses import fields

                from seg_accel.errors import did_you_mean

                first = "type" if head.type is not None else next(iter(options))
                known = [f.name for f in fields(head) if f.name not in ("type", "options")]
                raise ConfigError(f"unknown key '{first}' in {key}.{name}." + did_you_mean(first, known) +
                                  f" (a head's type and module options are for model.type: EncoderDecoder; "
                                  f"{model_cfg.type} brings its own heads)", key=f"{key}.{name}.{first}")
    family.check(model_cfg, list(classes or []), key)


def check_head_num_classes(value: object, head: object, classes: list[str] | None, key: str) -> None:
    """A head's ``num_classes`` (MMSegmentation's configs all have one) must be the data's class
    count (or 1 for a binary sigmoid head with ``out_channels: 1``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"must be a positive integer, got {value!r}", key=key)
    if not classes:
        return
    allowed = {len(classes)} | ({1} if getattr(head, "out_channels", None) == 1 else set())
    if value not in allowed:
        raise ConfigError(f"num_classes is {value} but the data has {len(classes)} classes; seg-accel takes the class "
                          f"count from the data: remove num_classes or make it {len(classes)}", key=key)


def check_model_against_data(model_cfg: ModelConfig, classes: list[str], key: str = "model") -> None:
    """The output channels must fit the data's classes; then the family's own checks."""
    n = len(classes)
    head = model_cfg.decode_head
    if head.out_channels is not None and head.out_channels not in (1, n):
        raise ConfigError(
            f"must be the number of classes ({n}) or 1 (a binary sigmoid head), got {head.out_channels}",
            key=f"{key}.decode_head.out_channels",
        )
    if (head.out_channels or n) == 1:
        if n != 2:
            raise ConfigError(
                f"one output channel (use_sigmoid) needs exactly 2 classes; the data has {n} ({', '.join(classes)})",
                key=f"{key}.decode_head.out_channels",
            )
        for i, loss in enumerate(head.loss_cfgs()):
            kind = loss.get("type")
            where = head.loss_key(f"{key}.decode_head", i)
            if kind == "CrossEntropyLoss" and not loss.get("use_sigmoid", False):
                raise ConfigError("a 1-channel head needs CrossEntropyLoss with use_sigmoid: true", key=where)
            if kind == "LovaszLoss" and loss.get("loss_type") != "binary":
                raise ConfigError("a 1-channel head needs LovaszLoss with loss_type: binary (the Lovasz hinge)",
                                  key=where)
            if kind not in BINARY_HEAD_LOSSES:
                raise ConfigError(f"a 1-channel (sigmoid) head takes {', '.join(BINARY_HEAD_LOSSES)}; got {kind}",
                                  key=where)
    check_model_config(model_cfg, key, classes)


def build_model(model_cfg: ModelConfig, classes: list[str], key: str = "model") -> nn.Module:
    """Instantiate the model with its outputs from the data's class names (then, with
    ``backbone_pretrained``, load the backbone's weights)."""
    family = model_family(model_cfg.type, f"{key}.type")
    model = attach_family(family.build(model_cfg, list(classes), key), family)
    if model_cfg.backbone_pretrained is not None:
        load_backbone_weights(model, model_cfg.backbone_pretrained, f"{key}.backbone_pretrained", family)
    return model


def build_empty_model(model_cfg: ModelConfig, classes: list[str], key: str = "model") -> nn.Module | None:
    """The architecture with weights on the meta device (names, shapes and module types,
    no memory): for checks and tables before training. None when a pretrained model's
    config cannot be read locally (a Hub id while offline)."""
    family = model_family(model_cfg.type, f"{key}.type")
    try:
        model = family.build_empty(model_cfg, list(classes), key)
        return attach_family(model, family) if model is not None else None
    except ConfigError:
        raise
    except Exception as exc:  # any failure here is a config mistake; say which model and why
        raise ConfigError(f"{model_cfg.type} cannot be built from this config: {type(exc).__name__}: {exc}",
                          key=key) from exc


def needs_unused_parameter_search(model: nn.Module, aux_trained: bool = False) -> bool:
    """Whether DDP must run with ``find_unused_parameters=True`` for this model."""
    return family_of_model(model).needs_unused_parameter_search(model, aux_trained)


def backbone_module(model: nn.Module, key: str = "model.backbone_pretrained",
                    family: ModelFamily | None = None) -> tuple[str, nn.Module]:
    """``(attribute, module)`` that ``backbone_pretrained`` loads into."""
    found = (family or family_of_model(model)).backbone(model)
    if found is None:
        raise ConfigError(f"{type(model).__name__} has neither a `backbone` nor a base model to load weights into",
                          key=key)
    return found


def load_backbone_weights(model: nn.Module, source: str, key: str = "model.backbone_pretrained",
                          family: ModelFamily | None = None) -> dict[str, list[str]]:
    """Load the weights of ``source`` (an ImageNet backbone: Hub id or ``save_pretrained``
    folder) into the model's backbone, tensor by tensor where names and shapes agree.
    Returns ``{"loaded", "mismatched", "kept"}`` (names in the backbone) and logs a summary;
    a source that matches nothing is a config error."""
    family = family or family_of_model(model)
    name, target = backbone_module(model, key, family)
    try:
        found = family.backbone_weights(name, target, source)
        if found is None:
            raise ConfigError(f"backbone_pretrained is not supported for {type(model).__name__} ({family.name} "
                              "family)", key=key)
        source_name, candidates = found
        dst = target.state_dict()

        def matching(names: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in names.items() if k in dst and tuple(v.shape) == tuple(dst[k].shape)}

        src: dict[str, Any] = {}
        loaded: dict[str, Any] = {}
        for candidate in candidates:  # the family's readings of the source, best first
            matched = matching(candidate)
            if not src or len(matched) > len(loaded):
                src, loaded = candidate, matched
            if len(loaded) == len(src):
                break
    except ConfigError as exc:  # the family's own words about the source: at this key
        raise exc.located(key) from None
    except (OSError, ValueError, TypeError) as exc:
        where = "local folder" if os.path.isdir(source) else "Hub id (or a local path that does not exist)"
        raise ConfigError(f"cannot load backbone weights '{source}' ({where}): {type(exc).__name__}: {exc}",
                          key=key) from exc
    mismatched = [f"{k} {tuple(src[k].shape)} vs {tuple(dst[k].shape)}" for k in src
                  if k in dst and k not in loaded]
    if not loaded:
        raise ConfigError(
            f"no tensor of '{source}' ({source_name}) matches model.{name} "
            f"({type(target).__name__}) in name and shape: is it a backbone of this architecture?", key=key)
    target.load_state_dict(loaded, strict=False)
    kept = [k for k in dst if k not in loaded]
    logger.info("%s: %d of %d tensors of model.%s loaded from %s%s%s", key, len(loaded), len(dst), name, source,
                f"; at their initialisation: {_short_list(kept)}" if kept else "",
                f"; shapes differ (not loaded): {_short_list(mismatched)}" if mismatched else "")
    return {"loaded": sorted(loaded), "mismatched": mismatched, "kept": kept}


def _short_list(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------- export and load
def export_model(model: nn.Module, folder: Path, classes: list[str], processor: Any = None,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The model's export folder (its family's format) with the image processor beside it."""
    folder = Path(folder)
    family = family_of_model(model)
    family.export(model, folder, list(classes), state_dict=state_dict)
    config_file = folder / EXPORT_CONFIG
    config = json.loads(config_file.read_text())
    config[family.export_metadata_prefix + EXPORT_FAMILY_KEY] = family.name  # which family loads it again
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    if processor is not None:
        family.export_processor(processor).save_pretrained(folder)


# --------------------------------------------------------------------------- BatchNorm
def batch_norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def set_norm_eval(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (MMSegmentation's ``norm_eval``): it normalises
    with its running statistics and does not update them, whatever the per-process batch.
    Call after each ``model.train()``; returns the number of layers."""
    layers = batch_norm_layers(model)
    for layer in layers:
        layer.eval()
    return len(layers)


def convert_sync_bn(model: nn.Module, num_processes: int, device_type: str) -> tuple[nn.Module, str]:
    """``sync_bn``: BatchNorm -> SyncBatchNorm when several GPU processes train; otherwise
    the model unchanged. Returns the model and what was done (logged once by the caller)."""
    count = len(batch_norm_layers(model))
    if count == 0:
        return model, "sync_bn: the model has no BatchNorm layer: nothing to convert"
    if num_processes < 2:
        return model, f"sync_bn: one process: its {count} BatchNorm layer(s) already see the whole batch (kept)"
    if device_type != "cuda":
        return model, (f"sync_bn: SyncBatchNorm runs on GPUs only (NCCL); this {device_type} run keeps its {count} "
                       f"BatchNorm layer(s), each process normalising with the statistics of its own batch")
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, f"sync_bn: {count} BatchNorm layer(s) converted to SyncBatchNorm across {num_processes} processes"


def _inputs_to_fp32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if torch.is_tensor(a) and a.dtype in (torch.bfloat16, torch.float16) else a for a in args)


def keep_norms_fp32(model: nn.Module) -> str:
    """Normalisation layers compute in fp32 under CPU bf16 autocast.

    CUDA's autocast runs layer/group/batch norm in fp32; the CPU's runs them in the dtype they
    get, bf16 after any linear or convolution, and the residual stream behind them stays bf16.
    A forward pre-hook casts their inputs to fp32 (the following linear layers cast back to
    bf16 as before). Returns what was done (logged once by the caller)."""
    count = 0
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            module.register_forward_pre_hook(_inputs_to_fp32)
            count += 1
    return f"bf16 on the CPU: {count} normalisation layer(s) compute in fp32 (as CUDA's autocast runs them)"


def keep_norms_fp32_if_cpu_bf16(model: nn.Module, accelerator: Accelerator) -> str | None:
    """`keep_norms_fp32` for runs in bf16 on the CPU (training and evaluation alike); None otherwise."""
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu":
        return keep_norms_fp32(model)
    return None
