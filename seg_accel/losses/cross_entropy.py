"""Cross-entropy loss with MMSegmentation's options (SPEC section 5)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from seg_accel.registry import LOSSES


def reduce_pixel_loss(
    loss_nhw: torch.Tensor,
    valid_nhw: torch.Tensor,
    reduction: str,
    avg_non_ignore: bool,
) -> torch.Tensor:
    """'mean' divides by all pixels (N*H*W) or, with ``avg_non_ignore``, by the non-ignored ones."""
    if reduction == "none":
        return loss_nhw
    if reduction == "sum":
        return loss_nhw.sum()
    denom = valid_nhw.sum().clamp_min(1) if avg_non_ignore else loss_nhw.numel()
    return loss_nhw.sum() / denom


@LOSSES.register()
class CrossEntropyLoss(nn.Module):
    """Per pixel ``w[y] * -log softmax(z)[y]``, 0 on ignored pixels, times ``loss_weight``.

    ``ignore_index`` defaults to the head's (``model.decode_head.ignore_index``).
    """

    def __init__(
        self,
        reduction: Literal["none", "mean", "sum"] = "mean",
        class_weight: list[float] | None = None,
        loss_weight: float = 1.0,
        loss_name: str = "loss_ce",
        avg_non_ignore: bool = False,
        ignore_index: int | None = None,
    ):
        super().__init__()
        self.reduction = reduction
        self.loss_weight = float(loss_weight)
        self.avg_non_ignore = avg_non_ignore
        self.ignore_index = ignore_index
        self._loss_name = loss_name
        self.class_weight = None if class_weight is None else [float(w) for w in class_weight]
        weight = None if class_weight is None else torch.tensor(self.class_weight, dtype=torch.float32)
        self.register_buffer("weight", weight, persistent=False)

    @property
    def loss_name(self) -> str:
        return self._loss_name

    def forward(
        self,
        logits_nchw: torch.Tensor,
        labels_nhw: torch.Tensor,
        pixel_weight_nhw: torch.Tensor | None = None,
        ignore_index: int = 255,
    ) -> torch.Tensor:
        ignore = self.ignore_index if self.ignore_index is not None else ignore_index
        weight = None if self.weight is None else self.weight.to(logits_nchw.dtype)
        loss = F.cross_entropy(logits_nchw, labels_nhw, weight=weight, reduction="none", ignore_index=ignore)
        if pixel_weight_nhw is not None:
            loss = loss * pixel_weight_nhw
        loss = reduce_pixel_loss(loss, labels_nhw != ignore, self.reduction, self.avg_non_ignore)
        return self.loss_weight * loss
