"""The tutorial's self-implemented optimizer and optimizer constructor (MMSegmentation's
"customize runtime" tutorial), registered with seg-accel: ``custom_optimizer.yaml`` and
``custom_constructor.yaml`` import this module with ``custom_imports``."""
from __future__ import annotations

import torch
from torch import nn

from seg_accel.registry import OPTIMIZER_CONSTRUCTORS, OPTIMIZERS


@OPTIMIZERS.register()
class MyOptimizer(torch.optim.Optimizer):
    """SGD with heavy-ball momentum, in the tutorial's terms: ``a`` the learning rate, ``b`` the
    momentum, ``c`` the weight decay."""

    def __init__(self, params, a: float = 0.01, b: float = 0.9, c: float = 0.0):
        super().__init__(params, {"lr": a, "momentum": b, "weight_decay": c})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.add(param, alpha=group["weight_decay"]) if group["weight_decay"] else param.grad
                buffer = self.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
                buffer.mul_(group["momentum"]).add_(grad)
                param.add_(buffer, alpha=-group["lr"])


@OPTIMIZER_CONSTRUCTORS.register()
class MyOptimizerConstructor:
    """The tutorial's example of a parameter-specific setting: no weight decay for BatchNorm
    layers (and biases), the optimizer's own for every other weight."""

    def __init__(self, optimizer_cfg: dict, paramwise_cfg: dict | None = None):
        self.optimizer_cfg, self.paramwise_cfg = dict(optimizer_cfg), dict(paramwise_cfg or {})

    def __call__(self, model: nn.Module) -> torch.optim.Optimizer:
        norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
        no_decay_ids = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters()}
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (no_decay if id(param) in no_decay_ids or name.endswith(".bias") else decay).append(param)
        cfg = dict(self.optimizer_cfg)
        kind = OPTIMIZERS.get(cfg.pop("type"), "optimizer.type")
        return kind([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], **cfg)
