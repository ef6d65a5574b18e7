"""Build the optimizer from the ``optimizer`` section."""
from __future__ import annotations

import torch
from torch import nn

from seg_accel.errors import ConfigError
from seg_accel.registry import OPTIMIZERS


def build_optimizer(model: nn.Module, optimizer_cfg: dict, key: str = "optimizer") -> torch.optim.Optimizer:
    """Any ``torch.optim`` class (or registered optimizer) by ``type``; the remaining keys
    are its kwargs. Frozen parameters (``requires_grad=False``) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters", key=key)
    return OPTIMIZERS.build(optimizer_cfg, key, params=params)
