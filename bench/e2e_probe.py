"""A hook for bench/e2e.py (loaded with custom_imports): when each iteration starts, when
training ends, the final evaluation's time and the peak memory, written to ``out``."""
from __future__ import annotations

import json
import resource
import time

from seg_accel.engine.hooks import Hook
from seg_accel.registry import HOOKS


@HOOKS.register()
class E2EProbe(Hook):
    priority = "HIGHEST"

    def __init__(self, out: str):
        self.out, self.starts = out, []

    def before_train_iter(self, runner) -> None:
        self.starts.append(time.time())

    def after_run(self, runner) -> None:  # HIGHEST: before the final evaluation and export
        self.starts.append(time.time())

    def state_dict(self) -> dict:
        return {}

    def write(self, runner) -> None:
        import numpy as np
        import yaml

        if not runner.accelerator.is_main_process:
            return
        config = yaml.safe_load((runner.work_dir / "config.yaml").read_text())  # the run's resolved config
        results = json.loads((runner.work_dir / "eval_results.json").read_text())
        times = np.diff(self.starts)
        with open(self.out, "w") as f:
            json.dump({"loop": "seg-accel", "processes": runner.accelerator.num_processes, "iters": runner.iter,
                       "batch_per_process": config["data"]["samples_per_gpu"], "first_iteration": self.starts[0],
                       "train_seconds": self.starts[-1] - self.starts[0],
                       "iteration_seconds_median": float(np.median(times[5:])),
                       "eval_seconds": results["seconds"], "miou": results["metrics"]["mIoU"],
                       "peak_memory_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}, f)


@HOOKS.register()
class E2EProbeWriter(Hook):
    """Writes the probe's record once the final evaluation is done."""

    priority = "LOWEST"

    def after_run(self, runner) -> None:
        next(h for h in runner.hooks if isinstance(h, E2EProbe)).write(runner)
