"""Build transformers ``*ForSemanticSegmentation`` models from the ``model`` section.

``model.type`` is a transformers class name (``SegformerForSemanticSegmentation``,
``AutoModelForSemanticSegmentation``, ...), a model registered in ``MODELS`` or a
dotted import path. ``model.pretrained`` is a Hub id or a ``save_pretrained``
folder; without it ``model.config`` gives the config kwargs for a random init.
Transformers accepts unknown config kwargs silently, so we check them here.
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import TYPE_CHECKING, Any

from seg_accel.config.types import join_key, parse_value, type_hints
from seg_accel.errors import ConfigError, did_you_mean
from seg_accel.registry import MODELS

if TYPE_CHECKING:
    from seg_accel.config.schema import ModelConfig

logger = logging.getLogger("seg_accel")

# Config keys every transformers config takes besides its own signature.
_COMMON_CONFIG_KEYS = {"num_labels", "id2label", "label2id", "model_type", "output_attentions"}
# Model types whose segmentation forward leaves parameters without gradients even
# with the auxiliary head off (DPT: the backbone's final layernorm and the first
# fusion layer's residual unit), so DDP must look for unused parameters.
_UNUSED_PARAMETER_MODEL_TYPES = {"dpt"}


def _auto_class():
    import transformers

    return transformers.AutoModelForSemanticSegmentation


def resolve_model_class(name: str, key: str = "model.type") -> Any:
    return MODELS.get(name, key)


def _config_class(model_cls: Any, config_kwargs: dict, key: str) -> Any | None:
    """The config class for ``model.config`` kwargs, or None when only known after loading."""
    from transformers import CONFIG_MAPPING

    model_type = config_kwargs.get("model_type")
    if model_cls is _auto_class():
        if model_type is None:
            return None
        if model_type not in CONFIG_MAPPING:
            raise ConfigError(
                f"unknown transformers model_type '{model_type}'." + did_you_mean(model_type, CONFIG_MAPPING.keys(), False),
                key=f"{key}.config.model_type",
            )
        return CONFIG_MAPPING[model_type]
    return getattr(model_cls, "config_class", None)


def _allowed_config_keys(config_cls: Any) -> tuple[set[str], dict[str, Any]]:
    params = inspect.signature(config_cls.__init__).parameters
    allowed = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    allowed |= set(config_cls().to_dict()) | _COMMON_CONFIG_KEYS
    return allowed, type_hints(config_cls.__init__)


def check_config_kwargs(config_cls: Any, kwargs: dict, key: str) -> None:
    """Unknown keys and wrong value types in ``model.config`` are errors (with suggestions)."""
    from transformers import CONFIG_MAPPING

    allowed, hints = _allowed_config_keys(config_cls)
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


def check_model_config(model_cfg: ModelConfig, key: str = "model") -> None:
    """Validation-time checks of the model section (no weights are touched)."""
    model_cls = resolve_model_class(model_cfg.type, f"{key}.type")
    if model_cfg.pretrained is None:
        config_cls = _config_class(model_cls, model_cfg.config, key)
        if config_cls is None:
            raise ConfigError(
                "AutoModelForSemanticSegmentation without 'pretrained' needs model.config.model_type "
                "(e.g. segformer) to know which architecture to build",
                key=f"{key}.config",
            )
        kwargs = {k: v for k, v in model_cfg.config.items() if k != "model_type"}
        check_config_kwargs(config_cls, kwargs, f"{key}.config")
        make_config(config_cls, kwargs, key)  # transformers' own checks
    else:
        config_cls = _config_class(model_cls, model_cfg.config, key)
        if config_cls is not None:
            kwargs = {k: v for k, v in model_cfg.config.items() if k != "model_type"}
            check_config_kwargs(config_cls, kwargs, f"{key}.config")


def make_config(config_cls: Any, kwargs: dict, key: str) -> Any:
    """``config_cls(**kwargs)`` with transformers' validation errors turned into config errors."""
    try:
        return config_cls(**kwargs)
    except Exception as exc:  # transformers raises several types (TypeError, ValueError, strict-dataclass errors)
        reason = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in reason) if reason else type(exc).__name__
        raise ConfigError(f"invalid {config_cls.__name__}: {detail}", key=f"{key}.config") from exc


