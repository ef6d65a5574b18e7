"""docs/behaviour.md sections 2-3: optimizers, parameter groups, lr and momentum schedules.

The reference formulas below are written from the rules of docs/behaviour.md, independently of
``seg_accel.optim.schedules``.
"""
from __future__ import annotations

import inspect
import math
import textwrap

import pytest
import torch
from torch import nn

from seg_accel.config import load_config
from seg_accel.validate import validate_train_config
from seg_accel.errors import ConfigError
from seg_accel.optim import (
    build_lr_scheduler,
    build_momentum_scheduler,
    build_optimizer,
)
from tests.conftest import tiny_config, write_yaml

T = 200
BASES = (0.01, 0.1)  # two groups: every group follows the formula from its own initial lr


def two_groups(optimizer_cls=torch.optim.SGD, **kwargs):
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    return optimizer_cls([{"params": [a], "lr": BASES[0]}, {"params": [b], "lr": BASES[1]}], lr=BASES[0], **kwargs)


# ----------------------------------------------------------------------------- formulas of docs/behaviour.md
def ref_poly(b, i, power=1.0, min_lr=0.0):
    return (b - min_lr) * (1 - i / T) ** power + min_lr


def ref_step(b, i, step, gamma=0.1, min_lr=None):
    k = i // step if isinstance(step, int) else len([m for m in step if m <= i])
    lr = b * gamma**k
    return lr if min_lr is None else max(lr, min_lr)


def ref_cosine(b, i, min_lr=None, min_lr_ratio=None):
    t = min_lr if min_lr is not None else b * min_lr_ratio
    return t + 0.5 * (b - t) * (1 + math.cos(math.pi * i / T))


