"""The training config schema: every top-level section, its keys, types, defaults and value rules.

This module is data only: ``parse_train_config`` turns the resolved YAML into frozen
dataclasses and checks types and ranges. What a component name means (``{type: ...}``
against its registry), the model architecture and the dry build of losses, optimizer and
schedules are checked by ``seg_accel.validate``, which also fills in the values
that come from elsewhere (the data's class names, the work dir) in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from seg_accel.config.types import Component, parse_section
from seg_accel.errors import ConfigError

PRIORITIES = {
    "HIGHEST": 0, "VERY_HIGH": 10, "HIGH": 30, "ABOVE_NORMAL": 40, "NORMAL": 50,
    "BELOW_NORMAL": 60, "LOW": 70, "VERY_LOW": 90, "LOWEST": 100,
}
METRICS = ("mIoU", "mDice", "mFscore", "AUC")  # AUC: 2-class models (ROC and PR areas)
# keys of the optimizer section that are not the optimizer's own keyword arguments
OPTIMIZER_OWN_KEYS = ("constructor", "paramwise_cfg")


def get_priority(value: int | str, key: str = "priority") -> int:
    """A hook priority: a name (``NORMAL``, case-insensitive) or an integer 0-100."""
    if isinstance(value, str):
        if value.upper() not in PRIORITIES:
            raise ConfigError(f"unknown priority {value!r}; use one of {', '.join(PRIORITIES)} or 0-100", key=key)
        return PRIORITIES[value.upper()]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        raise ConfigError(f"a priority is a name ({', '.join(PRIORITIES)}) or an integer 0-100, got {value!r}",
                          key=key)
    return value


def _positive(value: int, key: str, minimum: int = 1) -> None:
    if value < minimum:
        raise ConfigError(f"must be >= {minimum}, got {value}", key=key)


@dataclass(frozen=True)
class HeadConfig:
    """``model.auxiliary_head`` (and the base of ``model.decode_head``): how a head's logits
    are turned into losses; for a model whose family builds its heads from the config
    (MMSegmentation's ``EncoderDecoder``) also the head's ``type`` and its module options
    (``in_channels``, ``channels``, ..., kept in ``options``; the family checks them)."""

    type: str | None = None
    loss_decode: Annotated[Any, Component("loss", many="either")] = field(
        default_factory=lambda: {"type": "CrossEntropyLoss", "loss_weight": 1.0}
    )
    sampler: Annotated[dict | None, Component("pixel sampler")] = None
    align_corners: bool = False
    ignore_index: int = 255
    # any other key: an option of the head module (only where the model's family builds heads)
    options: dict[str, Any] = field(default_factory=dict, metadata={"extra": True})

    def loss_cfgs(self) -> list[dict]:
        return list(self.loss_decode) if isinstance(self.loss_decode, (list, tuple)) else [self.loss_decode]

    def loss_key(self, key: str, index: int) -> str:
        """The config key of the ``index``-th loss (``loss_decode`` or ``loss_decode.<i>``)."""
        return f"{key}.loss_decode" + (f".{index}" if isinstance(self.loss_decode, (list, tuple)) else "")

    def validate(self, key: str) -> None:
        if not self.loss_cfgs():
            raise ConfigError("needs at least one loss", key=f"{key}.loss_decode")


@dataclass(frozen=True)
class AuxiliaryHeadConfig(HeadConfig):
    """``model.auxiliary_head``: its losses and, for a model whose family builds the head (smp),
    MMSegmentation's ``FCNHead`` options: the encoder feature it reads (``in_index``), its
    width (``channels``), ``num_convs`` convolutions of ``kernel_size``, ``concat_input`` and
    ``dropout_ratio``. Unset options take the family's defaults; a family whose models bring
    their own auxiliary head (transformers) takes none of them."""

    in_index: int | None = None
    channels: int | None = None
    num_convs: int | None = None
    kernel_size: int | None = None
    concat_input: bool | None = None
    dropout_ratio: float | None = None

    HEAD_OPTIONS = ("in_index", "channels", "num_convs", "kernel_size", "concat_input", "dropout_ratio")

    def head_options(self) -> dict[str, Any]:
        """The head options set in the config."""
        return {name: getattr(self, name) for name in self.HEAD_OPTIONS if getattr(self, name) is not None}

    def validate(self, key: str) -> None:
        super().validate(key)
        for name in ("channels", "kernel_size"):
            if getattr(self, name) is not None:
                _positive(getattr(self, name), f"{key}.{name}")
        if self.num_convs is not None:
            _positive(self.num_convs, f"{key}.num_convs", 0)
        if self.kernel_size is not None and self.kernel_size % 2 == 0:
            raise ConfigError(f"must be odd (the head keeps the feature's size), got {self.kernel_size}",
                              key=f"{key}.kernel_size")
        if self.dropout_ratio is not None and not 0 <= self.dropout_ratio < 1:
            raise ConfigError(f"must be in [0, 1), got {self.dropout_ratio}", key=f"{key}.dropout_ratio")


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class TestConfig:
    """``model.test_cfg``: how evaluation runs the model (docs/behaviour.md section 9):
    ``whole`` images or ``slide`` windows of ``crop_size`` every ``stride`` pixels ([h, w]);
    ``img_ratios`` and ``flip`` average the softmax probabilities over rescaled and flipped
    inputs."""

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


@dataclass(frozen=True)
class ModelConfig:
    """``model``: which network (``type``: a transformers ``*ForSemanticSegmentation`` class, a
    model registered in ``MODELS`` or a dotted import path) and how to initialise it.

    ``config`` holds a transformers model's config kwargs; a registered ``nn.Module`` takes its
    constructor's keyword arguments directly under ``model`` (kept in ``options``;
    ``num_classes`` comes from the data). The model's family checks which of them it takes.
    """

    type: str
    pretrained: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    decode_head: DecodeHeadConfig = field(default_factory=DecodeHeadConfig)
    auxiliary_head: AuxiliaryHeadConfig | None = None
    test_cfg: TestConfig = field(default_factory=TestConfig)
    # weights for the backbone only (UperNet's `backbone`, else the base model: `dpt`, `beit`,
    # `segformer`): a Hub id or save_pretrained folder of an ImageNet backbone
    backbone_pretrained: str | None = None
    norm_eval: bool = False  # BatchNorm layers stay in eval mode while training (running statistics)
    # any other key: an option of a registered model's constructor (checked against it)
    options: dict[str, Any] = field(default_factory=dict, metadata={"extra": True})


@dataclass(frozen=True)
class LoaderConfig:
    """``val_dataloader`` / ``test_dataloader``: the batch size per process (``auto``: images of
    one size batched together, within a pixel budget) and the workers (null: ``workers_per_gpu``)."""

    samples_per_gpu: int | Literal["auto"] | None = "auto"
    workers_per_gpu: int | None = None

    def validate(self, key: str) -> None:
        if isinstance(self.samples_per_gpu, int):
            _positive(self.samples_per_gpu, f"{key}.samples_per_gpu")
        if self.workers_per_gpu is not None:
            _positive(self.workers_per_gpu, f"{key}.workers_per_gpu", 0)


@dataclass(frozen=True)
class DataConfig:
    """``data``: datasets and per-process loader settings (MMSegmentation names)."""

    train: Annotated[dict, Component("dataset")]
    samples_per_gpu: int = 2
    workers_per_gpu: int = 2
    val: Annotated[dict | None, Component("dataset")] = None
    test: Annotated[dict | None, Component("dataset")] = None  # the evaluate command uses it (else val)
    val_dataloader: LoaderConfig = field(default_factory=LoaderConfig)
    test_dataloader: LoaderConfig = field(default_factory=LoaderConfig)
    shuffle: bool = True  # each epoch in a new order (seeded by `seed`)
    shuffle_buffer_size: int = 1000  # streamed data: samples each worker shuffles among
    skip_bad_samples: bool = False  # replace (and report) unreadable or invalid samples instead of stopping
    pin_memory: bool | None = None  # page-locked batches for the GPU copy (null: on when training on CUDA)
    persistent_workers: bool = True  # evaluation workers kept between evaluations (training's always are)
    prefetch_factor: int | None = None  # batches each worker prepares ahead (null: PyTorch's 2)

    def validate(self, key: str) -> None:
        _positive(self.samples_per_gpu, f"{key}.samples_per_gpu")
        _positive(self.workers_per_gpu, f"{key}.workers_per_gpu", 0)
        _positive(self.shuffle_buffer_size, f"{key}.shuffle_buffer_size")
        if self.prefetch_factor is not None:
            _positive(self.prefetch_factor, f"{key}.prefetch_factor")

    def val_batch_size(self) -> int | str:
        return self.loader("val")[0]

    def val_workers(self) -> int:
        return self.loader("val")[1]

    def loader(self, split: Literal["val", "test"]) -> tuple[int | str, int]:
        """(batch size or ``auto``, workers) per process for evaluating on ``split``."""
        cfg = self.val_dataloader if split == "val" else self.test_dataloader
        workers = self.workers_per_gpu if cfg.workers_per_gpu is None else cfg.workers_per_gpu
        return cfg.samples_per_gpu or "auto", workers


@dataclass(frozen=True)
class GradClipConfig:
    max_norm: float
    norm_type: float = 2.0

    def validate(self, key: str) -> None:
        if self.max_norm <= 0:
            raise ConfigError(f"must be > 0, got {self.max_norm}", key=f"{key}.max_norm")


@dataclass(frozen=True)
class OptimizerStepConfig:
    """``optimizer_config``: what happens at each optimizer step (``type: OptimizerHook``, mmcv's
    spelling, may stay)."""

    grad_clip: GradClipConfig | None = None
    type: Literal["OptimizerHook"] | None = None


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class LogConfig:
    interval: int = 50
    hooks: Annotated[list, Component("hook", many=True)] = field(default_factory=lambda: [{"type": "TextLoggerHook"}])

    def validate(self, key: str) -> None:
        _positive(self.interval, f"{key}.interval")


@dataclass(frozen=True)
class CheckpointConfig:
    """``checkpoint_config``: full training state every ``interval`` iterations (epochs with
    ``by_epoch``), the newest ``max_keep_ckpts`` kept (-1: all), in ``out_dir`` (default:
    the work dir), and at the end with ``save_last``. ``by_epoch`` left out follows the runner."""

    interval: int = 1000
    by_epoch: bool | None = None
    save_optimizer: bool = True
    max_keep_ckpts: int = -1
    out_dir: str | None = None
    save_last: bool = True

    def validate(self, key: str) -> None:
        _positive(self.interval, f"{key}.interval")
        if self.max_keep_ckpts == 0 or self.max_keep_ckpts < -1:
            raise ConfigError(f"must be -1 (keep all) or >= 1, got {self.max_keep_ckpts}", key=f"{key}.max_keep_ckpts")


@dataclass(frozen=True)
class EvaluationConfig:
    """``evaluation``: on ``data.val`` every ``interval`` iterations (epochs with an epoch-based
    runner; null: only at the end) and, with ``final``, once more at the end; ``save_best``
    keeps the best checkpoint by a metric. Left out of the config: only the final evaluation.
    Set to null (or ``--no-validate``): no evaluation at all."""

    interval: int | None = 1000
    metric: str | list[str] = "mIoU"
    save_best: str | None = None
    rule: Literal["greater", "less"] | None = None
    final: bool = True
    # MMSegmentation's switch between collecting every prediction (false) and reducing each batch
    # to area counts (true); seg-accel always does the latter, so false is refused
    pre_eval: bool = True

    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    def validate(self, key: str) -> None:
        if self.interval is not None:
            _positive(self.interval, f"{key}.interval")
        for m in self.metrics():
            if m not in METRICS:
                raise ConfigError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}", key=f"{key}.metric")
        if not self.pre_eval:
            raise ConfigError("seg-accel always evaluates batch by batch (pre_eval: true); remove pre_eval",
                              key=f"{key}.pre_eval")

    @property
    def best_key(self) -> str | None:
        """The metric ``save_best`` tracks (``auto``: the first metric)."""
        if self.save_best == "auto":
            first = self.metrics()[0]
            return "AUC_ROC" if first == "AUC" else "m" + ("IoU" if first == "mIoU" else first[1:])
        return self.save_best


@dataclass(frozen=True)
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
    token: Any = field(default=None, repr=False)  # refused: see validate

    def validate(self, key: str) -> None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        if self.token is not None:
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


@dataclass(frozen=True)
class CompileConfig:
    """``compile``: ``torch.compile`` through Accelerate's dynamo plugin (the training forward; the
    first iterations pay the compilation)."""

    backend: str = "inductor"
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    fullgraph: bool = False
    dynamic: bool | None = None


@dataclass(frozen=True)
class CustomImportsConfig:
    imports: list[str] | str = field(default_factory=list)
    allow_failed_imports: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """All top-level keys a training config may have, plus the values validation resolves
    (``classes``; ``work_dir`` made absolute-or-relative path of the run)."""

    model: ModelConfig
    data: DataConfig
    optimizer: Annotated[dict, Component("optimizer")]
    runner: RunnerConfig
    lr_config: Annotated[dict | None, Component("lr schedule", key="policy")] = None
    momentum_config: Annotated[dict | None, Component("momentum schedule", key="policy")] = None
    optimizer_config: OptimizerStepConfig = field(default_factory=OptimizerStepConfig)
    log_config: LogConfig = field(default_factory=LogConfig)
    # the default as a file's value parses (a list of [mode, count] lists)
    workflow: list[tuple[Literal["train", "val"], int]] = field(default_factory=lambda: [["train", 1]])
    checkpoint_config: CheckpointConfig | None = None
    evaluation: EvaluationConfig | None = field(default_factory=lambda: EvaluationConfig(interval=None))
    custom_hooks: Annotated[list, Component("hook", many=True)] = field(default_factory=list)
    resume_from: str | None = None
    load_from: str | None = None
    auto_resume: bool = False
    skip_nonfinite_steps: int = 0
    custom_imports: CustomImportsConfig | None = None
    work_dir: str | None = None
    seed: int = 0
    deterministic: bool = False  # deterministic algorithms (cuDNN, torch.use_deterministic_algorithms)
    torch_threads: int | None = None  # torch threads per process (null: OMP_NUM_THREADS, else cores / processes)
    channels_last: bool = False  # model and images in channels-last memory format (faster convolutions on GPUs)
    compile: CompileConfig | None = None  # torch.compile of the training forward
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    gradient_accumulation_steps: int = 1
    find_unused_parameters: bool | None = None
    sync_bn: bool = False  # BatchNorm -> SyncBatchNorm on multi-GPU runs (a notice elsewhere)
    dist_timeout: float | None = None  # seconds a collective may wait for the other processes (None: PyTorch's)
    push_to_hub: PushToHubConfig | None = None
    # resolved by validation, never read from the YAML
    classes: list[str] = field(default_factory=list, metadata={"resolved": True})

    @property
    def ignore_index(self) -> int:
        """The label value of unlabelled pixels: the decode head's ``ignore_index`` (datasets pad
        with it, metrics skip it)."""
        return self.model.decode_head.ignore_index

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates at all (``evaluation`` not null and a ``data.val``)."""
        return self.evaluation is not None and self.data.val is not None

    @property
    def checkpoints_by_epoch(self) -> bool:
        cfg = self.checkpoint_config
        return self.runner.by_epoch if cfg is None or cfg.by_epoch is None else cfg.by_epoch

    def validate(self, key: str | None) -> None:
        _positive(self.gradient_accumulation_steps, "gradient_accumulation_steps")
        _positive(self.skip_nonfinite_steps, "skip_nonfinite_steps", 0)
        if self.torch_threads is not None:
            _positive(self.torch_threads, "torch_threads")
        if self.dist_timeout is not None and not self.dist_timeout > 0:
            raise ConfigError(f"must be > 0 seconds (or null for PyTorch's default), got {self.dist_timeout}",
                              key="dist_timeout")
        for i, (mode, count) in enumerate(self.workflow):
            _positive(count, f"workflow.{i}.1")
            if mode == "val" and self.data.val is None:
                raise ConfigError("a val phase needs data.val", key=f"workflow.{i}")
        if not any(mode == "train" for mode, _ in self.workflow):
            raise ConfigError("needs a train phase, e.g. [[train, 1]]", key="workflow")
        evaluation = self.evaluation
        if evaluation is not None and self.data.val is None and (evaluation.interval or evaluation.save_best):
            raise ConfigError("evaluation needs data.val", key="evaluation")
        if evaluation is not None and "AUC" in evaluation.metrics() and self.classes and len(self.classes) != 2:
            raise ConfigError(f"AUC needs a 2-class model (foreground vs background); the data has "
                              f"{len(self.classes)} classes", key="evaluation.metric")
        checkpoints = self.checkpoint_config
        if checkpoints is not None and checkpoints.by_epoch and not self.runner.by_epoch:
            raise ConfigError("by_epoch: true needs EpochBasedRunner", key="checkpoint_config.by_epoch")
        if self.resume_from is not None and self.load_from is not None:
            raise ConfigError("resume_from continues a run; load_from takes weights only: set one", key="load_from")
        push = self.push_to_hub
        if push is not None and push.strategy == "checkpoint" and checkpoints is None:
            raise ConfigError("strategy: checkpoint pushes each checkpoint's export: it needs checkpoint_config",
                              key="push_to_hub.strategy")
        if push is not None and push.strategy == "best" and (evaluation is None or not evaluation.save_best):
            raise ConfigError("strategy: best pushes each new best model: it needs evaluation.save_best",
                              key="push_to_hub.strategy")
        for section, hooks in (("log_config.hooks", self.log_config.hooks), ("custom_hooks", self.custom_hooks)):
            for i, hook in enumerate(hooks):
                if "priority" in hook:
                    get_priority(hook["priority"], f"{section}.{i}.priority")


_FP16_HINT = ("mixed precision is `mixed_precision: fp16` here (Accelerate's dynamic loss scaler; bf16 needs no "
              "scaler), with `optimizer_config: {grad_clip: ...}` for clipping")


def mmcv_habits(data: dict) -> None:
    """mmcv's spellings of what seg-accel says otherwise: one line pointing at the key to use."""
    if "fp16" in data:
        raise ConfigError(f"mmcv's `fp16 = dict(loss_scale=...)` is not a seg-accel key: {_FP16_HINT}; remove fp16",
                          key="fp16")
    step = data.get("optimizer_config")
    if isinstance(step, dict) and step.get("type", "OptimizerHook") != "OptimizerHook":
        hook = str(step["type"])
        hint = _FP16_HINT if "Fp16" in hook else ("gradient accumulation is `gradient_accumulation_steps: N`"
                                                 if "Cumulative" in hook else "the optimizer step is built in")
        raise ConfigError(f"{hook} is mmcv's; here: {hint}", key="optimizer_config.type")


def parse_train_config(data: dict) -> TrainConfig:
    """Types, required keys and value ranges of a resolved config dict (no registry, no model)."""
    mmcv_habits(data)
    return parse_section(data, TrainConfig, None)
