"""Loading models and weights from disk or the Hub, for every command: an export through the
family that wrote it, a training checkpoint through the config's architecture, weights into
a built model (``load_from``, strict for evaluation)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from seg_accel.errors import ConfigError, UntrustedExportError
from seg_accel.models.builder import build_model
from seg_accel.models.families import attach_family, family_of_export, family_of_model, model_family
from seg_accel.models.interface import EXPORT_CONFIG
from seg_accel.models.torch_files import checkpoint_tensors, is_torch_checkpoint, read_torch_checkpoint
from seg_accel.runtime.checkpoints import META
from seg_accel.runtime.manifest import MANIFEST, verify

if TYPE_CHECKING:
    from seg_accel.config.schema import ModelConfig

logger = logging.getLogger("seg_accel")

MAX_EXPORT_CONFIG_BYTES = 16 * 1024 * 1024  # a config.json is kilobytes; a crafted one gets no more


def resolve_export(source: str | os.PathLike) -> Path:
    """A local export folder, or a Hub repo id downloaded (``HF_HUB_OFFLINE``: the local cache only)."""
    path = Path(source)
    if path.is_dir():
        if not (path / EXPORT_CONFIG).is_file():
            raise FileNotFoundError(f"{path} has no {EXPORT_CONFIG}: not a model export")
        return path
    text = str(source)
    if path.exists() or text.startswith((".", "/")) or text.count("/") != 1:
        raise FileNotFoundError(f"{source} is neither an export folder nor a Hub repo id (user/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(text))


def read_export_config(folder: Path) -> dict[str, Any]:
    """An export's ``config.json`` (a JSON object of at most ``MAX_EXPORT_CONFIG_BYTES``)."""
    file = folder / EXPORT_CONFIG
    if file.stat().st_size > MAX_EXPORT_CONFIG_BYTES:
        raise ValueError(f"{file} is {file.stat().st_size:,} bytes: not an export's config (at most "
                         f"{MAX_EXPORT_CONFIG_BYTES:,})")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds {type(config).__name__}, not a JSON object")
    return config


def load_export(source: str | os.PathLike, trust_remote_code: bool = False) -> nn.Module:
    """Any seg-accel export (a ``final/`` folder, a checkpoint's ``pretrained/``, or a Hub repo it
    was pushed to), rebuilt by the family that wrote it. Nothing its files name is imported or
    called unless ``trust_remote_code``."""
    folder = resolve_export(source)
    config = read_export_config(folder)
    family = family_of_export(config, folder)
    from safetensors import SafetensorError

    try:
        model = family.load_export(folder, config, trust_remote_code=trust_remote_code)
    except SafetensorError as exc:
        raise ValueError(f"{folder}: a weights file is not readable safetensors ({exc}): a damaged or truncated "
                         "download?") from exc
    check_loaded_weights(model, folder)
    return attach_family(model, family)


def check_loaded_weights(model: nn.Module, folder: Path) -> None:
    """An export's weights must be what the model holds: a floating tensor stored as integers (or
    the reverse) would be cast without a word, and non-finite weights (a diverged run) would
    predict garbage without one."""
    import torch
    from safetensors import SafetensorError, safe_open

    expected = model.state_dict()
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    if name not in expected:
                        continue
                    stored = handle.get_slice(name).get_dtype()
                    stored_float = stored.startswith(("F", "BF"))
                    if stored_float != expected[name].is_floating_point():
                        raise ValueError(f"{file}: tensor {name} is stored as {stored} but the model's is "
                                         f"{str(expected[name].dtype).removeprefix('torch.')} (a damaged or crafted "
                                         "export?)")
        except SafetensorError as exc:
            raise ValueError(f"{file} is not a readable safetensors file: {exc}") from exc
    for name, tensor in expected.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{folder}: the model's weights are not finite ({name}: {bad} of {tensor.numel()} "
                             "values are NaN or infinite): the run that made it diverged, or the file is damaged")


