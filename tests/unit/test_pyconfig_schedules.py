"""MMSegmentation 1.x's ``param_scheduler`` chains give MMEngine's lr and momentum at every
iteration, bit for bit: each chain runs through mmengine 0.10's own schedulers on a real
optimizer and through seg-accel's ``chain`` policy (the one a ``.py`` config's
``param_scheduler`` becomes), and the values are compared with ``==``."""
from __future__ import annotations

import copy

import pytest
import torch

from seg_accel.errors import ConfigError
from seg_accel.optim.chains import LrChainPolicy, MomentumChainPolicy
from seg_accel.optim.schedules import ParamScheduler

LENGTH = 300

CHAINS = {
    "poly": [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, end=LENGTH, by_epoch=False)],
    "segformer warmup + poly": [
        dict(type="LinearLR", start_factor=1e-6, by_epoch=False, begin=0, end=30),
        dict(type="PolyLR", eta_min=0.0, power=1.0, begin=30, end=LENGTH, by_epoch=False)],
    "linear default factor": [dict(type="LinearLR", by_epoch=False, begin=0, end=50)],
    "linear down": [dict(type="LinearLR", start_factor=1.0, end_factor=0.05, by_epoch=False, begin=10, end=200)],
    "constant": [dict(type="ConstantLR", factor=0.5, by_epoch=False, begin=0, end=40)],
    "constant + poly": [dict(type="ConstantLR", factor=0.1, by_epoch=False, begin=0, end=25),
                        dict(type="PolyLR", power=2.0, by_epoch=False, begin=0, end=LENGTH)],
    "exponential": [dict(type="ExponentialLR", gamma=0.99, by_epoch=False, begin=5, end=LENGTH)],
    "cosine": [dict(type="CosineAnnealingLR", T_max=LENGTH, eta_min=1e-6, by_epoch=False, begin=0, end=LENGTH)],
    "cosine ratio, restarts": [dict(type="CosineAnnealingLR", T_max=40, eta_min_ratio=0.01, by_epoch=False, begin=0,
                                    end=LENGTH)],
    "warmup + cosine": [dict(type="LinearLR", start_factor=0.1, by_epoch=False, begin=0, end=20),
                        dict(type="CosineAnnealingLR", T_max=280, eta_min=0.0, by_epoch=False, begin=20, end=LENGTH)],
    "multistep": [dict(type="MultiStepLR", milestones=[100, 200, 200], gamma=0.5, by_epoch=False, begin=0,
                       end=LENGTH)],
    "step": [dict(type="StepLR", step_size=60, gamma=0.3, by_epoch=False, begin=0, end=LENGTH)],
    "warmup + step": [dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=50),
                      dict(type="StepLR", step_size=70, gamma=0.5, by_epoch=False, begin=50, end=LENGTH)],
    "onecycle": [dict(type="OneCycleLR", eta_max=0.05, total_steps=LENGTH, by_epoch=False, begin=0, end=LENGTH)],
    "onecycle linear three phase": [dict(type="OneCycleLR", eta_max=0.02, pct_start=0.25, anneal_strategy="linear",
                                         three_phase=True, by_epoch=False, begin=0, end=LENGTH)],
    "onecycle late + poly": [dict(type="OneCycleLR", eta_max=0.05, by_epoch=False, begin=50, end=LENGTH),
                             dict(type="PolyLR", eta_min=1e-5, power=1.0, by_epoch=False, begin=0, end=LENGTH)],
    "epochs: warmup + multistep": [dict(type="LinearLR", start_factor=0.01, begin=0, end=3),
                                   dict(type="MultiStepLR", milestones=[8, 11], gamma=0.1, begin=0, end=12)],
    "no end (the run's length)": [dict(type="PolyLR", eta_min=1e-4, power=0.9, begin=0, by_epoch=False)],
}
MOMENTUM_CHAINS = {
    "cosine momentum": [dict(type="CosineAnnealingMomentum", T_max=LENGTH, eta_min=0.85, by_epoch=False, begin=0,
                             end=LENGTH)],
    "linear + step momentum": [dict(type="LinearMomentum", start_factor=0.9, by_epoch=False, begin=0, end=30),
                               dict(type="StepMomentum", step_size=50, gamma=0.95, by_epoch=False, begin=30,
                                    end=LENGTH)],
    "poly + multistep momentum": [dict(type="PolyMomentum", eta_min=0.5, power=1.0, by_epoch=False, begin=0,
                                       end=200),
                                  dict(type="MultiStepMomentum", milestones=[250], gamma=0.5, by_epoch=False, begin=0,
                                       end=LENGTH)],
    "constant + exponential momentum": [dict(type="ConstantMomentum", factor=0.5, by_epoch=False, begin=0, end=20),
                                        dict(type="ExponentialMomentum", gamma=0.999, by_epoch=False, begin=20,
                                             end=LENGTH)],
}