def ref_cyclic(b, i, target_ratio=(10, 1e-4), cyclic_times=1, step_ratio_up=0.4, anneal_strategy="cos", gamma=1.0):
    if isinstance(target_ratio, float):
        target_ratio = (target_ratio, target_ratio / 1e5)
    r0, r1 = target_ratio
    P = T // cyclic_times
    U = int(step_ratio_up * P)
    j = i % P
    s = gamma ** (i // P)

    def anneal(a, e, f):
        return e + 0.5 * (a - e) * (1 + math.cos(math.pi * f)) if anneal_strategy == "cos" else a + (e - a) * f

    if j < U:
        return anneal(b, b * (1 - s + s * r0), j / U)
    return anneal(b * (1 - s + s * r0), b * r1, (j - U) / (P - U))


def ref_warmup(r, i, kind, W, ratio):
    if kind is None or i >= W:
        return r
    if kind == "linear":
        return r * (1 - (1 - i / W) * (1 - ratio))
    if kind == "constant":
        return r * ratio
    return r * ratio ** (1 - i / W)


POLICIES = {
    "poly": ({"policy": "poly", "power": 0.9, "min_lr": 1e-4}, lambda b, i: ref_poly(b, i, 0.9, 1e-4)),
    "step_int": ({"policy": "step", "step": 50, "gamma": 0.5}, lambda b, i: ref_step(b, i, 50, 0.5)),
    "step_list": ({"policy": "step", "step": [60, 120, 180], "min_lr": 2e-4},
                  lambda b, i: ref_step(b, i, [60, 120, 180], 0.1, 2e-4)),
    "cosine_min_lr": ({"policy": "CosineAnnealing", "min_lr": 1e-4}, lambda b, i: ref_cosine(b, i, min_lr=1e-4)),
    "cosine_min_lr_ratio": ({"policy": "CosineAnnealing", "min_lr_ratio": 0.01},
                            lambda b, i: ref_cosine(b, i, min_lr_ratio=0.01)),
    "cyclic_cos": ({"policy": "cyclic", "target_ratio": [10, 1e-4]}, lambda b, i: ref_cyclic(b, i)),
    "cyclic_linear": ({"policy": "cyclic", "target_ratio": 5.0, "anneal_strategy": "linear"},
                      lambda b, i: ref_cyclic(b, i, 5.0, anneal_strategy="linear")),
    "cyclic_cos_gamma_times2": (
        {"policy": "cyclic", "cyclic_times": 2, "gamma": 0.5, "step_ratio_up": 0.3},
        lambda b, i: ref_cyclic(b, i, cyclic_times=2, gamma=0.5, step_ratio_up=0.3)),
    "cyclic_linear_gamma_times2": (
        {"policy": "cyclic", "cyclic_times": 2, "gamma": 0.7, "anneal_strategy": "linear"},
        lambda b, i: ref_cyclic(b, i, cyclic_times=2, gamma=0.7, anneal_strategy="linear")),
    "fixed": ({"policy": "fixed"}, lambda b, i: b),
}
WARMUPS = {
    "none": ({}, None, 0, 0.1),
    "linear": ({"warmup": "linear", "warmup_iters": 30, "warmup_ratio": 1e-3}, "linear", 30, 1e-3),
    "constant": ({"warmup": "constant", "warmup_iters": 25, "warmup_ratio": 0.25}, "constant", 25, 0.25),
    "exp": ({"warmup": "exp", "warmup_iters": 40}, "exp", 40, 0.1),
}


def assert_close(actual, expected):
    assert math.isclose(actual, expected, rel_tol=1e-9, abs_tol=1e-15), (actual, expected)


@pytest.mark.parametrize("warmup", sorted(WARMUPS))
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_group_follows_the_spec_formula_at_every_iteration(policy, warmup):
    cfg, formula = POLICIES[policy]
    warmup_cfg, kind, W, ratio = WARMUPS[warmup]
    opt = two_groups()
    sched = build_lr_scheduler({**cfg, **warmup_cfg, "by_epoch": False}, opt, T)
    for i in range(T):
        for group, b in zip(opt.param_groups, BASES):
            assert_close(group["lr"], ref_warmup(formula(b, i), i, kind, W, ratio))
        opt.step()
        sched.step()


@pytest.mark.parametrize("optimizer_cls, kwargs, key", [
    (torch.optim.SGD, {"momentum": 0.95}, "momentum"),
    (torch.optim.AdamW, {"betas": (0.95, 0.999)}, "betas"),
])
def test_cyclic_momentum_on_sgd_and_adamw(optimizer_cls, kwargs, key):
    opt = two_groups(optimizer_cls, **kwargs)
    opt.param_groups[1][key] = 0.9 if key == "momentum" else (0.9, 0.98)  # groups differ here too
    lr_sched = build_lr_scheduler({"policy": "cyclic", "target_ratio": [10, 1e-4], "cyclic_times": 2}, opt, T)
    m_sched = build_momentum_scheduler({"policy": "cyclic", "target_ratio": [0.85 / 0.95, 1], "cyclic_times": 2},
                                       opt, T)
    for i in range(T):
        for group, b, lr_b in zip(opt.param_groups, (0.95, 0.9), BASES):
            momentum = group["momentum"] if key == "momentum" else group["betas"][0]
            assert_close(momentum, ref_cyclic(b, i, (0.85 / 0.95, 1), cyclic_times=2))
            assert_close(group["lr"], ref_cyclic(lr_b, i, cyclic_times=2))
        if key == "betas":
            assert [g["betas"][1] for g in opt.param_groups] == [0.999, 0.98]
        opt.step()
        for sched in (lr_sched, m_sched):
            sched.step()


def test_momentum_default_target_ratio_and_state_round_trip():
    opt = two_groups(torch.optim.SGD, momentum=0.95)
    sched = build_momentum_scheduler({"policy": "cyclic"}, opt, T)
    for _ in range(90):
        sched.step()
    assert_close(opt.param_groups[0]["momentum"], ref_cyclic(0.95, 90, (0.85 / 0.95, 1)))
    other = two_groups(torch.optim.SGD, momentum=0.95)
    resumed = build_momentum_scheduler({"policy": "cyclic"}, other, T)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.get_last_values() == sched.get_last_values()


def test_policy_names_as_mmcv_spells_them():
    opt = two_groups()
    sched = build_lr_scheduler({"policy": "Poly", "power": 1.0}, opt, T)  # mmcv accepts 'poly' and 'Poly'
    sched.step()
    assert_close(opt.param_groups[0]["lr"], ref_poly(BASES[0], 1))


# ----------------------------------------------------------------------------- bad input
def run_train(tmp_path, capsys, cfg):
    from seg_accel.cli import train_cli

    rc = train_cli([str(write_yaml(tmp_path / "exp.yaml", cfg))])
    return rc, capsys.readouterr().err.strip()


@pytest.mark.parametrize("change, key, words", [
    ({"optimizer": {"type": "AdamWW", "lr": 0.1}}, "optimizer.type", "AdamW"),
    ({"lr_config": {"policy": "polynomial"}}, "lr_config.policy", "poly"),
    ({"optimizer": {"type": "SGD", "lr": 0.1, "paramwise_cfg": {"custom_keys": {"head": {"decay_mult": 0.0}}}}},
     "optimizer.paramwise_cfg.custom_keys.head.decay_mult", "weight_decay"),
    ({"optimizer": {"type": "SGD", "lr": 0.1, "paramwise_cfg": {"norm_decay_mult": 0.0}}},
     "optimizer.paramwise_cfg.norm_decay_mult", "weight_decay"),
    ({"lr_config": {"policy": "cyclic", "by_epoch": True}}, "lr_config.by_epoch", "cyclic"),
    ({"momentum_config": {"policy": "cyclic", "by_epoch": True}}, "momentum_config.by_epoch", "cyclic"),
    ({"lr_config": {"policy": "CosineAnnealing", "min_lr": 0.0, "min_lr_ratio": 0.1}}, "lr_config.min_lr_ratio",
     "exactly one"),
    ({"lr_config": {"policy": "poly", "warmup": "linear", "warmup_iters": 5, "warmup_ratio": 0.0}},
     "lr_config.warmup_ratio", "(0, 1]"),
    ({"lr_config": {"policy": "poly", "warmup": "linear", "warmup_iters": 5, "warmup_ratio": 1.5}},
     "lr_config.warmup_ratio", "(0, 1]"),
    ({"lr_config": {"policy": "poly", "warmup": "linear"}}, "lr_config.warmup_iters", "warmup_iters"),
    ({"lr_config": {"policy": "poly", "warmup": "cosine", "warmup_iters": 3}}, "lr_config.warmup", "linear"),
    ({"lr_config": {"policy": "step", "step": [30, 10]}}, "lr_config.step", "increasing"),
    ({"optimizer": {"type": "Adagrad", "lr": 0.1}, "momentum_config": {"policy": "cyclic"}}, "momentum_config",
     "momentum"),
    ({"optimizer": {"type": "SGD", "lr": 0.1, "paramwise_cfg": {"custom_key": {}}}},
     "optimizer.paramwise_cfg.custom_key", "custom_keys"),
    ({"optimizer": {"type": "SGD", "lr": 0.1, "constructor": "LayerDecayOptimizerConstructor",
                    "paramwise_cfg": {"num_layers": 12, "layer_decay_rate": 0.9}}},
     "optimizer.constructor", "SegformerForSemanticSegmentation"),
])
def test_bad_input_names_the_key(tmp_path, capsys, change, key, words):
    rc, err = run_train(tmp_path, capsys, tiny_config(**change))
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f": {key}: " in err and words in err and "exp.yaml" in err, err


# ----------------------------------------------------------------------------- optimizers
TORCH_OPTIMIZERS = sorted(
    n for n in dir(torch.optim)
    if inspect.isclass(getattr(torch.optim, n)) and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
    and n != "Optimizer"
)


@pytest.mark.parametrize("name", TORCH_OPTIMIZERS)
def test_every_torch_optimizer_builds_from_yaml(tmp_path, name):
    path = write_yaml(tmp_path / "exp.yaml", textwrap.dedent(f"""
        _base_: base.yaml
        optimizer: {{type: {name}, lr: 0.01}}
    """))
    write_yaml(tmp_path / "base.yaml", {k: v for k, v in tiny_config().items() if k != "optimizer"})
    cfg = validate_train_config(load_config(path))
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False))  # 2-D only: Muon too
    opt = build_optimizer(model, cfg.optimizer)
    assert type(opt).__name__ == name and opt.param_groups[0]["lr"] == 0.01


