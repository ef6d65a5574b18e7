"""Check a whole training config before any process, model weight or data file is touched.

``parse_train_config`` (the config layer) checks types and ranges; here every component is
checked against its registry, the model against its family and the data's classes, and
what is cheap to build is built (transforms, losses on a small batch, the model on the
meta device with its parameter groups, the schedules over a dummy optimizer, the hooks),
so that range errors and wrong signatures fail now, naming the key. The values that come
from elsewhere (the data's class names, the work dir) are filled in here, once.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from seg_accel.config.loader import Config, resolve_work_dir
from seg_accel.config.schema import TrainConfig, parse_train_config
from seg_accel.config.types import components
from seg_accel.errors import ConfigError


def _component_checkers() -> dict[str, Callable[[dict, str], Any]]:
    from seg_accel.optim.param_groups import check_optimizer_config
    from seg_accel.optim.schedules import check_lr_config
    from seg_accel.registry import DATASETS, HOOKS, LOSSES, MOMENTUM_POLICIES, SAMPLERS

    def hook(cfg: dict, key: str) -> Any:
        return HOOKS.check({k: v for k, v in cfg.items() if k != "priority"}, key)

    return {"dataset": DATASETS.check, "loss": LOSSES.check, "pixel sampler": SAMPLERS.check,
            "optimizer": check_optimizer_config, "lr schedule": check_lr_config,
            "momentum schedule": MOMENTUM_POLICIES.check, "hook": hook}


def check_components(cfg: TrainConfig) -> None:
    """Every ``{type: ...}`` in the config against its registry (name, options, value types)."""
    checkers = _component_checkers()
    for key, value, marker in components(cfg):
        for item_key, item in marker.items(value, key):
            checkers[marker.kind](item, item_key)


def dataset_classes(dataset_cfg: dict, key: str) -> list[str]:
    """Class names a dataset config defines, without loading any data."""
    import inspect

    from seg_accel.registry import DATASETS

    cls = DATASETS.get(dataset_cfg["type"], f"{key}.type")
    resolve = getattr(cls, "resolve_classes", None)
    if resolve is None:
        raise ConfigError(f"dataset {dataset_cfg['type']} does not say its class names (no resolve_classes)", key=key)
    kwargs = {k: v for k, v in dataset_cfg.items() if k != "type"}
    try:
        return list(resolve(**kwargs))
    except ConfigError as exc:
        raise exc.within(key, [*kwargs, *inspect.signature(resolve).parameters])


def data_classes(cfg: TrainConfig) -> list[str]:
    """The training set's class names; the val and test sets must have the same."""
    classes = dataset_classes(cfg.data.train, "data.train")
    for split in ("val", "test"):
        if getattr(cfg.data, split) is not None:
            other = dataset_classes(getattr(cfg.data, split), f"data.{split}")
            if other != classes:
                raise ConfigError(f"the {split} set's classes {other} differ from the training set's {classes}",
                                  key=f"data.{split}")
    return classes


def dry_build(cfg: TrainConfig) -> None:
    """Build what is cheap to build (transforms, losses run on a small batch, the model on the
    meta device and its parameter groups, schedules over a dummy optimizer, the hooks), so that
    value checks (ranges, lengths, signatures, unsupported combinations) fail now, not after the
    processes start."""
    import torch

    from seg_accel.data.transforms import build_pipeline
    from seg_accel.losses.head import build_head_losses
    from seg_accel.models.builder import build_empty_model
    from seg_accel.optim import build_constructor, build_lr_scheduler, build_momentum_scheduler
    from seg_accel.optim.param_groups import optimizer_kwargs
    from seg_accel.registry import HOOKS, OPTIMIZERS

    for split in ("train", "val", "test"):
        dataset_cfg = getattr(cfg.data, split)
        if dataset_cfg is not None:
            build_pipeline(dataset_cfg.get("pipeline"), f"data.{split}.pipeline")
    outputs = cfg.model.decode_head.out_channels or len(cfg.classes)
    for prefix, name in (("decode", "decode_head"), ("aux", "auxiliary_head")):
        head = getattr(cfg.model, name)
        if head is None:
            continue
        losses = build_head_losses(head, len(cfg.classes), prefix, f"model.{name}")
        if not losses.trains():
            raise ConfigError("no loss is named 'loss_*', so this head would get no gradient; name at least one loss "
                              "loss_<something>", key=f"model.{name}.loss_decode")
        losses.try_on_a_batch(outputs)
    model = build_empty_model(cfg.model, list(cfg.classes))
    constructor = build_constructor(cfg.optimizer)
    if model is not None and hasattr(constructor, "param_groups"):
        constructor.param_groups(model)
    optimizer = OPTIMIZERS.build(optimizer_kwargs(cfg.optimizer), "optimizer",
                                 params=[torch.nn.Parameter(torch.zeros(2, 2))])
    for section, builder in (("lr_config", build_lr_scheduler), ("momentum_config", build_momentum_scheduler)):
        section_cfg = getattr(cfg, section) or {}
        # an iteration schedule on an epoch-based runner: its length is known once the data are
        length = cfg.runner.max_epochs if section_cfg.get("by_epoch", False) else (cfg.runner.max_iters or 10**9)
        builder(getattr(cfg, section), optimizer, length)
        if section_cfg.get("by_epoch", False) and not cfg.runner.by_epoch:  # after the policy's own checks
            raise ConfigError("by_epoch: true needs EpochBasedRunner; with IterBasedRunner set by_epoch: false",
                              key=f"{section}.by_epoch")
    for section, hook_cfgs in (("log_config.hooks", cfg.log_config.hooks), ("custom_hooks", cfg.custom_hooks)):
        for i, hook_cfg in enumerate(hook_cfgs):  # their constructors may check more
            hook = HOOKS.build({k: v for k, v in hook_cfg.items() if k != "priority"}, f"{section}.{i}")
            if hasattr(hook, "check_package"):
                hook.check_package()


def validate_train_config(cfg: Config, work_dir: str | None = None) -> TrainConfig:
    """Check the whole resolved config; every error names the key and the file it came from.
    Returns the typed config with ``classes`` and ``work_dir`` resolved (``work_dir``: the
    ``--work-dir`` given, else the config's, else ``work_dirs/<config name>``)."""
    from seg_accel.models.builder import check_model_against_data

    with cfg.errors_located():
        train_cfg = parse_train_config(cfg.dict)
        check_components(train_cfg)
        classes = data_classes(train_cfg)
        check_model_against_data(train_cfg.model, classes, "model")
        train_cfg = dataclasses.replace(train_cfg, classes=list(classes),
                                        work_dir=resolve_work_dir(cfg, work_dir))
        dry_build(train_cfg)
    return train_cfg
