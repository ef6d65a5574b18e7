#!/usr/bin/env python
"""OHEM sampler: our order-statistic implementation vs a straightforward full sort.

Same inputs for both (batch 2, 19 classes, 512x1024 logits, some ignored pixels),
both modes (with thresh: probability threshold; without: the K largest losses);
the kept masks are asserted equal, then each is timed (median of repeats) and the
speed-up printed: at 1 thread, 2 threads and the machine's default (what seg-accel gives one
process: all its cores), on an idle machine and with a competing load the bench starts itself
(a busy loop per core, bench/load.py).
Run: python bench/ohem.py [--repeats 7] [--threads 1 2] [--no-load]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from seg_accel.losses.ohem import OHEMPixelSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load import competing_load, cores, describe  # noqa: E402
from ohem_reference import IGNORE, ce_pixel_losses, full_sort_reference  # noqa: E402

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
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch thread counts to run (default: 1, 2 and this machine's default)")
    parser.add_argument("--no-load", action="store_true", help="leave out the loaded-machine rows")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    thread_counts = args.threads or sorted({1, 2, default_threads})
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
    for name, case_logits, thresh, min_kept in cases:  # same pixels kept, before any timing
        ours = OHEMPixelSampler(thresh=thresh, min_kept=min_kept).sample(case_logits, labels, IGNORE, ce_pixel_losses)
        reference = full_sort_reference(case_logits, labels, thresh, min_kept, ce_pixel_losses)
        assert torch.equal(ours, reference), f"{name}: masks differ"
    print(f"OHEM sampler, logits {tuple(logits.shape)}, min_kept=100000, median of {args.repeats}; {cores()} core(s), "
          f"default torch threads {default_threads}")
    print("| case | threads | machine | full sort (ms) | ours (ms) | speed-up |")
    print("|---|---|---|---|---|---|")
    for loaded in ([False] if args.no_load else [False, True]):
        with competing_load() if loaded else _idle():
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for name, case_logits, thresh, min_kept in cases:
                    sampler = OHEMPixelSampler(thresh=thresh, min_kept=min_kept)
                    t_ref = timed(lambda: full_sort_reference(case_logits, labels, thresh, min_kept, ce_pixel_losses),
                                  args.repeats)
                    t_ours = timed(lambda: sampler.sample(case_logits, labels, IGNORE, ce_pixel_losses), args.repeats)
                    mark = " (default)" if threads == default_threads else ""
                    print(f"| {name} | {threads}{mark} | {describe(loaded)} | {t_ref * 1e3:.1f} | {t_ours * 1e3:.1f} | "
                          f"{t_ref / t_ours:.2f}x |", flush=True)


class _idle:  # noqa: N801  (a context manager that does nothing)
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


if __name__ == "__main__":
    main()
