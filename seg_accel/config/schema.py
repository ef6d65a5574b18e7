"""The training config schema: every top-level section, its keys, types and defaults.

``validate_train_config`` checks the whole resolved config before anything heavy
is built and returns typed sections. Components (``{type: ...}``) are checked
against their registries through ``Spec`` annotations.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from seg_accel.config.loader import Config
from seg_accel.config.types import parse_section
from seg_accel.errors import ConfigError
from seg_accel.optim.param_groups import OPTIMIZER_OWN_KEYS, OptimizerSpec
from seg_accel.optim.schedules import LrConfigSpec
from seg_accel.registry import DATASETS, LOSSES, MOMENTUM_POLICIES, OPTIMIZERS, SAMPLERS, Spec


def _positive(value: int, key: str, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"must be >= {minimum}, got {value}", key=key)


@dataclass
class HeadConfig:
    """``model.auxiliary_head`` (and the base of ``model.decode_head``): how a head's logits
    are turned into losses."""

    loss_decode: Annotated[Any, Spec(LOSSES, many="either")] = field(
        default_factory=lambda: {"type": "CrossEntropyLoss", "loss_weight": 1.0}
    )
    sampler: Annotated[dict | None, Spec(SAMPLERS)] = None
    align_corners: bool = False
    ignore_index: int = 255

    def loss_cfgs(self) -> list[dict]:
        return list(self.loss_decode) if isinstance(self.loss_decode, (list, tuple)) else [self.loss_decode]

    def validate(self, key: str) -> None:
        if not self.loss_cfgs():
            raise ConfigError("needs at least one loss", key=f"{key}.loss_decode")


@dataclass
class DecodeHeadConfig(HeadConfig):
    """``model.decode_head``: ``out_channels: 1`` makes a binary (two-class) head with one
    sigmoid channel, predicting the second class where ``sigmoid > threshold``."""

    out_channels: int | None = None
    threshold: float | None = None

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ConfigError(f"must be in (0, 1), got {self.threshold}", key=f"{key}.threshold")
        if self.threshold is not None and self.out_channels != 1:
            raise ConfigError("threshold is for a 1-channel head (out_channels: 1)", key=f"{key}.threshold")


@dataclass
class TestConfig:
    """``model.test_cfg``: how evaluation runs the model (SPEC section 9): ``whole`` images or
    ``slide`` windows of ``crop_size`` every ``stride`` pixels ([h, w]); ``img_ratios`` and
    ``flip`` average the softmax probabilities over rescaled and flipped inputs."""

    mode: Literal["whole", "slide"] = "whole"
    crop_size: list[int] | None = None
    stride: list[int] | None = None
    img_ratios: list[float] | None = None
    flip: bool = False

    def validate(self, key: str) -> None:
        for name in ("crop_size", "stride"):
            value = getattr(self, name)
            if self.mode == "slide" and (value is None or len(value) != 2 or min(value) < 1):
                raise ConfigError(f"mode: slide needs {name}: [h, w] of positive integers, got {value}",
                                  key=f"{key}.{name}")
        if self.img_ratios is not None and (not self.img_ratios or min(self.img_ratios) <= 0):
            raise ConfigError(f"must be positive numbers, got {self.img_ratios}", key=f"{key}.img_ratios")


@dataclass
class ModelConfig:
    """``model``: a transformers ``*ForSemanticSegmentation`` class and how to initialise it."""

    type: str
    pretrained: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    decode_head: DecodeHeadConfig = field(default_factory=DecodeHeadConfig)
    auxiliary_head: HeadConfig | None = None
    test_cfg: TestConfig = field(default_factory=TestConfig)
    # weights for the backbone only (UperNet's `backbone`, else the base model: `dpt`, `beit`,
    # `segformer`): a Hub id or save_pretrained folder of an ImageNet backbone
    backbone_pretrained: str | None = None
    norm_eval: bool = False  # BatchNorm layers stay in eval mode while training (running statistics)

    def validate(self, key: str) -> None:
        from seg_accel.models.builder import check_model_config

        check_model_config(self, key)


@dataclass
class LoaderConfig:
    samples_per_gpu: int | None = None
    workers_per_gpu: int | None = None

    def validate(self, key: str) -> None:
        if self.samples_per_gpu is not None:
            _positive(self.samples_per_gpu, f"{key}.samples_per_gpu")
        if self.workers_per_gpu is not None:
            _positive(self.workers_per_gpu, f"{key}.workers_per_gpu", 0)


@dataclass
class DataConfig:
    """``data``: datasets and per-process loader settings (MMSegmentation names)."""

    train: Annotated[dict, Spec(DATASETS)]
    samples_per_gpu: int = 2
    workers_per_gpu: int = 2
    val: Annotated[dict | None, Spec(DATASETS)] = None
    test: Annotated[dict | None, Spec(DATASETS)] = None  # scripts/evaluate.py uses it (else val)
    val_dataloader: LoaderConfig = field(default_factory=lambda: LoaderConfig(samples_per_gpu=1))
    test_dataloader: LoaderConfig = field(default_factory=lambda: LoaderConfig(samples_per_gpu=1))
    shuffle: bool = True  # each epoch in a new order (seeded by `seed`)
    shuffle_buffer_size: int = 1000  # streamed data: samples each worker shuffles among
    skip_bad_samples: bool = False  # replace (and report) unreadable or invalid samples instead of stopping

    def validate(self, key: str) -> None:
        _positive(self.samples_per_gpu, f"{key}.samples_per_gpu")
        _positive(self.workers_per_gpu, f"{key}.workers_per_gpu", 0)
        _positive(self.shuffle_buffer_size, f"{key}.shuffle_buffer_size")

    def val_batch_size(self) -> int:
        return self.val_dataloader.samples_per_gpu or 1

    def val_workers(self) -> int:
        w = self.val_dataloader.workers_per_gpu
        return self.workers_per_gpu if w is None else w


@dataclass
class GradClipConfig:
    max_norm: float
    norm_type: float = 2.0

    def validate(self, key: str) -> None:
        if self.max_norm <= 0:
            raise ConfigError(f"must be > 0, got {self.max_norm}", key=f"{key}.max_norm")


@dataclass
class OptimizerStepConfig:
    """``optimizer_config``: what happens at each optimizer step."""

    grad_clip: GradClipConfig | None = None


@dataclass
class RunnerConfig:
    """``IterBasedRunner`` counts ``max_iters`` optimizer steps; ``EpochBasedRunner``
    ``max_epochs`` passes over the training data."""

    type: Literal["IterBasedRunner", "EpochBasedRunner"] = "IterBasedRunner"
    max_iters: int | None = None
    max_epochs: int | None = None

    def validate(self, key: str) -> None:
        wanted, other = ("max_iters", "max_epochs") if self.type == "IterBasedRunner" else ("max_epochs", "max_iters")
        if getattr(self, wanted) is None:
            raise ConfigError(f"{self.type} needs {wanted}", key=f"{key}.{wanted}")
        if getattr(self, other) is not None:
            raise ConfigError(f"{self.type} counts {wanted}; remove {other}", key=f"{key}.{other}")
        _positive(getattr(self, wanted), f"{key}.{wanted}")

    @property
    def by_epoch(self) -> bool:
        return self.type == "EpochBasedRunner"


class HookSpec:
    """Checks ``custom_hooks`` / ``log_config.hooks`` entries: ``priority`` plus the hook's options."""

    def describe(self) -> str:
        return "a list of hook mappings ({type: ..., priority: ...})"

    def check(self, value: Any, key: str | None) -> None:
        from seg_accel.engine.hooks import get_priority
        from seg_accel.registry import HOOKS

        if not isinstance(value, list):
            raise ConfigError(f"expected {self.describe()}, got {value!r}", key=key)
        for i, item in enumerate(value):
            item_key = f"{key}.{i}"
            if isinstance(item, dict) and "priority" in item:
                get_priority(item["priority"], f"{item_key}.priority")
            HOOKS.check({k: v for k, v in item.items() if k != "priority"} if isinstance(item, dict) else item,
                        item_key)


