"""Lovasz-softmax loss (Berman et al., 2018), per batch or per image."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from seg_accel.losses.utils import binary_target, load_class_weight, resolve_ignore_index
from seg_accel.registry import LOSSES


def lovasz_grad(fg_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss w.r.t. sorted errors."""
    total = fg_sorted.sum()
    intersection = total - fg_sorted.cumsum(0)
    union = total + (1 - fg_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    if fg_sorted.numel() > 1:
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
    return jaccard


def lovasz_softmax_flat(probs_pc: torch.Tensor, labels_p: torch.Tensor, classes: str | list[int],
                        class_weight: list[float] | None) -> torch.Tensor:
    """``probs_pc``: (pixels, C) probabilities of the non-ignored pixels."""
    if probs_pc.numel() == 0:
        return probs_pc.sum() * 0.0
    num_classes = probs_pc.shape[1]
    chosen = range(num_classes) if classes in ("all", "present") else classes
    losses = []
    for c in chosen:
        fg = (labels_p == c).to(probs_pc.dtype)
        if classes == "present" and fg.sum() == 0:
            continue
        errors = (fg - probs_pc[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        loss = torch.dot(errors_sorted, lovasz_grad(fg[order]))
        losses.append(loss * class_weight[c] if class_weight is not None else loss)
    return torch.stack(losses).mean()


def lovasz_hinge_flat(logits_p: torch.Tensor, labels_p: torch.Tensor) -> torch.Tensor:
    """Binary Lovasz hinge of one set of pixels: errors ``max(0, 1 - z * (2y - 1))`` sorted down,
    dotted with the Jaccard loss's Lovasz gradient (Berman et al., 2018)."""
    if logits_p.numel() == 0:
        return logits_p.sum() * 0.0
    fg = labels_p.to(logits_p.dtype)
    errors = 1.0 - logits_p * (2.0 * fg - 1.0)
    errors_sorted, order = torch.sort(errors, descending=True)
    return torch.dot(torch.relu(errors_sorted), lovasz_grad(fg[order]))


@LOSSES.register()
class LovaszLoss(nn.Module):
    """Lovasz-softmax: the convex surrogate of the per-class Jaccard (IoU) loss, averaged
    over the classes present (``classes: present``), all classes, or a list; over the
    whole batch or per image (then averaged). Ignored pixels (and pixels a sampler drops)
    are left out. ``loss_type: binary``: the Lovasz hinge on a 1-channel (sigmoid) head's
    logits and its 0/1 labels (MMSegmentation's binary mode)."""

    def __init__(
        self,
        loss_type: Literal["multi_class", "binary"] = "multi_class",
        classes: Literal["present", "all"] | list[int] = "present",
        per_image: bool = False,
        reduction: Literal["mean", "sum"] = "mean",
        class_weight: list[float] | str | None = None,
        loss_weight: float = 1.0,
        ignore_index: int | None = None,
        loss_name: str = "loss_lovasz",
    ):
        super().__init__()
        self.loss_type = loss_type
        self.classes, self.per_image, self.reduction = classes, per_image, reduction
        self.class_weight = load_class_weight(class_weight)
        self.loss_weight = float(loss_weight)
        self.ignore_index = ignore_index
        self.loss_name = loss_name

    def _flat(self, probs_chw: torch.Tensor, labels_hw: torch.Tensor, keep_hw: torch.Tensor) -> torch.Tensor:
        probs = probs_chw.flatten(1).t()[keep_hw.flatten()]
        return lovasz_softmax_flat(probs, labels_hw.flatten()[keep_hw.flatten()], self.classes, self.class_weight)

    def forward(
        self,
        logits_nchw: torch.Tensor,
        labels_nhw: torch.Tensor,
        pixel_weight_nhw: torch.Tensor | None = None,
        ignore_index: int = 255,
    ) -> torch.Tensor:
        ignore = resolve_ignore_index(self.ignore_index, ignore_index)
        keep = labels_nhw != ignore
        if pixel_weight_nhw is not None:
            keep = keep & (pixel_weight_nhw > 0)
        channels = logits_nchw.shape[1]
        if (channels == 1) != (self.loss_type == "binary"):
            raise ValueError("a 1-channel (sigmoid) head needs loss_type: binary (the Lovasz hinge), and loss_type: "
                             f"binary needs a 1-channel head; this head has {channels} channels")
        if self.loss_type == "binary":
            logits, target = logits_nchw[:, 0].float(), binary_target(labels_nhw, ignore)
            if self.per_image:
                losses = torch.stack([lovasz_hinge_flat(z[k], y[k]) for z, y, k in zip(logits, target, keep)])
                loss = losses.mean() if self.reduction == "mean" else losses.sum()
            else:
                loss = lovasz_hinge_flat(logits[keep], target[keep])
            return self.loss_weight * loss
        probs = logits_nchw.float().softmax(1)
        if self.per_image:
            losses = torch.stack([self._flat(p, y, k) for p, y, k in zip(probs, labels_nhw, keep)])
            loss = losses.mean() if self.reduction == "mean" else losses.sum()
        else:
            loss = self._flat(probs.permute(1, 0, 2, 3).flatten(1), labels_nhw.flatten(), keep.flatten())
        return self.loss_weight * loss
