"""Sigmoid focal loss (MMSegmentation 0.x FocalLoss)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from seg_accel.errors import ConfigError
from seg_accel.losses.utils import (
    binary_target,
    load_class_weight,
    PixelLoss,
    one_hot,
    resolve_ignore_index,
    valid_mask,
)
from seg_accel.registry import LOSSES


@LOSSES.register()
class FocalLoss(PixelLoss):
    """Per pixel and class channel ``c`` with one-hot target ``t`` and ``p = sigmoid(z)``:
    ``BCE(z, t) * (alpha*t + (1-alpha)*(1-t)) * (t*(1-p) + (1-t)*p) ** gamma``, times
    ``class_weight[c]``; ignored pixels count 0. ``mean`` divides by all N*C*H*W elements
    (as MMSegmentation). ``alpha`` may be one number or one per class. A 1-channel (sigmoid)
    head: ``t`` is the 0/1 label, ``class_weight[label]`` weights the pixel."""

    def __init__(
        self,
        use_sigmoid: bool = True,
        gamma: float = 2.0,
        alpha: float | list[float] = 0.5,
        reduction: Literal["none", "mean", "sum"] = "mean",
        class_weight: list[float] | str | None = None,
        loss_weight: float = 1.0,
        ignore_index: int | None = None,
        loss_name: str = "loss_focal",
    ):
        super().__init__()
        if not use_sigmoid:
            raise ConfigError("only the sigmoid focal loss exists (as in MMSegmentation); set use_sigmoid: true",
                              key="use_sigmoid")
        if gamma < 0:
            raise ConfigError(f"must be >= 0, got {gamma}", key="gamma")
        self.gamma, self.alpha = gamma, alpha
        self.reduction = reduction
        self.class_weight = load_class_weight(class_weight)
        self.loss_weight = float(loss_weight)
        self.ignore_index = ignore_index
        self.loss_name = loss_name

    def pixel_loss(self, logits_nchw: torch.Tensor, labels_nhw: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """``(N, H, W)``: the focal terms of a pixel summed over its class channels."""
        ignore = resolve_ignore_index(self.ignore_index, ignore_index)
        z = logits_nchw.float()
        binary = z.shape[1] == 1  # a 1-channel head: its channel's target is the 0/1 label itself
        target = binary_target(labels_nhw, ignore).unsqueeze(1) if binary else one_hot(labels_nhw, z.shape[1], ignore)
        p = z.sigmoid()
        alpha = torch.as_tensor(self.alpha, dtype=z.dtype, device=z.device)
        if alpha.ndim == 1:
            alpha = alpha[-1:] if binary else alpha  # 1 channel: the foreground's alpha
            alpha = alpha.view(1, -1, 1, 1)
        weight = (alpha * target + (1 - alpha) * (1 - target)) * (target * (1 - p) + (1 - target) * p).pow(self.gamma)
        loss = F.binary_cross_entropy_with_logits(z, target, reduction="none") * weight
        if self.class_weight is not None:
            weights = torch.tensor(self.class_weight, dtype=z.dtype, device=z.device)
            # a 1-channel head weights each pixel by class_weight[label], as the sigmoid CE does
            loss = loss * (weights[target.long()] if binary else weights.view(1, -1, 1, 1))
        return (loss * valid_mask(labels_nhw, ignore).unsqueeze(1)).sum(1)
