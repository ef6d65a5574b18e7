"""Cross-entropy loss with MMSegmentation's options (docs/behaviour.md section 5)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

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
class CrossEntropyLoss(PixelLoss):
    """Softmax: per pixel ``w[y] * -log softmax(z)[y]``, 0 on ignored pixels.
    Sigmoid (``use_sigmoid``): binary CE of each channel against the one-hot target,
    ``class_weight[c]`` weighting channel ``c``; a 1-channel head (two classes) takes
    labels 0/1 and weights pixels by ``class_weight[y]``. ``pos_weight`` (sigmoid only; one
    number, or one per channel) multiplies the positive term, ``-pos_weight * y * log sigmoid(z)``,
    as torch's ``binary_cross_entropy_with_logits`` does (rare foreground: a weight above 1).

    ``mean`` divides by all pixels (x channels for sigmoid), or by the non-ignored ones
    with ``avg_non_ignore``. Times ``loss_weight``. ``ignore_index: null`` uses the head's.
    """

    def __init__(
        self,
        use_sigmoid: bool = False,
        reduction: Literal["none", "mean", "sum"] = "mean",
        class_weight: list[float] | str | None = None,
        loss_weight: float = 1.0,
        loss_name: str = "loss_ce",
        avg_non_ignore: bool = False,
        ignore_index: int | None = None,
        pos_weight: float | list[float] | None = None,
    ):
        super().__init__()
        from seg_accel.errors import ConfigError

        if pos_weight is not None and not use_sigmoid:
            raise ConfigError("pos_weight weights the positive term of the sigmoid (binary) cross-entropy: set "
                              "use_sigmoid: true, or use class_weight with softmax", key="pos_weight")
        values = [pos_weight] if isinstance(pos_weight, (int, float)) else pos_weight
        if values is not None and (not values or any(not v > 0 for v in values)):
            raise ConfigError(f"must be > 0 (one number or one per channel), got {pos_weight}", key="pos_weight")
        self.register_buffer("pos_weight", None if values is None else torch.tensor(values, dtype=torch.float32),
                             persistent=False)
        self.use_sigmoid = use_sigmoid
        self.reduction = reduction
        self.loss_weight = float(loss_weight)
        self.loss_name = loss_name
        self.avg_non_ignore = avg_non_ignore
        self.ignore_index = ignore_index
        self.class_weight = load_class_weight(class_weight)
        weight = None if self.class_weight is None else torch.tensor(self.class_weight, dtype=torch.float32)
        self.register_buffer("weight", weight, persistent=False)

    def pixel_loss(self, logits_nchw: torch.Tensor, labels_nhw: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """The unreduced loss of each pixel ``(N, H, W)`` (0 on ignored pixels), before ``loss_weight``."""
        ignore = resolve_ignore_index(self.ignore_index, ignore_index)
        if not self.use_sigmoid:
            weight = None if self.weight is None else self.weight.to(logits_nchw.dtype)
            return F.cross_entropy(logits_nchw, labels_nhw, weight=weight, reduction="none", ignore_index=ignore)
        mask = valid_mask(labels_nhw, ignore)
        channels = logits_nchw.shape[1]
        pos_weight = self.pos_weight
        if pos_weight is not None:
            if pos_weight.numel() not in (1, channels):
                raise ValueError(f"pos_weight has {pos_weight.numel()} values for {channels} channels")
            pos_weight = pos_weight.to(logits_nchw.dtype)
        if channels == 1:
            target = binary_target(labels_nhw, ignore).to(logits_nchw.dtype)
            loss = F.binary_cross_entropy_with_logits(logits_nchw[:, 0], target, reduction="none",
                                                      pos_weight=pos_weight)
            if self.weight is not None:
                loss = loss * self.weight.to(loss.dtype)[target.long()]
            return loss * mask
        target = one_hot(labels_nhw, channels, ignore)
        loss = F.binary_cross_entropy_with_logits(logits_nchw, target, reduction="none",
                                                  pos_weight=None if pos_weight is None else pos_weight.view(-1, 1, 1))
        if self.weight is not None:
            loss = loss * self.weight.to(loss.dtype).view(1, -1, 1, 1)
        return (loss * mask.unsqueeze(1)).sum(1)

    def denominator(self, logits_nchw: torch.Tensor, labels_nhw: torch.Tensor, ignore: int) -> torch.Tensor | float:
        channels = logits_nchw.shape[1] if self.use_sigmoid else 1  # sigmoid: a mean over every channel
        pixels = (labels_nhw != ignore).sum() if self.avg_non_ignore else labels_nhw.numel()
        return pixels * channels
