"""Optimizers and learning-rate schedules."""
from seg_accel.optim.builder import build_optimizer
from seg_accel.optim.schedules import LrScheduler, PolyPolicy, build_lr_scheduler

__all__ = ["LrScheduler", "PolyPolicy", "build_lr_scheduler", "build_optimizer"]
