"""The OHEM pixel selection of docs/behaviour.md section 6 done the obvious way (sort every valid
pixel): the reference that tests/unit/test_ohem.py checks the sampler against and that
bench/ohem.py times it against."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE = 255


def ce_pixel_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE)


def full_sort_reference(logits: torch.Tensor, labels: torch.Tensor, thresh: float | None, min_kept: int,
                        pixel_losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = ce_pixel_losses
                        ) -> torch.Tensor:
    """The 0/1 weight of every pixel: with ``thresh``, the pixels whose true-class probability is
    below ``max(thresh, the (min_kept * N)-th lowest)``; without, the ``min_kept * N`` largest
    ``pixel_losses`` (ties: the lower index first). Ignored pixels get 0."""
    valid = labels != IGNORE
    kept = min_kept * labels.shape[0]
    weight = torch.zeros(labels.shape)
    if thresh is not None:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        prob = logits.softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
        ordered = prob[valid].sort().values
        min_thr = ordered[min(kept, ordered.numel() - 1)].item() if ordered.numel() else 0.0
        weight[valid & (prob < max(min_thr, thresh))] = 1.0
        return weight
    losses = pixel_losses(logits, labels)[valid]
    chosen = losses.sort(descending=True, stable=True).indices[:kept]
    flat = torch.zeros(losses.numel())
    flat[chosen] = 1.0
    weight[valid] = flat
    return weight
