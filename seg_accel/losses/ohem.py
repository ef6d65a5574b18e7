"""Online hard example mining: which pixels the losses see (docs/behaviour.md section 6)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from seg_accel.threads import one_thread
from seg_accel.errors import ConfigError
from seg_accel.registry import SAMPLERS

ROWS = 32  # rows per block: a C x 32 x W block of logits stays in cache (~4x faster than one pass)

PixelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def by_rows(fn: PixelFn, logits_nchw: torch.Tensor, labels_nhw: torch.Tensor) -> torch.Tensor:
    """``fn(logits, labels) -> (n, h, w)`` evaluated on blocks of rows; valid for per-pixel functions,
    and the same numbers as one call (each pixel's reduction over classes does not change)."""
    n, _, h, _ = logits_nchw.shape
    out = torch.empty(labels_nhw.shape, dtype=torch.float32, device=labels_nhw.device)
    for i in range(n):
        for r in range(0, h, ROWS):
            out[i : i + 1, r : r + ROWS] = fn(logits_nchw[i : i + 1, :, r : r + ROWS], labels_nhw[i : i + 1, r : r + ROWS])
    return out


def true_class_probability(logits_nchw: torch.Tensor, labels_nhw: torch.Tensor) -> torch.Tensor:
    """softmax(z)[y] per pixel (labels already made safe to index)."""
    return logits_nchw.float().softmax(1).gather(1, labels_nhw.unsqueeze(1)).squeeze(1)


@SAMPLERS.register()
class OHEMPixelSampler:
    """A 0/1 weight per pixel.

    With ``thresh``: ``p`` = softmax probability of the true class; with ``K = min_kept * N``
    the threshold is ``max(thresh, K-th smallest p of the valid pixels)`` (0.0 without valid
    pixels) and every valid pixel with ``p`` below it is kept: at least about ``K`` pixels,
    and every pixel the model is unsure of.
    Without ``thresh``: the ``K`` valid pixels with the largest loss (the head's losses with
    ``reduction='none'``, summed) are kept; ties go to the lower pixel index.
    The weight multiplies each loss per pixel; means are not renormalised by the kept count.

    An order statistic (``kthvalue``, O(n)) gives the same threshold as a full sort; with
    ``thresh`` it is needed only when fewer than ``K + 1`` valid pixels lie below ``thresh``.
    """

    def __init__(self, thresh: float | None = None, min_kept: int = 100000):
        if thresh is not None and not 0 < thresh <= 1:
            raise ConfigError(f"must be in (0, 1], got {thresh}", key="thresh")
        if min_kept < 1:
            raise ConfigError(f"must be >= 1, got {min_kept}", key="min_kept")
        self.thresh, self.min_kept = thresh, min_kept

    @torch.no_grad()
    def sample(self, logits_nchw: torch.Tensor, labels_nhw: torch.Tensor, ignore_index: int,
               pixel_losses: PixelFn | None = None) -> torch.Tensor:
        """``pixel_losses(logits, labels) -> (N, H, W)`` is needed without ``thresh``. On CPU it runs
        one torch thread (``one_thread``): its many cache-sized steps stay fast on a busy machine."""
        if logits_nchw.device.type == "cpu":
            with one_thread():
                return self._sample(logits_nchw, labels_nhw, ignore_index, pixel_losses)
        return self._sample(logits_nchw, labels_nhw, ignore_index, pixel_losses)

    def _sample(self, logits_nchw: torch.Tensor, labels_nhw: torch.Tensor, ignore_index: int,
                pixel_losses: PixelFn | None) -> torch.Tensor:
        valid = labels_nhw != ignore_index
        n_valid = int(valid.sum())
        kept = self.min_kept * labels_nhw.shape[0]
        if n_valid == 0:
            return torch.zeros(labels_nhw.shape, dtype=torch.float32, device=labels_nhw.device)
        if self.thresh is not None:
            safe = torch.where(valid, labels_nhw, torch.zeros_like(labels_nhw))
            prob = by_rows(true_class_probability, logits_nchw, safe)
            prob = torch.where(valid, prob, torch.full_like(prob, 2.0)).view(-1)  # ignored: above any threshold
            k = min(kept, n_valid - 1)  # 0-based rank among the valid pixels = rank in the whole tensor
            threshold = self.thresh
            if int((prob < self.thresh).sum()) <= k:  # else the k-th smallest is below thresh: max() is thresh
                threshold = max(torch.kthvalue(prob, k + 1).values.item(), self.thresh)
            return (prob < threshold).to(torch.float32).view(labels_nhw.shape)
        losses = by_rows(pixel_losses, logits_nchw, labels_nhw)
        losses = torch.where(valid, losses, torch.full_like(losses, -torch.inf)).view(-1)
        take = min(kept, n_valid)
        # the take-th largest valid loss; everything above it, then the lowest-index ties
        cutoff = torch.kthvalue(losses, losses.numel() - take + 1).values
        chosen = losses > cutoff
        ties = torch.nonzero(losses == cutoff).squeeze(1)[: take - int(chosen.sum())]
        chosen[ties] = True
        return chosen.to(torch.float32).view(labels_nhw.shape)