def _instantiate(model_cls: Any, config: Any) -> Any:
    return _auto_class().from_config(config) if model_cls is _auto_class() else model_cls(config)


def check_model_against_data(model_cfg: ModelConfig, classes: list[str], key: str = "model") -> None:
    """The model section must agree with the data's class names and with the heads it configures."""
    n = len(classes)
    head = model_cfg.decode_head
    outputs = head.out_channels or n
    if head.out_channels is not None and head.out_channels not in (1, n):
        raise ConfigError(
            f"must be the number of classes ({n}) or 1 (a binary sigmoid head), got {head.out_channels}",
            key=f"{key}.decode_head.out_channels",
        )
    if outputs == 1:
        if n != 2:
            raise ConfigError(
                f"one output channel (use_sigmoid) needs exactly 2 classes; the data has {n} ({', '.join(classes)})",
                key=f"{key}.decode_head.out_channels",
            )
        for i, loss in enumerate(head.loss_cfgs()):
            if loss.get("type") != "CrossEntropyLoss" or not loss.get("use_sigmoid", False):
                item = f"{key}.decode_head.loss_decode" + (f".{i}" if isinstance(head.loss_decode, list) else "")
                raise ConfigError("a 1-channel head needs CrossEntropyLoss with use_sigmoid: true", key=item)
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
                f"id2label {id2label} disagrees with the data's classes {classes}; remove it (it is taken from the data)",
                key=f"{key}.config.id2label",
            )
    model_cls = resolve_model_class(model_cfg.type, f"{key}.type")
    config_cls = _config_class(model_cls, model_cfg.config, key)
    if config_cls is None:  # a pretrained Auto model: known once loaded
        return
    has_aux = "use_auxiliary_head" in _allowed_config_keys(config_cls)[0]
    switch = model_cfg.config.get("use_auxiliary_head")
    if model_cfg.auxiliary_head is not None and not has_aux:
        raise ConfigError(f"{model_cls.__name__} has no auxiliary head; remove auxiliary_head",
                          key=f"{key}.auxiliary_head")
    if switch is True and model_cfg.auxiliary_head is None:
        raise ConfigError("the auxiliary head would get no loss: configure model.auxiliary_head (its losses) "
                          "or remove use_auxiliary_head", key=f"{key}.config.use_auxiliary_head")
    if switch is False and model_cfg.auxiliary_head is not None:
        raise ConfigError("contradicts model.auxiliary_head; remove one of them", key=f"{key}.config.use_auxiliary_head")


def _label_maps(classes: list[str], outputs: int) -> tuple[dict[int, str], dict[str, int]]:
    """One label per output channel; a 1-channel binary head's channel is the second class."""
    names = classes if outputs == len(classes) else classes[1:]
    id2label = {i: name for i, name in enumerate(names)}
    return id2label, {name: i for i, name in id2label.items()}


def _model_kwargs(model_cfg: ModelConfig, classes: list[str], key: str) -> tuple[Any, Any, dict]:
    """(model class, config class or None, config kwargs with the data's labels)."""
    model_cls = resolve_model_class(model_cfg.type, f"{key}.type")
    outputs = model_cfg.decode_head.out_channels or len(classes)
    id2label, label2id = _label_maps(classes, outputs)
    kwargs = dict(model_cfg.config)
    kwargs.update(num_labels=outputs, id2label=id2label, label2id=label2id)
    model_type = kwargs.pop("model_type", None)
    config_cls = _config_class(model_cls, {"model_type": model_type}, key)
    if config_cls is not None and "use_auxiliary_head" in _allowed_config_keys(config_cls)[0]:
        # The auxiliary head exists exactly when model.auxiliary_head gives it losses: one
        # nobody trains would leave parameters without gradients under DDP.
        kwargs["use_auxiliary_head"] = model_cfg.auxiliary_head is not None
    return model_cls, config_cls, kwargs