def load_model(source: str | os.PathLike, model_cfg: ModelConfig | None = None, classes: list[str] | None = None,
               key: str = "CHECKPOINT", trust_remote_code: bool = False) -> nn.Module:
    """Load a model from disk or the Hub: any seg-accel export (a ``final/`` folder, a
    checkpoint's ``pretrained/``, or a Hub repo id it was pushed to), rebuilt by its family.
    An export is data: a module export's class must be registered here (import the module
    that registers it); ``trust_remote_code=True`` lets the export name the code to import
    (only for exports you trust), as transformers' switch of the same name.

    With ``model_cfg`` (the evaluate command, predict from a config) ``source`` may also be a
    training checkpoint (the architecture from ``model_cfg``, every tensor must fit), every
    failure is a ``ConfigError`` naming ``key``, and with ``classes`` the model's outputs must
    fit the data's classes."""
    if model_cfg is None:
        return load_export(source, trust_remote_code)
    path = Path(source)
    if (path / META).is_file() or is_torch_checkpoint(path):  # a training checkpoint, or a .pth (MMSegmentation's)
        # the checkpoint replaces every weight: nothing to download
        model = build_model(model_family(model_cfg.type).architecture_only(model_cfg), list(classes or []))
        load_weights(model, path, key=key, strict=True)
        return model
    text = str(source)
    try:
        model = load_export(source, trust_remote_code)
    except UntrustedExportError as exc:
        raise ConfigError(str(exc), key=key) from exc
    except (OSError, ImportError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        if path.exists() or text.startswith((".", "/")) or text.count("/") > 1:
            raise ConfigError(f"not a checkpoint or save_pretrained folder (an export): {text}", key=key) from exc
        raise ConfigError(f"cannot load '{text}'{' (HF_HUB_OFFLINE is set)' if offline else ''}: {exc}",
                          key=key) from exc
    if classes is not None:
        outputs = model_cfg.decode_head.out_channels or len(classes)
        found = family_of_model(model).output_channels(model)
        if found is not None and found != outputs:
            raise ConfigError(f"the model has {found} output classes but the data defines "
                              f"{len(classes)} ({', '.join(classes)})", key=key)
    return model


def _shape_summary(problems: list[str], total: int) -> str:
    shown = "; ".join(problems[:3]) + (f"; ... ({len(problems) - 3} more)" if len(problems) > 3 else "")
    return f"{len(problems)} of {total} tensors differ ({shown})"


def check_weights_fit(model: Any, file: Path, key: str) -> None:
    """Every tensor of ``file`` (safetensors) has the name and shape of the model's: one line
    naming what differs otherwise (another class count, another architecture)."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(file), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    problems = [f"{k} {found[k]} vs the model's {expected[k]}" for k in found if k in expected
                and found[k] != expected[k]]
    problems += [f"{k} is not in the model" for k in found if k not in expected]
    problems += [f"the model's {k} is not in the checkpoint" for k in expected if k not in found]
    if problems:
        raise ConfigError(f"{file.parent.name} was made with another model: {_shape_summary(problems, len(expected))}"
                          ". Another class count or architecture? (load_from takes the matching weights only)",
                          key=key)


def load_weights(model: Any, path: Path, key: str = "load_from", strict: bool = False) -> None:
    """Weights only: a checkpoint folder, an export folder or a ``.safetensors`` file.

    ``load_from`` (``strict=False``) loads what matches in name and shape and says in one line
    what it leaves (a new head for other classes is the usual case); nothing matching is an
    error. ``strict`` (evaluating a checkpoint): anything that does not match is an error."""
    from safetensors.torch import load_file

    path = Path(path)
    if is_torch_checkpoint(path):  # a .pth (an MMSegmentation checkpoint): read as data, tensors only
        files = [path]
    elif path.is_file() and path.suffix == ".safetensors":
        files = [path]
    else:
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise ConfigError(f"no weights at {path} (expected a checkpoint or export folder, a .safetensors file or a "
                          f"PyTorch .pth)", key=key)
    if path.is_dir() and (path / MANIFEST).is_file() and (problem := verify(path)) is not None:
        raise ConfigError(f"checkpoint {path.name} is damaged: {problem}", key=key)
    config_file = path / EXPORT_CONFIG if path.is_dir() else None
    if config_file is not None and config_file.is_file() and not (path / META).is_file():
        # an export: its family gives its weights under the model's names
        config = read_export_config(path)
        state = family_of_export(config, path).export_state_dict(path, config)
    elif is_torch_checkpoint(path):
        state = checkpoint_tensors(read_torch_checkpoint(path, key), path, key)
    else:  # an Accelerate checkpoint or a file: the model's own state dict
        state = {}
        for file in files:
            state.update(load_file(str(file)))
    expected = model.state_dict()
    fits = {k: v for k, v in state.items() if k in expected and tuple(v.shape) == tuple(expected[k].shape)}
    problems = [f"{k} {tuple(v.shape)} vs the model's {tuple(expected[k].shape)}" for k, v in state.items()
                if k in expected and k not in fits]
    problems += [f"{k} is not in the model" for k in state if k not in expected]
    missing = [k for k in expected if k not in state]
    if not fits:
        raise ConfigError(f"none of the {len(expected)} tensors of the model is in {path} with its name and shape "
                          f"(e.g. the file has {next(iter(state), 'nothing')}, the model {next(iter(expected))}): "
                          "weights of another architecture?", key=key)
    if strict and (problems or missing):
        problems += [f"the model's {k} is not in it" for k in missing]
        raise ConfigError(f"{path} does not fit the model: {_shape_summary(problems, len(expected))}. Another class "
                          "count or architecture?", key=key)
    model.load_state_dict(fits, strict=False)
    if problems or missing:
        logger.warning("%s %s: loaded %d of the model's %d tensors; not loaded: %s%s", key, path, len(fits),
                       len(expected), _shape_summary(problems, len(state)) if problems else "",
                       f"{'; ' if problems else ''}{len(missing)} kept at their initialisation (e.g. {missing[0]})"
                       if missing else "")
    logger.info("loaded weights from %s", path)
