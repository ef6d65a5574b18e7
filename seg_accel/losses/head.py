"""Turn a head's logits into the named, summed losses of SPEC section 5."""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seg_accel.errors import ConfigError
from seg_accel.registry import LOSSES

logger = logging.getLogger("seg_accel")


def check_loss_class_weights(loss_cfgs: list[dict], num_classes: int, key: str, many: bool) -> None:
    """A ``class_weight`` list must have one weight per class."""
    for i, cfg in enumerate(loss_cfgs):
        weights = cfg.get("class_weight")
        if isinstance(weights, (list, tuple)) and len(weights) != num_classes:
            item = f"{key}.{i}" if many else key
            raise ConfigError(
                f"class_weight has {len(weights)} values but there are {num_classes} classes",
                key=f"{item}.class_weight",
            )


def resize_logits(logits_nchw: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    if tuple(logits_nchw.shape[-2:]) == tuple(size):
        return logits_nchw
    return F.interpolate(logits_nchw, size=size, mode="bilinear", align_corners=align_corners)


@torch.no_grad()
def pixel_accuracy(logits_nchw: torch.Tensor, labels_nhw: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Accuracy in % over non-ignored pixels (0 when there are none)."""
    valid = labels_nhw != ignore_index
    correct = (logits_nchw.argmax(1) == labels_nhw) & valid
    return correct.sum().float() * 100.0 / valid.sum().clamp_min(1).float()


class HeadLosses(nn.Module):
    """The losses of one head (``decode`` or ``aux``) from its ``loss_decode`` config.

    Returns the total to backpropagate (the sum of losses named ``loss_*``) and a
    dict of detached values to log, keyed ``<prefix>.<loss_name>`` (equal names
    add up) plus ``<prefix>.acc_seg``.
    """

    def __init__(
        self,
        loss_cfgs: list[dict],
        num_classes: int,
        prefix: str = "decode",
        ignore_index: int = 255,
        align_corners: bool = False,
        key: str = "model.decode_head.loss_decode",
    ):
        super().__init__()
        many = len(loss_cfgs) > 1
        check_loss_class_weights(loss_cfgs, num_classes, key, many)
        self.losses = nn.ModuleList(
            LOSSES.build(cfg, f"{key}.{i}" if many else key) for i, cfg in enumerate(loss_cfgs)
        )
        self.prefix = prefix
        self.ignore_index = ignore_index
        self.align_corners = align_corners

    def logged_only(self) -> list[str]:
        """Names of losses that are computed and logged but not trained on."""
        return [f"{self.prefix}.{m.loss_name}" for m in self.losses if not m.loss_name.startswith("loss_")]

    def forward(self, logits_nchw: torch.Tensor, labels_nhw: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = resize_logits(logits_nchw, labels_nhw.shape[-2:], self.align_corners).float()
        named: dict[str, torch.Tensor] = {}
        for loss_fn in self.losses:
            name = f"{self.prefix}.{loss_fn.loss_name}"
            value = loss_fn(logits, labels_nhw, ignore_index=self.ignore_index)
            named[name] = named[name] + value if name in named else value
        total = sum(v for k, v in named.items() if k.split(".", 1)[1].startswith("loss_"))
        if not torch.is_tensor(total):  # every loss is logged-only: nothing to train on
            total = logits.sum() * 0.0
        logs = {k: v.detach() for k, v in named.items()}
        logs[f"{self.prefix}.acc_seg"] = pixel_accuracy(logits, labels_nhw, self.ignore_index)
        return total, logs