def build_model(model_cfg: ModelConfig, classes: list[str], key: str = "model") -> Any:
    """Instantiate the model with ``num_labels``/``id2label`` from the data's class names
    (then, with ``backbone_pretrained``, load the backbone's weights)."""
    model_cls, config_cls, kwargs = _model_kwargs(model_cfg, classes, key)
    if model_cfg.pretrained is not None:
        source = model_cfg.pretrained
        try:
            model = model_cls.from_pretrained(source, ignore_mismatched_sizes=True, **kwargs)
        except OSError as exc:
            where = "local folder" if os.path.isdir(source) else "Hub id (or a local path that does not exist)"
            raise ConfigError(f"cannot load pretrained model '{source}' ({where}): {exc}", key=f"{key}.pretrained") from exc
    else:
        model = _instantiate(model_cls, make_config(config_cls, kwargs, key))
    if model_cfg.backbone_pretrained is not None:
        load_backbone_weights(model, model_cfg.backbone_pretrained, f"{key}.backbone_pretrained")
    return model


def backbone_module(model: Any, key: str = "model.backbone_pretrained") -> tuple[str, Any]:
    """``(attribute, module)`` that ``backbone_pretrained`` loads into: the model's
    ``backbone`` (UperNet and other backbone-based models), else its base model (``dpt``,
    ``beit``, ``segformer``)."""
    import torch

    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, torch.nn.Module):
        return "backbone", backbone
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, torch.nn.Module):
        return prefix, base
    raise ConfigError(f"{type(model).__name__} has neither a `backbone` nor a base model to load weights into",
                      key=key)


def load_backbone_weights(model: Any, source: str, key: str = "model.backbone_pretrained") -> dict[str, list[str]]:
    """Load the weights of ``source`` (an ImageNet backbone: Hub id or ``save_pretrained``
    folder) into the model's backbone, tensor by tensor where names and shapes agree.
    Returns ``{"loaded", "mismatched", "kept"}`` (names in the backbone) and logs a summary;
    a source that matches nothing is a config error."""
    from transformers import AutoModel

    name, target = backbone_module(model, key)
    try:
        if name == "backbone" and hasattr(target, "out_features"):
            # the backbone's own class (AutoBackbone asks the Hub first, even for a local folder)
            source_model, info = type(target).from_pretrained(source, out_features=list(target.out_features),
                                                               output_loading_info=True)
        else:  # its pooler, if any, matches nothing: unused
            source_model, info = AutoModel.from_pretrained(source, output_loading_info=True)
    except (OSError, ValueError, TypeError) as exc:
        where = "local folder" if os.path.isdir(source) else "Hub id (or a local path that does not exist)"
        raise ConfigError(f"cannot load backbone weights '{source}' ({where}): {type(exc).__name__}: {exc}",
                          key=key) from exc
    dst = target.state_dict()
    missing = set(info.get("missing_keys", ()))  # not in the checkpoint: only initialised, never loaded

    def checkpointed(names: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in names.items() if k not in missing}

    def matching(names: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in names.items() if k in dst and tuple(v.shape) == tuple(dst[k].shape)}

    src = checkpointed(source_model.state_dict())
    loaded = matching(src)
    if len(loaded) < len(src):
        # transformers 5 renamed some modules (ViT: layers.N.attention.q_proj) but not others
        # (DPT's ViT encoder keeps encoder.layer.N.attention.attention.query) and writes
        # checkpoints under the old names: try those (one save to a temporary folder)
        saved = checkpointed(_saved_names(source_model))
        saved_loaded = matching(saved)
        if len(saved_loaded) > len(loaded):
            src, loaded = saved, saved_loaded
    mismatched = [f"{k} {tuple(src[k].shape)} vs {tuple(dst[k].shape)}" for k in src
                  if k in dst and k not in loaded]
    if not loaded:
        raise ConfigError(
            f"no tensor of '{source}' ({type(source_model).__name__}) matches model.{name} "
            f"({type(target).__name__}) in name and shape: is it a backbone of this architecture?", key=key)
    target.load_state_dict(loaded, strict=False)
    kept = [k for k in dst if k not in loaded]
    logger.info("%s: %d of %d tensors of model.%s loaded from %s%s%s", key, len(loaded), len(dst), name, source,
                f"; at their initialisation: {_short_list(kept)}" if kept else "",
                f"; shapes differ (not loaded): {_short_list(mismatched)}" if mismatched else "")
    return {"loaded": sorted(loaded), "mismatched": mismatched, "kept": kept}