def test_custom_optimizer_and_constructor_from_custom_imports(tmp_path, monkeypatch, fresh_accelerate):
    (tmp_path / "my_optim.py").write_text(textwrap.dedent("""
        import torch
        from torch.optim import Optimizer

        from seg_accel.registry import OPTIMIZER_CONSTRUCTORS, OPTIMIZERS


        @OPTIMIZERS.register_module()
        class MyOptimizer(Optimizer):
            def __init__(self, params, a, b, c):
                super().__init__(params, dict(a=a, b=b, c=c))

            @torch.no_grad()
            def step(self, closure=None):
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.add_(p.grad, alpha=-group["a"] * group["b"] + group["c"])


        @OPTIMIZER_CONSTRUCTORS.register()
        class HeadFirstConstructor:
            def __init__(self, optimizer_cfg, paramwise_cfg=None):
                self.optimizer_cfg, self.mult = optimizer_cfg, (paramwise_cfg or {}).get("head_mult", 1.0)

            def __call__(self, model):
                head = [p for n, p in model.named_parameters() if n.startswith("decode_head")]
                rest = [p for n, p in model.named_parameters() if not n.startswith("decode_head")]
                cfg = dict(self.optimizer_cfg)
                opt_cls = getattr(torch.optim, cfg.pop("type"))
                return opt_cls([{"params": head, "lr": cfg["lr"] * self.mult}, {"params": rest}], **cfg)
    """))
    monkeypatch.chdir(tmp_path)
    from seg_accel.engine import Trainer

    cfg_dict = tiny_config(custom_imports={"imports": ["my_optim"]}, lr_config=None,
                           optimizer={"type": "MyOptimizer", "a": 0.01, "b": 2.0, "c": 0.0})
    cfg_dict["runner"]["max_iters"] = 2
    raw = load_config(write_yaml(tmp_path / "a.yaml", cfg_dict))
    raw.dict["work_dir"] = str(tmp_path / "work_a")
    trainer = Trainer(validate_train_config(raw), raw, tmp_path / "work_a")
    assert type(trainer.optimizer.optimizer).__name__ == "MyOptimizer"
    assert trainer.optimizer.param_groups[0]["a"] == 0.01
    before = [p.clone() for p in trainer.model.parameters()]
    trainer.train()  # no lr anywhere: nothing to schedule or log, and it still trains
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg_dict = tiny_config(custom_imports={"imports": ["my_optim"]},
                           optimizer={"type": "SGD", "lr": 0.1, "constructor": "HeadFirstConstructor",
                                      "paramwise_cfg": {"head_mult": 10.0}})
    raw = load_config(write_yaml(tmp_path / "b.yaml", cfg_dict))
    trainer = Trainer(validate_train_config(raw), raw, tmp_path / "work_b")
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([1.0, 0.1])


# ----------------------------------------------------------------------------- parameter groups
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def reference_settings(model, base_lr, base_wd, custom_keys, bias_decay_mult):
    """docs/behaviour.md section 2, parameter by parameter (independent of seg_accel.optim)."""
    expected = {}
    keys = sorted(sorted(custom_keys), key=len, reverse=True)
    for prefix, module in model.named_modules():
        for own, param in module.named_parameters(recurse=False):
            name = f"{prefix}.{own}" if prefix else own
            match = next((k for k in keys if k in name), None)
            if match is not None:
                expected[name] = (base_lr * custom_keys[match].get("lr_mult", 1.0),
                                  base_wd * custom_keys[match].get("decay_mult", 1.0))
                continue
            is_norm = isinstance(module, NORMS)
            is_dw = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
            wd = base_wd
            if is_norm:
                wd = base_wd * 1.0
            elif is_dw:
                wd = base_wd * 1.0
            elif own == "bias":
                wd = base_wd * bias_decay_mult
            expected[name] = (base_lr, wd)
    return expected


@pytest.mark.parametrize("arch", ["segformer", "upernet_convnext"])
def test_head_lr_mult_and_norm_decay_parameter_by_parameter(arch):
    from tests.unit.test_models import CLASSES, build_model, model_cfg

    model = build_model(model_cfg(arch), CLASSES)
    custom = {"head": {"lr_mult": 10.0}, "norm": {"decay_mult": 0.0}}
    opt = build_optimizer(model, {"type": "AdamW", "lr": 6e-5, "weight_decay": 0.01,
                                  "paramwise_cfg": {"custom_keys": custom, "bias_decay_mult": 0.0}})
    expected = reference_settings(model, 6e-5, 0.01, custom, 0.0)
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        group = where[id(param)]
        assert (group["lr"], group["weight_decay"]) == pytest.approx(expected[name]), name
    # the rules really bite on these models
    names = dict(model.named_parameters())
    head = next(n for n in names if n.startswith("decode_head") and "norm" in n)
    assert where[id(names[head])]["lr"] == pytest.approx(6e-4)  # 'head' beats 'norm' (ties: alphabetical)
    norm = next(n for n in names if "norm" in n and not n.startswith("decode_head"))
    assert where[id(names[norm])]["weight_decay"] == 0.0
    bias = next(n for n in names if n.endswith("bias") and "norm" not in n and "head" not in n and "dwconv" not in n)
    assert where[id(names[bias])]["weight_decay"] == 0.0 and where[id(names[bias])]["lr"] == pytest.approx(6e-5)
    # identical settings share a group
    settings = {(g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert len(settings) == len(opt.param_groups)


def test_rules_without_custom_keys_and_longest_key_first():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3)
            self.dw = nn.Conv2d(4, 4, 3, groups=4)
            self.bn = nn.BatchNorm2d(4)
            self.head_conv = nn.Conv2d(4, 2, 1)
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    net = Net()
    opt = build_optimizer(net, {"type": "SGD", "lr": 0.1, "weight_decay": 1e-4, "paramwise_cfg": {
        "bias_lr_mult": 2.0, "bias_decay_mult": 0.5, "norm_decay_mult": 0.0, "dwconv_decay_mult": 0.3,
        "custom_keys": {"head": {"lr_mult": 3.0}, "head_conv.b": {"lr_mult": 5.0, "decay_mult": 2.0}}}})
    where = {id(p): g for g in opt.param_groups for p in g["params"]}

    def settings(p):
        return where[id(p)]["lr"], where[id(p)]["weight_decay"]

    assert settings(net.conv.weight) == pytest.approx((0.1, 1e-4))
    assert settings(net.conv.bias) == pytest.approx((0.2, 0.5e-4))
    assert settings(net.dw.weight) == pytest.approx((0.1, 0.3e-4))
    assert settings(net.dw.bias) == pytest.approx((0.2, 0.3e-4))  # bias lr; dwconv comes before bias for wd
    assert settings(net.bn.weight) == pytest.approx((0.1, 0.0))
    assert settings(net.bn.bias) == pytest.approx((0.1, 0.0))  # a norm layer's bias keeps the base lr
    assert settings(net.head_conv.weight) == pytest.approx((0.3, 1e-4))
    assert settings(net.head_conv.bias) == pytest.approx((0.5, 2e-4))  # the longer key wins
    assert id(net.frozen.weight) not in where and id(net.frozen.bias) not in where


def test_shared_parameters_need_bypass_duplicate():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)
            self.b.weight = self.a.weight

    with pytest.raises(ConfigError, match="bypass_duplicate") as info:
        build_optimizer(Tied(), {"type": "SGD", "lr": 0.1, "paramwise_cfg": {"bias_lr_mult": 2.0}})
    assert "b.weight" in str(info.value) and "a.weight" in str(info.value)
    tied = Tied()
    opt = build_optimizer(tied, {"type": "SGD", "lr": 0.1, "paramwise_cfg": {"bypass_duplicate": True}})
    assert sum(len(g["params"]) for g in opt.param_groups) == 3


def test_frozen_parameters_are_left_out_and_no_paramwise_is_one_group():
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    model[0].requires_grad_(False)
    opt = build_optimizer(model, {"type": "AdamW", "lr": 0.01, "weight_decay": 0.05})
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 2
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, {"type": "SGD", "lr": 0.1})


# ----------------------------------------------------------------------------- layer-wise lr decay
def test_layer_decay_for_beit():
    from tests.unit.test_models import CLASSES, build_model, model_cfg

    model = build_model(model_cfg("beit"), CLASSES)  # 4 transformer layers
    opt = build_optimizer(model, {"type": "AdamW", "lr": 1.0, "weight_decay": 0.05,
                                  "constructor": "LayerDecayOptimizerConstructor",
                                  "paramwise_cfg": {"num_layers": 4, "layer_decay_rate": 0.5}})
    where = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(model.named_parameters())

    def lr_wd(name):
        return where[id(names[name])]["lr"], where[id(names[name])]["weight_decay"]

    total = 4 + 2  # lr = base * rate ** (total - layer_id - 1)
    assert lr_wd("beit.embeddings.cls_token") == (0.5 ** (total - 0 - 1), 0.0)
    assert lr_wd("beit.embeddings.patch_embeddings.projection.weight") == (0.5**5, 0.05)
    assert lr_wd("beit.layers.0.attention.q_proj.weight") == (0.5 ** (total - 1 - 1), 0.05)
    assert lr_wd("beit.layers.3.attention.q_proj.bias") == (0.5 ** (total - 4 - 1), 0.0)
    assert lr_wd("decode_head.classifier.weight") == (1.0, 0.05)  # heads: the last id, scale 1
    assert lr_wd("fpn.fpn1.normalization.weight") == (1.0, 0.0)  # 1-D: no decay


def test_learning_rate_decay_for_convnext_layer_and_stage_wise():
    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from tests.unit.test_models import ARCHITECTURES, CLASSES, build_model

    arch = {"type": ARCHITECTURES["upernet_convnext"]["type"],
            "config": {**ARCHITECTURES["upernet_convnext"]["config"]}}
    arch["config"]["backbone_config"] = {**arch["config"]["backbone_config"], "depths": [1, 1, 6, 1]}
    model = build_model(parse_section(arch, ModelConfig, "model"), CLASSES)
    names = dict(model.named_parameters())
    n = 6  # num_layers: layer ids 0..7, lr = rate ** (8 - id - 1)

    def lrs(decay_type):
        opt = build_optimizer(model, {"type": "AdamW", "lr": 1.0, "weight_decay": 0.05,
                                      "constructor": "LearningRateDecayOptimizerConstructor",
                                      "paramwise_cfg": {"num_layers": n, "decay_rate": 0.5, "decay_type": decay_type}})
        where = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        return lambda name: where[id(names[name])]

    layer = lrs("layer_wise")
    assert layer("backbone.embeddings.patch_embeddings.weight") == 0.5**7  # stem: id 0
    assert layer("backbone.encoder.stages.0.layers.0.pwconv1.weight") == 0.5**6  # id 1
    assert layer("backbone.encoder.stages.1.downsampling_layer.1.weight") == 0.5**5  # id 2
    assert layer("backbone.encoder.stages.2.layers.0.pwconv1.weight") == 0.5**4  # id 3 + 0 // 3
    assert layer("backbone.encoder.stages.2.layers.4.pwconv1.weight") == 0.5**3  # id 3 + 4 // 3
    assert layer("backbone.encoder.stages.3.layers.0.pwconv1.weight") == 0.5**1  # id num_layers
    assert layer("decode_head.classifier.weight") == 1.0  # id num_layers + 1
    stage = lrs("stage_wise")
    assert stage("backbone.encoder.stages.2.downsampling_layer.1.weight") == 0.5**7  # downsampling: id 0
    assert stage("backbone.encoder.stages.2.layers.4.pwconv1.weight") == 0.5**4  # stage 2: id 3
    assert stage("decode_head.classifier.weight") == 1.0


# ----------------------------------------------------------------------------- the table
def test_print_param_groups_script(tmp_path, capsys):
    from seg_accel.cli import print_param_groups_cli

    cfg = tiny_config(optimizer={"type": "AdamW", "lr": 6e-5, "weight_decay": 0.01, "paramwise_cfg": {
        "custom_keys": {"head": {"lr_mult": 10.0}, "norm": {"decay_mult": 0.0}, "pos_block": {"decay_mult": 0.0}}}})
    assert print_param_groups_cli([str(write_yaml(tmp_path / "exp.yaml", cfg))]) == 0
    out = capsys.readouterr().out
    assert "AdamW parameter groups" in out and "custom_keys['head']" in out and "6.000e-04" in out
    assert "custom_keys matching no trainable parameter name: 'pos_block'" in out
    rows = [line for line in out.splitlines() if line.startswith("|") and "group" not in line]
    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from tests.unit.test_models import build_model

    model = build_model(parse_section(tiny_config()["model"], ModelConfig, "model"), ["a", "b", "c", "d"])
    total = sum(int(r.split("|")[4].replace(",", "")) for r in rows)
    assert total == sum(p.numel() for p in model.parameters())


def test_fused_kernel_chosen_when_available_and_not_chosen_by_the_config():
    from seg_accel.optim import build_optimizer, with_fused_kernel

    cfg, note = with_fused_kernel({"type": "AdamW", "lr": 1e-3}, "cpu")
    assert cfg["fused"] is True and "optimizer.fused: false" in note
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, cfg)
    assert optimizer.defaults["fused"] is True
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # the fused kernel runs on this device
    for kept in ({"type": "AdamW", "lr": 1e-3, "fused": False}, {"type": "AdamW", "lr": 1e-3, "foreach": True},
                 {"type": "RMSprop", "lr": 1e-3}):
        assert with_fused_kernel(kept, "cpu") == (kept, None)
    assert with_fused_kernel({"type": "SGD", "lr": 0.1}, "mps") == ({"type": "SGD", "lr": 0.1}, None)


def test_a_schedule_that_cannot_do_what_it_says_is_warned_about(tmp_path, fresh_accelerate):
    """Issue 23, finding 9: a shipped config shortened with runner.max_iters kept its 1500-iteration
    warmup and never reached its lr, silently; step milestones past the end passed the same way."""
    from seg_accel.optim.schedules import schedule_warnings
    from tests.conftest import make_trainer, tiny_config

    linear = {"policy": "poly", "warmup": "linear", "warmup_iters": 1500, "warmup_ratio": 1e-6}
    [note] = schedule_warnings(linear, 1000)
    # linear warmup: factor at the last step (999) = 1 - (1 - 1e-6) * (1 - 999/1500) = 0.666
    assert note.startswith("lr_config.warmup_iters 1500 is not below the run's 1000 iterations: the schedule never "
                           "leaves its warmup and reaches at most 0.666 of its value"), note
    assert schedule_warnings({**linear, "warmup_iters": 999}, 1000) == []
    assert schedule_warnings({"policy": "step", "step": [600, 1200]}, 1000) == [
        "lr_config.step milestone(s) [1200] at or past the run's end (1000 iterations): never applied"]
    assert schedule_warnings({"policy": "step", "step": 1000}, 1000) == [
        "lr_config.step 1000 is not below the run's 1000 iterations: the value never decays"]
    assert schedule_warnings({"policy": "step", "step": [8, 9], "by_epoch": True}, 12, unit="epochs") == []
    cfg = tiny_config(lr_config={"policy": "poly", "warmup": "linear", "warmup_iters": 10, "by_epoch": False})
    make_trainer(tmp_path, cfg)
    log = next((tmp_path / "work").glob("*.log")).read_text()
    assert "WARNING lr_config.warmup_iters 10 is not below the run's 4 iterations" in log


def test_the_cyclic_schedules_equal_mmcv_including_no_rise_phase_and_gamma_below_1():
    """Issue 23, finding 10(a): with step_ratio_up 0 and gamma < 1 the cyclic lr differed from mmcv
    1.7.2 from the second cycle on (step 50 of 100: 0.055 vs mmcv's 0.1). The reference values are
    mmcv's own, written by tests/references/make_mmcv_cyclic.py."""
    import json

    from seg_accel.optim.schedules import CyclicMomentumPolicy, CyclicPolicy
    from tests.conftest import REPO

    reference = json.loads((REPO / "tests/references/mmcv_cyclic.json").read_text())
    assert reference["mmcv"] == "1.7.2"
    for target, policy_cls, base in (("lr", CyclicPolicy, reference["base_lr"]),
                                     ("momentum", CyclicMomentumPolicy, reference["base_momentum"])):
        for case in reference[target]:
            options = {k: v for k, v in case.items() if k not in ("values", "max_iters")}
            policy = policy_cls(case["max_iters"], **options)
            ours = [policy.value(base, i) for i in range(case["max_iters"])]
            assert ours == pytest.approx(case["values"], rel=1e-12, abs=1e-15), (target, options)
    first = reference["lr"][0]
    assert first["step_ratio_up"] == 0 and first["values"][50] == pytest.approx(0.1)