@dataclass
class LogConfig:
    interval: int = 50
    hooks: Annotated[list, HookSpec()] = field(default_factory=lambda: [{"type": "TextLoggerHook"}])

    def validate(self, key: str) -> None:
        _positive(self.interval, f"{key}.interval")


@dataclass
class CheckpointConfig:
    """``checkpoint_config``: full training state every ``interval`` iterations (epochs with
    ``by_epoch``), the newest ``max_keep_ckpts`` kept (-1: all), in ``out_dir`` (default:
    the work dir), and at the end with ``save_last``."""

    interval: int = 1000
    by_epoch: bool | None = None  # default: as the runner counts
    save_optimizer: bool = True
    max_keep_ckpts: int = -1
    out_dir: str | None = None
    save_last: bool = True

    def validate(self, key: str) -> None:
        _positive(self.interval, f"{key}.interval")
        if self.max_keep_ckpts == 0 or self.max_keep_ckpts < -1:
            raise ConfigError(f"must be -1 (keep all) or >= 1, got {self.max_keep_ckpts}", key=f"{key}.max_keep_ckpts")


@dataclass
class EvaluationConfig:
    """``evaluation``: on ``data.val`` every ``interval`` iterations (epochs with an epoch-based
    runner) and at the end; ``save_best`` keeps the best checkpoint by a metric."""

    interval: int = 1000
    metric: str | list[str] = "mIoU"
    save_best: str | None = None
    rule: Literal["greater", "less"] | None = None
    pre_eval: bool = True  # MMSegmentation's flag; seg-accel always accumulates per batch

    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    def validate(self, key: str) -> None:
        from seg_accel.metrics import METRIC_COLUMNS

        _positive(self.interval, f"{key}.interval")
        for m in self.metrics():
            if m not in METRIC_COLUMNS:
                raise ConfigError(f"unknown metric {m!r}; choose from {', '.join(METRIC_COLUMNS)}", key=f"{key}.metric")
        if not self.pre_eval:
            raise ConfigError("seg-accel always evaluates batch by batch (pre_eval: true); remove pre_eval",
                              key=f"{key}.pre_eval")


