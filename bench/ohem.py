#!/usr/bin/env python
"""OHEM sampler: our order-statistic implementation vs a straightforward full sort.

Same inputs for both (batch 2, 19 classes, 512x1024 logits, some ignored pixels),
both modes (with thresh: probability threshold; without: the K largest losses);
the kept masks are asserted equal, then each is timed (median of repeats) and the
speed-up printed. Run: python bench/ohem.py [--repeats 7] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from seg_accel.losses.ohem import OHEMPixelSampler

IGNORE = 255


def full_sort_reference(logits, labels, thresh, min_kept, pixel_losses):
    """docs/behaviour.md section 6 done the obvious way: sort everything."""
    valid = labels != IGNORE
    kept = min_kept * labels.shape[0]
    weight = torch.zeros(labels.shape)
    if thresh is not None:
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        prob = logits.softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
        sorted_prob = prob[valid].sort().values
        min_thr = sorted_prob[min(kept, sorted_prob.numel() - 1)].item() if sorted_prob.numel() else 0.0
        weight[valid & (prob < max(min_thr, thresh))] = 1.0
        return weight
    losses = pixel_losses(logits, labels)[valid]
    order = losses.sort(descending=True, stable=True).indices[:kept]
    flat = torch.zeros(losses.numel())
    flat[order] = 1.0
    weight[valid] = flat
    return weight


def ce_pixel_losses(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE)


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 19, 512, 1024, generator=gen) * 3
    labels = torch.randint(0, 19, (2, 512, 1024), generator=gen)
    labels[:, :40] = IGNORE  # a band of ignored pixels, like padding
    # a trained model: the true class far ahead almost everywhere, so few pixels fall below
    # thresh and the K-th smallest probability (the order statistic) sets the threshold
    confident = logits.clone()
    confident.scatter_add_(1, labels.clamp(max=18).unsqueeze(1), torch.full((2, 1, 512, 1024), 14.0))
    cases = [
        ("early model, thresh=0.7", logits, 0.7, 100000),
        ("trained model, thresh=0.7", confident, 0.7, 100000),
        ("early model, no thresh", logits, None, 100000),
        ("trained model, no thresh", confident, None, 100000),
    ]
    print(f"OHEM sampler, logits {tuple(logits.shape)}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| case (min_kept=100000) | full sort (ms) | ours (ms) | speed-up | kept pixels |")
    print("|---|---|---|---|---|")
    for name, logits, thresh, min_kept in cases:
        sampler = OHEMPixelSampler(thresh=thresh, min_kept=min_kept)
        ours = sampler.sample(logits, labels, IGNORE, ce_pixel_losses)
        reference = full_sort_reference(logits, labels, thresh, min_kept, ce_pixel_losses)
        assert torch.equal(ours, reference), f"{name}: masks differ"
        t_ref = timed(lambda: full_sort_reference(logits, labels, thresh, min_kept, ce_pixel_losses), args.repeats)
        t_ours = timed(lambda: sampler.sample(logits, labels, IGNORE, ce_pixel_losses), args.repeats)
        print(f"| {name} | {t_ref * 1e3:.1f} | {t_ours * 1e3:.1f} | {t_ref / t_ours:.2f}x | {int(ours.sum()):,} |")


if __name__ == "__main__":
    main()