def _optimizer(kind: str = "SGD") -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    if kind == "AdamW":
        return torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr": 6e-4}], lr=6e-5,
                                 betas=(0.9, 0.999))
    return torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.1}], lr=0.01, momentum=0.9)


def _mmengine_values(chain: list[dict], target: str, kind: str, steps: int) -> list[list[float]]:
    """The value of each group at each iteration under mmengine's own schedulers (stepped as
    its ParamSchedulerHook does: the optimizer step, then every scheduler in list order)."""
    scheduler = pytest.importorskip("mmengine.optim.scheduler", reason="mmengine 0.10 (pip install 'mmengine==0.10.*')")
    optimizer = _optimizer(kind)
    built = []
    for spec in copy.deepcopy(chain):
        spec.setdefault("end", LENGTH if not spec.get("by_epoch", True) else 12)
        built.append(getattr(scheduler, spec.pop("type"))(optimizer, **spec))
    read = (lambda g: g["lr"]) if target == "lr" else (lambda g: g["betas"][0] if "betas" in g else g["momentum"])
    values = []
    for _ in range(steps):
        values.append([read(g) for g in optimizer.param_groups])
        optimizer.step()
        for s in built:
            s.step()
    return values


def _ours(chain: list[dict], target: str, kind: str, steps: int) -> list[list[float]]:
    by_epoch = chain[0].get("by_epoch", True)
    policy_cls = LrChainPolicy if target == "lr" else MomentumChainPolicy
    length = 12 if by_epoch else LENGTH
    policy = policy_cls(length, copy.deepcopy(chain), by_epoch=by_epoch)
    optimizer = _optimizer(kind)
    scheduler = ParamScheduler(optimizer, policy, target)
    values = []
    for i in range(steps):
        scheduler.apply(i)
        values.append(scheduler.get_last_values())
    return values


@pytest.mark.parametrize("name", list(CHAINS))
def test_lr_chain_equals_mmengine_bit_for_bit(name):
    chain = CHAINS[name]
    kind = "AdamW" if "segformer" in name else "SGD"
    steps = 12 if chain[0].get("by_epoch", True) else LENGTH
    expected = _mmengine_values(chain, "lr", kind, steps)
    got = _ours(chain, "lr", kind, steps)
    assert got == expected  # exact float equality, every group, every step
    assert len({tuple(v) for v in got}) > 1  # the schedule moves


@pytest.mark.parametrize("name", list(MOMENTUM_CHAINS))
@pytest.mark.parametrize("kind", ["SGD", "AdamW"])
def test_momentum_chain_equals_mmengine_bit_for_bit(name, kind):
    chain = MOMENTUM_CHAINS[name]
    expected = _mmengine_values(chain, "momentum", kind, LENGTH)
    got = _ours(chain, "momentum", kind, LENGTH)
    assert got == expected
    assert len({tuple(v) for v in got}) > 2


def test_chain_values_after_a_resume_are_the_same():
    """A resumed run asks for step i without the steps before it (a fresh policy)."""
    chain = CHAINS["segformer warmup + poly"]
    full = _ours(chain, "lr", "AdamW", LENGTH)
    policy = LrChainPolicy(LENGTH, copy.deepcopy(chain))
    optimizer = _optimizer("AdamW")
    scheduler = ParamScheduler(optimizer, policy, "lr")
    scheduler.load_state_dict({"last_iter": 177})
    assert scheduler.get_last_values() == full[177]


@pytest.mark.parametrize("chain, message", [
    ([dict(type="CosineRestartLR", periods=[10], by_epoch=False)], "unknown lr scheduler"),
    ([dict(type="PolyLR", begin=10, end=5, by_epoch=False)], "end should be larger than begin"),
    ([dict(type="PolyLR", by_epoch=False), dict(type="StepLR", step_size=3)], "all schedulers of one chain"),
    ([dict(type="LinearLR", start_factor=2.0, by_epoch=False)], "between 0 and 1"),
    ([dict(type="StepLR", by_epoch=False)], "step_size"),
    ([dict(type="PolyLR", powr=1.0, by_epoch=False)], "no option"),
])
def test_bad_chains_are_config_errors(chain, message):
    with pytest.raises(ConfigError, match=message):
        LrChainPolicy(LENGTH, chain, by_epoch=False)