@dataclass
class PushToHubConfig:
    """``push_to_hub``: publish the model (export, model card, config, logs) to a Hub repo.

    ``strategy``: ``end`` pushes the final model; ``checkpoint`` also pushes each
    checkpoint's export as it is saved (one commit each); ``best`` pushes each new best
    (``evaluation.save_best``) and ends with the best model. The token comes from
    ``HF_TOKEN`` or ``hf auth login``, never from the config."""

    repo_id: str
    private: bool | None = None  # None: the Hub's default for a new repo
    revision: str | None = None  # a branch; created if missing
    strategy: Literal["end", "checkpoint", "best"] = "end"
    commit_message: str | None = None  # may use {name}, {iter}, {epoch}
    retries: int = 3  # attempts per push before it is given up (with a warning)
    retry_wait: float = 5.0  # seconds before the 2nd attempt, doubling after each failure
    max_waiting: int = 3  # pushes queued behind the running upload; beyond, the oldest is dropped
    token: Any = None  # refused: see validate

    def validate(self, key: str) -> None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        if self.token is not None:
            self.token = None  # never kept, never shown
            raise ConfigError("a token is never read from the config (configs are saved and uploaded): remove it "
                              "and set HF_TOKEN or run `hf auth login`", key=f"{key}.token")
        try:
            validate_repo_id(self.repo_id)
        except HFValidationError as exc:
            raise ConfigError(f"not a Hub repo id ('user/name'): {exc}", key=f"{key}.repo_id") from exc
        _positive(self.retries, f"{key}.retries")
        _positive(self.max_waiting, f"{key}.max_waiting")
        if self.retry_wait < 0:
            raise ConfigError(f"must be >= 0 seconds, got {self.retry_wait}", key=f"{key}.retry_wait")
        if self.commit_message is not None:
            try:
                self.commit_message.format(name="iter_1", iter=1, epoch=0)
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(f"may use the fields {{name}}, {{iter}}, {{epoch}}; got {self.commit_message!r} "
                                  f"({type(exc).__name__}: {exc})", key=f"{key}.commit_message") from exc


