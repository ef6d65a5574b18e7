"""Any ``nn.Module`` registered in ``MODELS`` (or named by a dotted import path) as a seg-accel model.

The class takes ``num_classes`` (filled from the data) and its own options, written
directly under ``model`` (``model: {type: TinyNet, width: 16}``), checked against its
``__init__`` signature and annotations like every other component. Its ``forward`` takes
``pixel_values`` and returns the logits, or ``{"logits": ..., "aux_logits": ...}`` with an
auxiliary head. The export is ``model.safetensors`` plus a ``config.json`` naming the class
and its options, so ``seg_accel.load_model(folder)`` rebuilds it wherever the class can
be imported.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from seg_accel.errors import ConfigError
from seg_accel.models.families import register_family
from seg_accel.models.interface import EXPORT_CONFIG, EXPORT_WEIGHTS, ModelFamily, export_class_count, label_maps
from seg_accel.version import __version__

if TYPE_CHECKING:
    from seg_accel.config.schema import ModelConfig

logger = logging.getLogger("seg_accel")

EXPORT_KEY = "seg_accel_model"  # the config.json entry that marks a seg-accel module export


def import_path(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def import_object(path: str) -> Any:
    module_name, _, name = path.rpartition(".")
    obj: Any = importlib.import_module(module_name)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@register_family(order=100)
class ModuleFamily(ModelFamily):
    """A registered ``nn.Module`` class (or a function returning one) taking ``num_classes``:
    asked last, it takes any module the families before it do not."""

    name = "module"

    def __init__(self, model_cls: Any, type_name: str):
        self.model_cls, self.type_name = model_cls, type_name

    @classmethod
    def from_entry(cls, entry: Any, type_name: str) -> ModuleFamily | None:
        if inspect.isclass(entry) and issubclass(entry, nn.Module) or inspect.isfunction(entry):
            return cls(entry, type_name)
        return None

    @classmethod
    def from_model(cls, model: nn.Module) -> ModuleFamily | None:
        spec = getattr(model, "seg_accel_spec", None)
        return cls(type(model), spec["type"]) if spec is not None else None

    @classmethod
    def from_export(cls, config: dict[str, Any]) -> ModuleFamily | None:
        spec = config.get(EXPORT_KEY)
        return cls(None, spec["type"]) if isinstance(spec, dict) and "type" in spec else None

    def check(self, model_cfg: ModelConfig, classes: list[str], key: str) -> None:
        from seg_accel.registry import MODELS

        name = getattr(self.model_cls, "__name__", self.type_name)
        if model_cfg.config:
            raise ConfigError(f"model.config holds transformers config options; {name} takes its options directly "
                              f"under {key} ({key}: {{type: {self.type_name}, <option>: ...}})", key=f"{key}.config")
        if model_cfg.pretrained is not None:
            raise ConfigError(f"pretrained loads transformers checkpoints; for {name} start from saved weights with "
                              "load_from (a seg-accel export or checkpoint)", key=f"{key}.pretrained")
        params = inspect.signature(self.model_cls).parameters
        if "num_classes" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ConfigError(f"{name} must take num_classes (seg-accel passes the number of output channels): "
                              f"def __init__(self, num_classes: int, ...)", key=f"{key}.type")
        MODELS.check({"type": self.type_name, **model_cfg.options}, key)

    def _outputs(self, model_cfg: ModelConfig, classes: list[str]) -> int:
        return model_cfg.decode_head.out_channels or len(classes)

    def build(self, model_cfg: ModelConfig, classes: list[str], key: str) -> nn.Module:
        try:
            model = self.model_cls(num_classes=self._outputs(model_cfg, classes), **model_cfg.options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"cannot build {self.type_name}: {exc}", key=key) from exc
        if not isinstance(model, nn.Module):
            raise ConfigError(f"{self.type_name} returned {type(model).__name__}, not a torch.nn.Module", key=f"{key}.type")
        # what the export needs to build it again
        model.seg_accel_spec = {"import_path": import_path(self.model_cls), "type": self.type_name,
                                "options": dict(model_cfg.options)}
        return model

    def export(self, model: nn.Module, folder: Path, classes: list[str],
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
        from safetensors.torch import save_file

        spec = getattr(model, "seg_accel_spec", None)
        if spec is None:
            raise ValueError(f"{type(model).__name__} was not built by seg-accel (no seg_accel_spec): cannot export")
        if spec["import_path"].startswith("__main__."):
            logger.warning("%s is defined in __main__: the export loads only where that script's class is importable",
                           spec["type"])
        folder.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else model.state_dict()
        save_file(_unshared(state), str(folder / EXPORT_WEIGHTS), metadata={"format": "pt"})
        outputs = _output_count(model, classes)
        id2label, label2id = label_maps(list(classes), outputs)
        config = {EXPORT_KEY: spec, "num_classes": outputs, "id2label": {str(k): v for k, v in id2label.items()},
                  "label2id": label2id, "seg_accel_version": __version__}
        (folder / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))

    def load_export(self, folder: Path, config: dict[str, Any], trust_remote_code: bool = False) -> nn.Module:
        return load_module_export(folder, config, trust_remote_code)

    def describe_export(self, config: dict[str, Any]) -> dict[str, str]:
        kind = str(config[EXPORT_KEY]["type"])
        return {"architecture": kind, "library": "pytorch", "tag": kind}

    def usage(self, repo_or_folder: str, config: dict[str, Any]) -> list[str]:
        spec = config[EXPORT_KEY]
        module = spec["import_path"].rpartition(".")[0]
        return [f"A `{spec['type']}` (`{spec['import_path']}`) exported by seg-accel: its weights and a `config.json` "
                "naming the class and its options. With that class's module importable (on the Python path), import "
                "it (it registers the class) and load:", "",
                "```python", "import torch", "", f"import {module}  # registers {spec['type']}", "import seg_accel", "",
                f'model = seg_accel.load_model("{repo_or_folder}").eval()',
                "with torch.no_grad():",
                "    logits = model(pixel_values)  # (N, 3, H, W), normalised as preprocessor_config.json says",
                "labels = logits.argmax(1)  # config.json's id2label names the classes", "```", ""]


def _output_count(model: nn.Module, classes: list[str]) -> int:
    return int(getattr(model, "num_classes", 0) or len(classes))


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): copy the later ones."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset()) if tensor.numel() else (0, id(tensor))
        out[name] = tensor.clone().contiguous() if where in seen else tensor.contiguous()
        seen.add(where)
    return out


def load_module_export(folder: Path, config: dict, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a module export: its class, constructed with its options, its weights (all must
    match). An export is data: by default its class must be registered in ``MODELS`` here (under
    the export's type, at the export's import path) and its options fit the constructor's
    signature; nothing the file names is imported. ``trust_remote_code`` imports the class from
    the export's ``import_path`` (only for exports you trust)."""
    from safetensors.torch import load_file

    from seg_accel.errors import UntrustedExportError
    from seg_accel.registry import MODELS

    spec = config[EXPORT_KEY]
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str) or \
            not isinstance(spec.get("import_path"), str) or not isinstance(spec.get("options", {}), dict):
        raise ValueError(f"{folder}/config.json: {EXPORT_KEY} must hold 'type', 'import_path' and 'options'")
    outputs = export_class_count(config.get("num_classes"), folder, "num_classes")
    options = dict(spec.get("options", {}))
    if trust_remote_code:
        try:
            model_cls = import_object(spec["import_path"])
        except (ImportError, AttributeError) as exc:
            raise ImportError(f"the export in {folder} is a {spec['type']} ({spec['import_path']}), which cannot be "
                              f"imported here: {exc}. Put its module on the Python path") from exc
    else:
        model_cls = MODELS.registered(spec["type"])
        if model_cls is None or import_path(model_cls) != spec["import_path"]:
            here = f" (here '{spec['type']}' is {import_path(model_cls)})" if model_cls is not None else ""
            raise UntrustedExportError(
                f"the export in {folder} is a {spec['type']} ({spec['import_path']}), which is not a model registered "
                f"here{here}: import the module that registers it first (e.g. import "
                f"{spec['import_path'].rpartition('.')[0]}), or, if you trust this export, load it with "
                "trust_remote_code=True (--trust-remote-code): its config.json then names code to import and run")
        try:
            MODELS.check({"type": spec["type"], **options}, f"{EXPORT_KEY}.options")
        except ConfigError as exc:
            raise ValueError(f"{folder}/config.json does not fit {spec['type']}: {exc}") from exc
    model = model_cls(num_classes=outputs, **options)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{folder}: {spec['import_path']} returned {type(model).__name__}, not a torch.nn.Module")
    model.seg_accel_spec = dict(spec)
    try:
        model.load_state_dict(load_file(str(folder / EXPORT_WEIGHTS)), strict=True)
    except RuntimeError as exc:  # missing, unexpected or misshapen tensors: torch lists them over many lines
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = "; ".join(lines[1:4]) if len(lines) > 1 else lines[0] if lines else type(exc).__name__
        raise ValueError(f"{folder / EXPORT_WEIGHTS} does not fit the {spec['type']} it names: {detail[:400]}") from exc
    return model
