"""mmcv's ``Hook`` helpers, for hooks ported from mmcv (``every_n_iters``, ``end_of_epoch``, ...).

They answer as mmcv's do at the same hook point. One difference to know when a ported hook
reads ``runner.iter`` itself: inside ``after_train_iter`` seg-accel's ``runner.iter`` counts
the iterations finished, this one included (mmcv's is the index of the iteration that just
ran, one less); in ``before_train_iter`` both are the number of iterations done. The helpers
take this into account, so ``if self.every_n_iters(runner, 50)`` fires at the same
iterations as in mmcv."""
from __future__ import annotations

from typing import Any


class MmcvHookHelpers:
    @staticmethod
    def every_n_iters(runner: Any, n: int) -> bool:
        """After the iterations 50, 100, ... (n = 50); never for n <= 0."""
        return n > 0 and runner.iter > 0 and runner.iter % n == 0

    @staticmethod
    def every_n_inner_iters(runner: Any, n: int) -> bool:
        return n > 0 and runner.inner_iter > 0 and runner.inner_iter % n == 0

    @staticmethod
    def every_n_epochs(runner: Any, n: int) -> bool:
        """In ``after_train_epoch`` of the epochs n, 2n, ... (``runner.epoch`` counts from 0 there)."""
        return n > 0 and (runner.epoch + 1) % n == 0

    @staticmethod
    def end_of_epoch(runner: Any) -> bool:
        return runner.inner_iter == runner.steps_per_epoch

    @staticmethod
    def is_last_epoch(runner: Any) -> bool:
        return runner.max_epochs is not None and runner.epoch + 1 == runner.max_epochs

    @staticmethod
    def is_last_iter(runner: Any) -> bool:
        return runner.iter == runner.max_iters