@dataclass
class CustomImportsConfig:
    imports: list[str] | str = field(default_factory=list)
    allow_failed_imports: bool = False


@dataclass
class TrainConfig:
    """All top-level keys a training config may have."""

    model: ModelConfig
    data: DataConfig
    optimizer: Annotated[dict, OptimizerSpec()]
    runner: RunnerConfig
    lr_config: Annotated[dict | None, LrConfigSpec()] = None
    momentum_config: Annotated[dict | None, Spec(MOMENTUM_POLICIES)] = None
    optimizer_config: OptimizerStepConfig = field(default_factory=OptimizerStepConfig)
    log_config: LogConfig = field(default_factory=LogConfig)
    workflow: list[tuple[Literal["train", "val"], int]] = field(default_factory=lambda: [("train", 1)])
    checkpoint_config: CheckpointConfig | None = None
    evaluation: EvaluationConfig | None = None
    custom_hooks: Annotated[list, HookSpec()] = field(default_factory=list)
    resume_from: str | None = None
    load_from: str | None = None
    auto_resume: bool = False
    skip_nonfinite_steps: int = 0
    custom_imports: CustomImportsConfig | None = None
    work_dir: str | None = None
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    gradient_accumulation_steps: int = 1
    find_unused_parameters: bool | None = None
    sync_bn: bool = False  # BatchNorm -> SyncBatchNorm on multi-GPU runs (a notice elsewhere)
    dist_timeout: float | None = None  # seconds a collective may wait for the other processes (None: PyTorch's)
    push_to_hub: PushToHubConfig | None = None
    classes: list[str] = field(default_factory=list, init=False)  # filled from data.train by validation

    def validate(self, key: str | None) -> None:
        _positive(self.gradient_accumulation_steps, "gradient_accumulation_steps")
        _positive(self.skip_nonfinite_steps, "skip_nonfinite_steps", 0)
        if self.dist_timeout is not None and not self.dist_timeout > 0:
            raise ConfigError(f"must be > 0 seconds (or null for PyTorch's default), got {self.dist_timeout}",
                              key="dist_timeout")
        for i, (mode, count) in enumerate(self.workflow):
            _positive(count, f"workflow.{i}.1")
            if mode == "val" and self.data.val is None:
                raise ConfigError("a val phase needs data.val", key=f"workflow.{i}")
        if not any(mode == "train" for mode, _ in self.workflow):
            raise ConfigError("needs a train phase, e.g. [[train, 1]]", key="workflow")
        if self.evaluation is not None and self.data.val is None:
            raise ConfigError("evaluation needs data.val", key="evaluation")
        checkpoints = self.checkpoint_config
        if checkpoints is not None and checkpoints.by_epoch and not self.runner.by_epoch:
            raise ConfigError("by_epoch: true needs EpochBasedRunner", key="checkpoint_config.by_epoch")
        if self.resume_from is not None and self.load_from is not None:
            raise ConfigError("resume_from continues a run; load_from takes weights only: set one", key="load_from")
        push = self.push_to_hub
        if push is not None and push.strategy == "checkpoint" and checkpoints is None:
            raise ConfigError("strategy: checkpoint pushes each checkpoint's export: it needs checkpoint_config",
                              key="push_to_hub.strategy")
        if push is not None and push.strategy == "best" and (self.evaluation is None or not self.evaluation.save_best):
            raise ConfigError("strategy: best pushes each new best model: it needs evaluation.save_best",
                              key="push_to_hub.strategy")


def dataset_classes(dataset_cfg: dict, key: str) -> list[str]:
    """Class names a dataset config defines, without loading any data."""
    cls = DATASETS.get(dataset_cfg["type"], f"{key}.type")
    resolve = getattr(cls, "resolve_classes", None)
    if resolve is None:
        raise ConfigError(f"dataset {dataset_cfg['type']} does not say its class names (no resolve_classes)", key=key)
    kwargs = {k: v for k, v in dataset_cfg.items() if k != "type"}
    try:
        return list(resolve(**kwargs))
    except ConfigError as exc:
        raise exc.within(key, [*kwargs, *inspect.signature(resolve).parameters])


