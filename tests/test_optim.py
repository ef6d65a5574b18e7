"""Optimizer building and the poly schedule against the SPEC formula."""
from __future__ import annotations

import pytest
import torch

from seg_accel.errors import ConfigError
from seg_accel.optim import build_lr_scheduler, build_optimizer


def two_group_optimizer():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 1.0}], lr=0.1)


@pytest.mark.parametrize("power, min_lr", [(1.0, 0.0), (0.9, 1e-4), (2.0, 0.01)])
def test_poly_every_group_follows_the_formula_from_its_own_lr(power, min_lr):
    opt = two_group_optimizer()
    T = 50
    sched = build_lr_scheduler({"policy": "poly", "power": power, "min_lr": min_lr, "by_epoch": False}, opt, T)
    for i in range(T + 3):
        for group, b in zip(opt.param_groups, (0.1, 1.0)):
            expected = (b - min_lr) * (1 - min(i, T) / T) ** power + min_lr
            assert group["lr"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        opt.step()
        sched.step()


def test_scheduler_state_round_trip():
    opt = two_group_optimizer()
    sched = build_lr_scheduler({"policy": "poly"}, opt, 10)
    for _ in range(4):
        sched.step()
    opt2 = two_group_optimizer()
    sched2 = build_lr_scheduler({"policy": "poly"}, opt2, 10)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr() == pytest.approx([0.1 * 0.6, 0.6])


def test_no_lr_config_keeps_the_lr():
    opt = two_group_optimizer()
    sched = build_lr_scheduler(None, opt, 10)
    sched.step()
    assert sched.get_last_lr() == [0.1, 1.0]


def test_bad_policy_values_name_the_key():
    with pytest.raises(ConfigError) as info:
        build_lr_scheduler({"policy": "poly", "power": -1.0}, two_group_optimizer(), 10)
    assert info.value.key == "lr_config.power"
    with pytest.raises(ConfigError) as info:
        build_lr_scheduler({"policy": "polly"}, two_group_optimizer(), 10)
    assert info.value.key == "lr_config.policy" and "poly" in str(info.value)


def test_frozen_parameters_are_left_out():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    opt = build_optimizer(model, {"type": "AdamW", "lr": 0.01, "weight_decay": 0.05})
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == 2 and all(p.requires_grad for p in params)
    assert opt.param_groups[0]["weight_decay"] == 0.05
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, {"type": "SGD", "lr": 0.1})
