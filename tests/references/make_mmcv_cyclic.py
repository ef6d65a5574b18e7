"""Regenerates tests/references/mmcv_cyclic.json: mmcv 1.7.2's cyclic lr and momentum schedules,
step by step, for the configurations tests/unit/test_optim.py compares seg-accel's against.

Run where mmcv 1.7.2 is installed (``pip install setuptools==69.5.1 wheel``, then
``MMCV_WITH_OPS=0 pip install --no-build-isolation mmcv==1.7.2``):

    python tests/references/make_mmcv_cyclic.py

mmcv.runner imports torchvision at import time for its checkpoint loaders, which the schedules
do not use: a stand-in module is put in its place when torchvision is not installed.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

CASES = [
    {"max_iters": 100, "cyclic_times": 2, "step_ratio_up": 0.0, "gamma": 0.5, "target_ratio": [10, 1e-4]},
    {"max_iters": 90, "cyclic_times": 3, "step_ratio_up": 0.0, "gamma": 0.8, "target_ratio": [5, 0.01],
     "anneal_strategy": "linear"},
    {"max_iters": 100, "cyclic_times": 2, "step_ratio_up": 0.4, "gamma": 0.5, "target_ratio": [10, 1e-4]},
    {"max_iters": 60, "cyclic_times": 3, "step_ratio_up": 0.25, "gamma": 1.0, "target_ratio": [4, 0.1]},
]
MOMENTUM_CASES = [
    {"max_iters": 100, "cyclic_times": 2, "step_ratio_up": 0.0, "gamma": 0.5, "target_ratio": [0.85 / 0.95, 1.0]},
    {"max_iters": 100, "cyclic_times": 2, "step_ratio_up": 0.4, "gamma": 0.5, "target_ratio": [0.85 / 0.95, 1.0]},
]
BASE_LR, BASE_MOMENTUM = 0.01, 0.95


def main() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("torchvision")
        stand_in.__version__ = "0.0"
        sys.modules["torchvision"] = stand_in
    import mmcv
    from mmcv.runner.hooks.lr_updater import CyclicLrUpdaterHook
    from mmcv.runner.hooks.momentum_updater import CyclicMomentumUpdaterHook

    import torch

    class Runner:  # what the hooks read in before_run and get_lr
        def __init__(self, max_iters: int):
            self.max_iters, self.iter = max_iters, 0
            self.optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE_LR, momentum=BASE_MOMENTUM)

    def run(hook, max_iters, get):
        runner = Runner(max_iters)
        hook.before_run(runner)
        values = []
        for i in range(max_iters):
            runner.iter = i
            values.append(get(runner))
        return values

    out = {"mmcv": mmcv.__version__, "base_lr": BASE_LR, "base_momentum": BASE_MOMENTUM, "lr": [], "momentum": []}
    for case in CASES:
        options = {k: tuple(v) if k == "target_ratio" else v for k, v in case.items() if k != "max_iters"}
        hook = CyclicLrUpdaterHook(by_epoch=False, **options)
        out["lr"].append({**case, "values": run(hook, case["max_iters"], lambda r: hook.get_lr(r, BASE_LR))})
    for case in MOMENTUM_CASES:
        options = {k: tuple(v) if k == "target_ratio" else v for k, v in case.items() if k != "max_iters"}
        hook = CyclicMomentumUpdaterHook(by_epoch=False, **options)
        out["momentum"].append({**case, "values": run(hook, case["max_iters"],
                                                      lambda r: hook.get_momentum(r, BASE_MOMENTUM))})
    target = Path(__file__).with_name("mmcv_cyclic.json")
    target.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