def _dry_build(cfg: TrainConfig) -> None:
    """Build what is cheap to build (transforms, losses, the model on the meta device, its
    parameter groups, schedules, an optimizer over a dummy parameter) so that value checks
    (ranges, lengths, unsupported combinations) fail now, not after the processes start."""
    import torch

    from seg_accel.data.transforms import build_pipeline
    from seg_accel.losses.head import build_head_losses
    from seg_accel.models.builder import build_empty_model
    from seg_accel.optim import build_constructor, build_lr_scheduler, build_momentum_scheduler

    for split in ("train", "val", "test"):
        dataset_cfg = getattr(cfg.data, split)
        if dataset_cfg is not None:
            build_pipeline(dataset_cfg.get("pipeline"), f"data.{split}.pipeline")
    for prefix, name in (("decode", "decode_head"), ("aux", "auxiliary_head")):
        head = getattr(cfg.model, name)
        if head is not None and not build_head_losses(head, len(cfg.classes), prefix, f"model.{name}").trains():
            raise ConfigError(
                "no loss is named 'loss_*', so this head would get no gradient; name at least one loss "
                "loss_<something>",
                key=f"model.{name}.loss_decode",
            )
    model = build_empty_model(cfg.model, cfg.classes)
    constructor = build_constructor(cfg.optimizer)
    if model is not None and hasattr(constructor, "param_groups"):
        constructor.param_groups(model)
    optimizer_cfg = {k: v for k, v in cfg.optimizer.items() if k not in OPTIMIZER_OWN_KEYS}
    optimizer = OPTIMIZERS.build(optimizer_cfg, "optimizer", params=[torch.nn.Parameter(torch.zeros(2, 2))])
    for section in ("lr_config", "momentum_config"):
        section_cfg = getattr(cfg, section) or {}
        # an iteration schedule on an epoch-based runner: its length is known once the data are
        length = cfg.runner.max_epochs if section_cfg.get("by_epoch", False) else (cfg.runner.max_iters or 10**9)
        builder = build_lr_scheduler if section == "lr_config" else build_momentum_scheduler
        builder(getattr(cfg, section), optimizer, length)
    from seg_accel.registry import HOOKS

    for section, hook_cfgs in (("log_config.hooks", cfg.log_config.hooks), ("custom_hooks", cfg.custom_hooks)):
        for i, hook_cfg in enumerate(hook_cfgs):  # their constructors may check more
            hook = HOOKS.build({k: v for k, v in hook_cfg.items() if k != "priority"}, f"{section}.{i}")
            if hasattr(hook, "check_package"):
                hook.check_package()
    for section in ("lr_config", "momentum_config"):
        if (getattr(cfg, section) or {}).get("by_epoch", False) and not cfg.runner.by_epoch:
            raise ConfigError(
                "by_epoch: true needs EpochBasedRunner; with IterBasedRunner set by_epoch: false",
                key=f"{section}.by_epoch",
            )


@contextlib.contextmanager
def errors_located_in(cfg: Config) -> Iterator[None]:
    """Give every ConfigError raised inside the file its key came from."""
    try:
        yield
    except ConfigError as exc:
        if exc.file is None:
            exc.file = cfg.origin(exc.key)
        raise


def validate_train_config(cfg: Config) -> TrainConfig:
    """Check the whole resolved config; every error names the key and the file it came from."""
    with errors_located_in(cfg):
        train_cfg = parse_section(cfg.dict, TrainConfig, None)
        classes = dataset_classes(train_cfg.data.train, "data.train")
        for split in ("val", "test"):
            if getattr(train_cfg.data, split) is not None:
                other = dataset_classes(getattr(train_cfg.data, split), f"data.{split}")
                if other != classes:
                    raise ConfigError(
                        f"the {split} set's classes {other} differ from the training set's {classes}",
                        key=f"data.{split}",
                    )
        from seg_accel.models.builder import check_model_against_data

        check_model_against_data(train_cfg.model, classes, "model")
        train_cfg.classes = classes
        _dry_build(train_cfg)
    return train_cfg
