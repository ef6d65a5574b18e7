"""PyTorch ``.pth`` checkpoints (MMSegmentation's, any ``torch.save`` of a state dict) read as
data: ``torch.load(weights_only=True)`` only, so a file that needs pickled objects is refused
and nothing it names is imported or run."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from seg_accel.errors import ConfigError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def is_torch_checkpoint(path: Any) -> bool:
    return Path(path).is_file() and Path(path).suffix in TORCH_SUFFIXES


def read_torch_checkpoint(path: Path, key: str | None) -> dict[str, Any]:
    """A ``.pth`` file read as data (``torch.load(weights_only=True)``): a file that needs
    pickled objects (code) is refused and nothing in it runs."""
    import pickle

    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first
                      else "")
        raise ConfigError(f"{path} holds pickled Python objects besides tensors ({detail[:160]}): seg-accel reads "
                          "checkpoints with torch.load(weights_only=True) and refuses this one (loading it would run "
                          "code it names). Re-save its state_dict alone, or use a checkpoint you trust with "
                          "torch.load yourself", key=key) from exc
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as a PyTorch checkpoint: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}", key=key) from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path} holds a {type(raw).__name__}, not a state dict or checkpoint", key=key)
    return dict(raw)


def checkpoint_tensors(checkpoint: Mapping[str, Any], path: Any = "the checkpoint",
                       key: str | None = "load_from") -> dict[str, torch.Tensor]:
    """The model's tensors of a PyTorch checkpoint (MMSegmentation's mmcv/mmengine format, a
    Lightning or plain one): its ``state_dict`` (``model``, or the mapping itself), without
    DDP's ``module.`` prefix."""
    state = checkpoint.get("state_dict", checkpoint.get("model", checkpoint))
    if not isinstance(state, Mapping):
        raise ConfigError(f"{path}: 'state_dict' is a {type(state).__name__}, not a mapping of tensors", key=key)
    tensors = {str(k): v for k, v in state.items() if torch.is_tensor(v)}
    if not tensors:
        raise ConfigError(f"{path} holds no tensors (keys: {', '.join(list(map(str, state))[:6])})", key=key)
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors
