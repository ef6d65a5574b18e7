"""Optimizers, parameter groups, learning-rate and momentum schedules."""
from seg_accel.optim.param_groups import (
    DefaultOptimizerConstructor,
    LayerDecayOptimizerConstructor,
    LearningRateDecayOptimizerConstructor,
    build_constructor,
    build_optimizer,
    param_group_table,
    with_fused_kernel,
)
from seg_accel.optim import chains  # noqa: F401  (registers the "chain" policies)
from seg_accel.optim.schedules import ParamScheduler, build_lr_scheduler, build_momentum_scheduler

__all__ = [
    "DefaultOptimizerConstructor",
    "LayerDecayOptimizerConstructor",
    "LearningRateDecayOptimizerConstructor",
    "ParamScheduler",
    "build_constructor",
    "build_lr_scheduler",
    "build_momentum_scheduler",
    "build_optimizer",
    "param_group_table",
    "with_fused_kernel",
]