def _saved_names(model: Any) -> dict[str, Any]:
    """The model's tensors under the names ``save_pretrained`` writes (the checkpoint format),
    without the base model prefix."""
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors: dict[str, Any] = {}
        for file in sorted(os.listdir(tmp)):
            if file.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(tmp, file)))
    prefix = getattr(model, "base_model_prefix", "")
    return {k[len(prefix) + 1:] if prefix and k.startswith(prefix + ".") else k: v for k, v in tensors.items()}


def _short_list(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def batch_norm_layers(model: Any) -> list[Any]:
    import torch

    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def set_norm_eval(model: Any) -> int:
    """Put every BatchNorm layer in eval mode (MMSegmentation's ``norm_eval``): it normalises
    with its running statistics and does not update them, whatever the per-process batch.
    Call after each ``model.train()``; returns the number of layers."""
    layers = batch_norm_layers(model)
    for layer in layers:
        layer.eval()
    return len(layers)


def convert_sync_bn(model: Any, num_processes: int, device_type: str) -> tuple[Any, str]:
    """``sync_bn``: BatchNorm -> SyncBatchNorm when several GPU processes train; otherwise
    the model unchanged. Returns the model and what was done (logged once by the caller)."""
    import torch

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


def build_empty_model(model_cfg: ModelConfig, classes: list[str], key: str = "model") -> Any | None:
    """The architecture with weights on the meta device (names, shapes and module types,
    no memory): for checks and tables before training. None when a pretrained model's
    config cannot be read locally (a Hub id while offline)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    model_cls, config_cls, kwargs = _model_kwargs(model_cfg, classes, key)
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
            return _instantiate(model_cls, config)
    except Exception as exc:  # any failure here is a config mistake; say which model and why
        raise ConfigError(
            f"{getattr(model_cls, '__name__', model_cls)} cannot be built from this config: "
            f"{type(exc).__name__}: {exc}",
            key=f"{key}.config",
        ) from exc


def needs_unused_parameter_search(model: Any, aux_trained: bool = False) -> bool:
    """Whether DDP must run with ``find_unused_parameters=True`` for this model."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    if getattr(config, "model_type", None) in _UNUSED_PARAMETER_MODEL_TYPES:
        return True
    # an auxiliary head (e.g. of a pretrained Auto model) that gets no loss
    return getattr(model, "auxiliary_head", None) is not None and not aux_trained


class AuxiliaryCapture:
    """Keeps the training-time output of ``model.auxiliary_head`` (transformers 5 returns no
    auxiliary logits from the forward), through a forward hook on the unwrapped model."""

    def __init__(self, model: Any):
        head = getattr(model, "auxiliary_head", None)
        if head is None:
            raise ConfigError(f"{type(model).__name__} has no auxiliary head; remove auxiliary_head",
                              key="model.auxiliary_head")
        self.output = None
        head.register_forward_hook(self._keep)

    def _keep(self, module: Any, inputs: Any, output: Any) -> None:
        if module.training:  # evaluation never reads it: do not hold on to its memory
            self.output = output

    def pop(self) -> Any:
        output, self.output = self.output, None
        if output is None:
            raise RuntimeError("the auxiliary head did not run in this forward pass")
        return output


def segmentation_logits(model: Any, pixel_values: Any) -> Any:
    """Logits ``(N, C, h, w)`` of a transformers segmentation model called without labels."""
    out = model(pixel_values=pixel_values)
    return out.logits if hasattr(out, "logits") else out
