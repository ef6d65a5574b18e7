"""Dice loss (docs/behaviour.md section 5), with ignored pixels masked everywhere."""
from __future__ import annotations

import torch
from torch import nn

from seg_accel.losses.utils import binary_target, load_class_weight, one_hot, resolve_ignore_index, valid_mask
from seg_accel.registry import LOSSES


@LOSSES.register()
class DiceLoss(nn.Module):
    """``P = softmax(z)``, ``Y`` one-hot, ``m`` = not ignored (times the sampler's weight);
    per class ``i`` and image ``n``:
    ``d = 1 - (2 * sum(P*Y*m) + smooth) / (sum(P**e * m) + sum(Y**e * m) + smooth)``;
    mean over images, times ``class_weight[i]``; mean over classes, times ``loss_weight``.
    (MMSegmentation 0.x counts ignored pixels in the denominator; we do not.) A 1-channel
    (sigmoid) head: ``P = sigmoid(z)`` against the 0/1 labels, the foreground's Dice only
    (``class_weight``, two values: the second scales it)."""

    def __init__(
        self,
        smooth: float = 1.0,
        exponent: float = 2.0,
        loss_weight: float = 1.0,
        class_weight: list[float] | str | None = None,
        ignore_index: int | None = None,
        loss_name: str = "loss_dice",
    ):
        super().__init__()
        self.smooth, self.exponent = smooth, exponent
        self.loss_weight = float(loss_weight)
        self.class_weight = load_class_weight(class_weight)
        self.ignore_index = ignore_index
        self.loss_name = loss_name

    def forward(
        self,
        logits_nchw: torch.Tensor,
        labels_nhw: torch.Tensor,
        pixel_weight_nhw: torch.Tensor | None = None,
        ignore_index: int = 255,
    ) -> torch.Tensor:
        ignore = resolve_ignore_index(self.ignore_index, ignore_index)
        if logits_nchw.shape[1] == 1:
            probs = logits_nchw.float().sigmoid()
            target = binary_target(labels_nhw, ignore).unsqueeze(1)
        else:
            probs = logits_nchw.float().softmax(1)
            target = one_hot(labels_nhw, probs.shape[1], ignore)
        mask = valid_mask(labels_nhw, ignore, pixel_weight_nhw).unsqueeze(1)
        inter = (probs * target * mask).flatten(2).sum(2)
        denom = (probs.pow(self.exponent) * mask).flatten(2).sum(2) + (target.pow(self.exponent) * mask).flatten(2).sum(2)
        dice = 1 - (2 * inter + self.smooth) / (denom + self.smooth)  # (N, C)
        per_class = dice.mean(0)
        if self.class_weight is not None:
            weights = torch.tensor(self.class_weight, dtype=per_class.dtype, device=per_class.device)
            per_class = per_class * (weights[-1:] if per_class.numel() == 1 else weights)
        return self.loss_weight * per_class.mean()
