"""MMSegmentation's vocabularies turned into seg-accel's config: 0.x and 1.x keys, dataset types,
pipeline steps and the SegFormer model section (docs/configs.md, "MMSegmentation's Python
configs", has the table).

``translate`` runs on every resolved config. A YAML config in seg-accel's own keys passes
unchanged. What it maps:

- the 1.x keys (``optim_wrapper``, ``param_scheduler``, ``train_cfg``, ``default_hooks``,
  ``train_dataloader``, ``val_evaluator``, ``data_preprocessor``, ...) to seg-accel's
  (``optimizer``, ``lr_config: {policy: chain}``, ``runner``, ``checkpoint_config``, ``data``,
  ``evaluation``, the pipelines' ``Normalize`` and ``Pad``, ...);
- MMSegmentation's dataset types (``CityscapesDataset``) to ``CustomDataset`` with the classes,
  palette and file suffixes of seg-accel's dataset config of the same data;
- MMSegmentation's bookkeeping pipeline steps (``LoadImageFromFile``, ``LoadAnnotations``,
  ``PackSegInputs``, ``DefaultFormatBundle``, ``Collect``, ``MultiScaleFlipAug``,
  ``TestTimeAug``) and 0.x ``Resize(img_scale=...)``;
- ``MixVisionTransformer`` + ``SegformerHead`` to transformers' SegFormer of the same sizes;
- the top-level names of ``.py`` files that are no config key but are read by other lines
  (``crop_size``, ``norm_cfg``, ``train_pipeline``: MMSegmentation's variables) are dropped.

A key with no seg-accel meaning is a ConfigError naming it and its file; keys that only
concern MMSegmentation's own machinery (``default_scope``, ``visualizer``, ``log_processor``,
...) are dropped and listed in one notice. ``Mapped.notes`` says, per seg-accel key, where it
came from (``convert-config`` writes them as comments).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from seg_accel.config.limits import PACKAGED_CONFIGS, forget_origins, record_origins
from seg_accel.errors import ConfigError, did_you_mean

# the keys of MMSegmentation 1.x (mmengine) configs that map to seg-accel's
KEYS_1X = ("optim_wrapper", "param_scheduler", "train_cfg", "val_cfg", "test_cfg", "default_hooks", "vis_backends",
           "train_dataloader", "val_dataloader", "test_dataloader", "val_evaluator", "test_evaluator", "randomness",
           "env_cfg", "resume")
# keys of MMSegmentation's own machinery: nothing to do in seg-accel (listed in one notice)
MACHINERY = {
    "default_scope": "the registry scope of OpenMMLab projects",
    "visualizer": "MMSegmentation's visualizer (seg-accel's loggers come from vis_backends / log_config)",
    "log_processor": "how mmengine formats log lines",
    "log_level": "mmengine's logging level",
    "dist_params": "mmcv's launcher settings (Accelerate launches)",
    "opencv_num_threads": "OpenCV's threads (seg-accel decodes with Pillow)",
    "mp_start_method": "the workers' start method (PyTorch's default)",
    "cudnn_benchmark": "cuDNN autotuning (PyTorch's default)",
    "tta_model": "MMSegmentation's --tta model (seg-accel's aug-test is model.test_cfg: img_ratios, flip)",
    "tta_pipeline": "MMSegmentation's --tta pipeline (seg-accel's aug-test is model.test_cfg: img_ratios, flip)",
    "launcher": "the launcher (Accelerate launches)",
    "backend_args": "mmengine's file backends (seg-accel reads local paths and hf://)",
    "gpu_ids": "the GPUs (accelerate launch --num-processes / CUDA_VISIBLE_DEVICES)",
}
BOOKKEEPING_STEPS = ("LoadImageFromFile", "LoadImageFromNDArray", "PackSegInputs", "DefaultFormatBundle", "Collect",
                     "ImageToTensor", "ToTensor", "LoadAnnotations")
# MMSegmentation dataset types -> seg-accel's dataset config of the same data (classes, palette, suffixes)
DATASET_CONFIGS = {
    "CityscapesDataset": "_base_/datasets/cityscapes.yaml", "ADE20KDataset": "_base_/datasets/ade20k.yaml",
    "PascalVOCDataset": "_base_/datasets/pascal_voc12.yaml",
    "PascalContextDataset59": "_base_/datasets/pascal_context_59.yaml",
    "DRIVEDataset": "_base_/datasets/drive.yaml", "STAREDataset": "_base_/datasets/stare.yaml",
    "ChaseDB1Dataset": "_base_/datasets/chase_db1.yaml", "HRFDataset": "_base_/datasets/hrf.yaml",
    "LoveDADataset": "_base_/datasets/loveda.yaml", "PotsdamDataset": "_base_/datasets/potsdam.yaml",
    "COCOStuffDataset": "_base_/datasets/coco-stuff164k.yaml",
}
DATASET_DEFAULT_KEYS = ("classes", "palette", "img_suffix", "seg_map_suffix", "reduce_zero_label", "label_map")
# MMSegmentation components seg-accel does not build, and what it offers instead
NOT_BUILT = {
    "SwinTransformer": "it offers UperNetForSemanticSegmentation with a Swin backbone (configs/upernet)",
    "VisionTransformer": "it offers DPTForSemanticSegmentation and BeitForSemanticSegmentation (configs/dpt, beit)",
    "BEiT": "it offers BeitForSemanticSegmentation (configs/beit)",
    "MAE": "it offers BeitForSemanticSegmentation (configs/beit)",
    "ConvNeXt": "it offers UperNetForSemanticSegmentation with a ConvNeXt backbone (configs/upernet)",
    "HRNet": "it offers smp models on timm's HRNet encoders (encoder_name: tu-hrnet_w18)",
    "MobileNetV2": "it offers smp's DeepLabV3Plus with encoder_name: mobilenet_v2",
    "MobileNetV3": "it offers smp models on timm's MobileNetV3 encoders (encoder_name: tu-mobilenetv3_large_100)",
    "ResNeSt": "it offers smp models on timm's ResNeSt encoders (encoder_name: tu-resnest50d)",
    "MixVisionTransformer": "it offers SegformerForSemanticSegmentation (MixVisionTransformer with SegformerHead maps "
                            "to it)",
    "CascadeEncoderDecoder": "it offers EncoderDecoder (one decode head and an auxiliary head)",
    "SegformerHead": "it offers SegformerForSemanticSegmentation (MixVisionTransformer with SegformerHead maps to it)",
    "Mask2FormerHead": "Mask2Former is not yet a seg-accel family",
    "MaskFormerHead": "MaskFormer is not yet a seg-accel family",
}
# MMEngine's parameter schedulers seg-accel runs (seg_accel.optim.chains)
SCHEDULER_KINDS = ("Linear", "Constant", "Exponential", "Poly", "CosineAnnealing", "MultiStep", "Step", "OneCycle")


def scheduler_names() -> list[str]:
    return [k + "LR" for k in SCHEDULER_KINDS] + [k + "Momentum" for k in SCHEDULER_KINDS if k != "OneCycle"]


def scheduler_target(name: str) -> str | None:
    """``lr`` for ``PolyLR``, ``momentum`` for ``PolyMomentum``, None for a name not supported."""
    if name in scheduler_names():
        return "lr" if name.endswith("LR") else "momentum"
    return None


# what seg-accel's EncoderDecoder builds (seg_accel.models.mmseg_backbones.BACKBONES, mmseg_heads.HEADS;
# tests/unit/test_pyconfig.py keeps them equal)
ENCODER_DECODER_BACKBONES = ("ResNet", "ResNetV1c", "ResNetV1d", "UNet")
ENCODER_DECODER_HEADS = ("FCNHead", "PSPHead", "ASPPHead", "DepthwiseSeparableASPPHead", "UPerHead")
MMSEG_SEGMENTORS = ("EncoderDecoder", "CascadeEncoderDecoder", "DepthEstimator", "SegTTAModel",
                    "MultimodalEncoderDecoder")
OTHER_NETWORKS = ("for other networks seg-accel has transformers' *ForSemanticSegmentation models (SegFormer, "
                  "UperNet, DPT, BEiT) and smp's (docs/models.md)")
MIT_WEIGHTS = re.compile(r"mit[_-]?(b[0-5])")


@dataclass
class Mapped:
    """What translation did: ``notes[key]`` says where a seg-accel key came from; ``notices``
    are shown at start; ``variables`` are the dropped ``.py`` variables."""

    notes: dict[str, str] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)
    variables: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


class _Translation:
    def __init__(self, data: dict, origins: dict[str, str], filename: str, lines: dict[str, int] | None = None):
        self.data, self.origins, self.filename = data, origins, filename
        self.lines = lines or {}
        self.mapped = Mapped()
        self.from_1x = False

    # ------------------------------------------------------------------ helpers
    def origin(self, key: str) -> str:
        while key:
            if key in self.origins:
                return self.origins[key]
            key = key.rpartition(".")[0]
        return self.filename

    def error(self, message: str, key: str) -> ConfigError:
        top = key.split(".")[0]
        line = self.lines.get(f"{self.origin(key)}:{top}")
        return ConfigError((f"line {line}: " if line else "") + message, key=key, file=self.origin(key))

    def put(self, key: str, value: Any, source: str, note: str | None = None) -> None:
        """Set ``key`` (dotted) to ``value``, from the file of ``source``."""
        file = self.origin(source)
        node = self.data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                node[part] = {}
                self.origins.setdefault(".".join(parts[: i + 1]), file)
            node = node[part]
        node[parts[-1]] = value
        forget_origins(key, self.origins)
        record_origins(value, key, file, self.origins)
        self.mapped.notes[key] = note or f"from {source} (MMSegmentation 1.x)"

    def pop(self, key: str) -> Any:
        return self.data.pop(key, None)

    def ignore(self, key: str, why: str) -> None:
        self.mapped.ignored.append(f"{key} ({why})")

    def allow(self, section: dict, key: str, allowed: tuple[str, ...], what: str = "") -> None:
        unknown = [k for k in section if k not in allowed]
        if unknown:
            raise self.error(f"'{unknown[0]}' has no seg-accel meaning here{what}." + did_you_mean(
                str(unknown[0]), allowed), f"{key}.{unknown[0]}")

    # ------------------------------------------------------------------ top level
    def variables(self, py_names: dict[str, str], names_read: set[str]) -> None:
        from seg_accel.config.schema import TrainConfig

        own = {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("resolved")}
        known = own | set(KEYS_1X) | set(MACHINERY)
        if "optim_wrapper" in self.data and "optimizer" in py_names and "optimizer" in self.data:
            if self.data["optimizer"] != self.data["optim_wrapper"].get("optimizer"):
                self.mapped.notices.append("the top-level variable `optimizer` differs from optim_wrapper.optimizer, "
                                           "which MMSegmentation 1.x trains with, and so does seg-accel")
            self.data.pop("optimizer")
        for name, file in py_names.items():
            if name in known or name not in self.data:
                continue
            # a typo of a key (optimzer): nearly the key; MMSegmentation's own variables are not (crop_size)
            close = difflib.get_close_matches(name, sorted(own | set(KEYS_1X)), n=3, cutoff=0.85)
            if name in names_read or not close:
                # read by another line (crop_size, norm_cfg), or unread but like no key (a leftover variable)
                self.data.pop(name)
                self.mapped.variables.append(name)
                continue
            raise ConfigError(f"unknown top-level key '{name}': not a seg-accel or MMSegmentation key, and no line "
                              f"reads it as a variable. Did you mean: {', '.join(close)}?",
                              key=name, file=file)

    def machinery(self) -> None:
        for name in list(self.data):
            if name in MACHINERY:
                value = self.data.pop(name)
                if name == "visualizer" and isinstance(value, dict) and "vis_backends" in value \
                        and "vis_backends" not in self.data:
                    self.data["vis_backends"] = value["vis_backends"]
                    self.origins.setdefault("vis_backends", self.origin(name))
                self.ignore(name, MACHINERY[name])

    # ------------------------------------------------------------------ 1.x sections
    def optim_wrapper(self) -> None:
        wrapper = self.pop("optim_wrapper")
        if wrapper is None:
            return
        key = "optim_wrapper"
        kind = wrapper.get("type", "OptimWrapper")
        if kind not in ("OptimWrapper", "AmpOptimWrapper"):
            raise self.error(f"{kind} has no seg-accel equivalent (OptimWrapper; AmpOptimWrapper for mixed precision)",
                             f"{key}.type")
        self.allow(wrapper, key, ("type", "optimizer", "clip_grad", "paramwise_cfg", "accumulative_counts",
                                  "constructor", "loss_scale", "dtype"))
        optimizer = wrapper.get("optimizer")
        if not isinstance(optimizer, dict):
            raise self.error("needs optimizer=dict(type=..., lr=...)", f"{key}.optimizer")
        optimizer = dict(optimizer)
        for name in ("paramwise_cfg", "constructor"):
            if wrapper.get(name) is not None:
                optimizer[name] = wrapper[name]
        self.put("optimizer", optimizer, f"{key}.optimizer")
        clip = wrapper.get("clip_grad")
        if clip is not None:
            if not isinstance(clip, dict) or clip.get("type", "norm") != "norm":
                raise self.error("seg-accel clips the gradient norm: clip_grad=dict(max_norm=..., norm_type=2)",
                                 f"{key}.clip_grad")
            self.allow(clip, f"{key}.clip_grad", ("type", "max_norm", "norm_type"))
            self.put("optimizer_config", {"grad_clip": {k: v for k, v in clip.items() if k != "type"}},
                     f"{key}.clip_grad")
        elif "optimizer_config" not in self.data:
            self.put("optimizer_config", {}, key)
        if wrapper.get("accumulative_counts") is not None:
            self.put("gradient_accumulation_steps", wrapper["accumulative_counts"], f"{key}.accumulative_counts")
        if kind == "AmpOptimWrapper":
            dtype = str(wrapper.get("dtype") or "float16")
            if dtype not in ("float16", "fp16", "bfloat16", "bf16"):
                raise self.error(f"dtype must be float16 or bfloat16, got {dtype!r}", f"{key}.dtype")
            scale = wrapper.get("loss_scale", "dynamic")
            if scale != "dynamic":
                raise self.error(f"seg-accel scales fp16 losses dynamically (Accelerate's scaler); "
                                 f"loss_scale={scale!r} cannot be kept: remove it", f"{key}.loss_scale")
            self.put("mixed_precision", "bf16" if dtype.startswith("b") else "fp16", f"{key}.type",
                     f"from {key}.type: AmpOptimWrapper (MMSegmentation 1.x)")

    def param_scheduler(self) -> None:
        value = self.pop("param_scheduler")
        if value is None:
            return
        key = "param_scheduler"
        items = [value] if isinstance(value, dict) else value
        if not isinstance(items, list):
            raise self.error(f"expected a scheduler dict or a list of them, got {value!r}", key)
        chains: dict[str, list[dict]] = {"lr": [], "momentum": []}
        for i, item in enumerate(items):
            where = f"{key}.{i}" if isinstance(value, list) else key
            if not isinstance(item, dict) or "type" not in item:
                raise self.error(f"expected dict(type=..., ...), got {item!r}", where)
            if item.get("convert_to_iter_based"):
                raise self.error("convert_to_iter_based is not supported: give begin/end in iterations with "
                                 "by_epoch=False", f"{where}.convert_to_iter_based")
            item = {k: v for k, v in item.items() if k not in ("convert_to_iter_based", "verbose")}
            name = str(item["type"])
            target = scheduler_target(name)
            if target is None:
                raise self.error(f"unknown scheduler {name!r}." + did_you_mean(name, scheduler_names()),
                                 f"{where}.type")
            chains[target].append(item)
        for target, section in (("lr", "lr_config"), ("momentum", "momentum_config")):
            if chains[target]:
                by_epoch = bool(chains[target][0].get("by_epoch", True))
                self.put(section, {"policy": "chain", "by_epoch": by_epoch, "schedulers": chains[target]}, key,
                         f"from {key} (MMSegmentation 1.x; its {target} schedulers, chained as MMEngine does)")

    def loops(self) -> None:
        train = self.pop("train_cfg")
        val_interval = None
        if train is not None:
            key = "train_cfg"
            kind = train.get("type")
            by_epoch = train.get("by_epoch")
            epochs = kind == "EpochBasedTrainLoop" or (kind is None and by_epoch is True)
            if kind not in (None, "IterBasedTrainLoop", "EpochBasedTrainLoop"):
                raise self.error(f"{kind} has no seg-accel equivalent (IterBasedTrainLoop, EpochBasedTrainLoop)",
                                 f"{key}.type")
            self.allow(train, key, ("type", "by_epoch", "max_iters", "max_epochs", "val_interval", "val_begin"))
            if train.get("val_begin", 1) not in (0, 1):
                raise self.error("seg-accel evaluates from the first val_interval on; val_begin cannot be kept",
                                 f"{key}.val_begin")
            runner = {"type": "EpochBasedRunner", "max_epochs": train.get("max_epochs")} if epochs else \
                {"type": "IterBasedRunner", "max_iters": train.get("max_iters")}
            self.put("runner", runner, key)
            val_interval = train.get("val_interval", 1 if epochs else 1000)  # mmengine's loops' defaults
        for name, loop in (("val_cfg", "ValLoop"), ("test_cfg", "TestLoop")):
            section = self.pop(name)
            if section is None:
                continue
            if isinstance(section, dict) and "mode" in section and name == "test_cfg":
                self.put("model.test_cfg", section, name, f"from the top-level {name} (old MMSegmentation)")
                continue
            if not isinstance(section, dict) or section.get("type", loop) != loop:
                raise self.error(f"expected dict(type='{loop}'), got {section!r}", name)
            self.allow(section, name, ("type", "fp16"))
            self.ignore(name, f"the {loop}: seg-accel's evaluation loop is built in")
        self.val_interval = val_interval

    def hooks(self) -> None:
        hooks = self.pop("default_hooks")
        if hooks is not None:
            key = "default_hooks"
            self.allow(hooks, key, ("timer", "logger", "param_scheduler", "checkpoint", "sampler_seed",
                                    "visualization", "runtime_info"))
            for name in ("timer", "param_scheduler", "sampler_seed", "runtime_info"):
                if name in hooks:
                    self.ignore(f"{key}.{name}", "built in")
            logger = hooks.get("logger")
            if logger is not None:
                self.allow(logger, f"{key}.logger", ("type", "interval", "log_metric_by_epoch", "ignore_last"))
                if "interval" in logger:
                    self.put("log_config.interval", logger["interval"], f"{key}.logger.interval")
            checkpoint = hooks.get("checkpoint", {"interval": None})
            if checkpoint is None:
                self.data.pop("checkpoint_config", None)
            elif checkpoint.get("interval") is not None:
                self.allow(checkpoint, f"{key}.checkpoint", ("type", "interval", "by_epoch", "max_keep_ckpts",
                                                            "save_optimizer", "save_last", "out_dir", "save_best",
                                                            "rule"))
                ckpt = {k: checkpoint[k] for k in ("by_epoch", "interval", "max_keep_ckpts", "save_optimizer",
                                                   "save_last", "out_dir") if k in checkpoint}
                self.put("checkpoint_config", ckpt, f"{key}.checkpoint")
                self.best = {k: checkpoint[k] for k in ("save_best", "rule") if k in checkpoint}
            visualization = hooks.get("visualization")
            if visualization is not None:
                if visualization.get("draw"):
                    self.mapped.notices.append("default_hooks.visualization draw=True: seg-accel draws overlays "
                                               "with `seg-accel evaluate CONFIG --show-dir DIR`")
                self.ignore(f"{key}.visualization", "overlays come from evaluate --show-dir")
        backends = self.pop("vis_backends")
        if backends is not None:
            names = {"LocalVisBackend": "TextLoggerHook", "TensorboardVisBackend": "TensorboardLoggerHook",
                     "WandbVisBackend": "WandbLoggerHook", "MLflowVisBackend": "MlflowLoggerHook"}
            loggers = [{"type": "TextLoggerHook", "by_epoch": False}]
            for i, backend in enumerate(backends if isinstance(backends, list) else [backends]):
                kind = backend.get("type") if isinstance(backend, dict) else None
                if kind not in names:
                    raise self.error(f"unknown visualization backend {kind!r}." + did_you_mean(str(kind), names),
                                     f"vis_backends.{i}.type")
                if names[kind] != "TextLoggerHook":
                    loggers.append({"type": names[kind]})
            self.put("log_config.hooks", loggers, "vis_backends")

    def dataloaders(self) -> None:
        for split in ("train", "val", "test"):
            loader = self.pop(f"{split}_dataloader")
            if loader is None:
                continue
            key = f"{split}_dataloader"
            self.allow(loader, key, ("batch_size", "num_workers", "persistent_workers", "pin_memory", "sampler",
                                     "dataset", "drop_last", "collate_fn"))
            if loader.get("collate_fn", {"type": "pseudo_collate"}).get("type") not in ("pseudo_collate",
                                                                                        "default_collate"):
                raise self.error("seg-accel batches with its own collate", f"{key}.collate_fn")
            sampler = loader.get("sampler") or {}
            if sampler.get("type", "DefaultSampler") not in ("DefaultSampler", "InfiniteSampler"):
                raise self.error(f"{sampler['type']} has no seg-accel equivalent (DefaultSampler, InfiniteSampler)",
                                 f"{key}.sampler.type")
            if split == "train":
                for src, dst in (("batch_size", "samples_per_gpu"), ("num_workers", "workers_per_gpu"),
                                 ("pin_memory", "pin_memory")):
                    if src in loader:
                        self.put(f"data.{dst}", loader[src], f"{key}.{src}")
                if "shuffle" in sampler:
                    self.put("data.shuffle", bool(sampler["shuffle"]), f"{key}.sampler.shuffle")
            else:
                for src, dst in (("batch_size", "samples_per_gpu"), ("num_workers", "workers_per_gpu")):
                    if src in loader:
                        self.put(f"data.{split}_dataloader.{dst}", loader[src], f"{key}.{src}")
                if "persistent_workers" in loader and split == "val":
                    self.put("data.persistent_workers", bool(loader["persistent_workers"]),
                             f"{key}.persistent_workers")
            if loader.get("dataset") is not None:
                self.put(f"data.{split}", loader["dataset"], f"{key}.dataset")

    def evaluators(self) -> None:
        found = {}
        for split in ("val", "test"):
            evaluator = self.pop(f"{split}_evaluator")
            if evaluator is None:
                continue
            key = f"{split}_evaluator"
            if evaluator.get("type") != "IoUMetric":
                raise self.error(f"{evaluator.get('type')!r} has no seg-accel equivalent (IoUMetric)", f"{key}.type")
            self.allow(evaluator, key, ("type", "iou_metrics", "nan_to_num", "beta", "collect_device", "prefix",
                                        "ignore_index"))
            if evaluator.get("nan_to_num") is not None:
                raise self.error("seg-accel reports a class without pixels as nan (not replaced)", f"{key}.nan_to_num")
            metrics = list(evaluator.get("iou_metrics", ["mIoU"]))
            found[split] = metrics[0] if len(metrics) == 1 else metrics
        if found.get("test") is not None and found.get("val") is not None and found["test"] != found["val"]:
            self.mapped.notices.append("test_evaluator's metrics differ from val_evaluator's; seg-accel evaluates "
                                       f"with {found['val']} (evaluation.metric)")
        metric = found.get("val", found.get("test"))
        if metric is not None or self.val_interval is not None:
            evaluation = {"interval": self.val_interval if self.data.get("data", {}).get("val") is not None else None,
                          "metric": metric or "mIoU"}
            evaluation.update(self.best)
            self.put("evaluation", evaluation, "val_evaluator" if metric is not None else "train_cfg",
                     "from train_cfg.val_interval and val_evaluator (MMSegmentation 1.x)")

    def runtime(self) -> None:
        randomness = self.pop("randomness")
        if randomness is not None:
            self.allow(randomness, "randomness", ("seed", "deterministic", "diff_rank_seed"))
            if randomness.get("diff_rank_seed"):
                raise self.error("seg-accel seeds every process from the one seed (diff_rank_seed cannot be kept)",
                                 "randomness.diff_rank_seed")
            for name in ("seed", "deterministic"):
                if randomness.get(name) is not None:
                    self.put(name, randomness[name], f"randomness.{name}")
        env = self.pop("env_cfg")
        if env is not None:
            self.allow(env, "env_cfg", ("cudnn_benchmark", "mp_cfg", "dist_cfg"))
            dist = env.get("dist_cfg") or {}
            if dist.get("timeout") is not None:
                self.put("dist_timeout", float(dist["timeout"]), "env_cfg.dist_cfg.timeout")
            self.ignore("env_cfg", "cuDNN, multiprocessing and the backend are PyTorch's and Accelerate's")
        resume = self.pop("resume")
        if resume:
            if self.data.get("load_from"):
                self.put("resume_from", self.data.pop("load_from"), "resume", "from load_from with resume=True")
            else:
                self.put("auto_resume", True, "resume", "from resume=True (the newest checkpoint in the work dir)")

    # ------------------------------------------------------------------ data
    def datasets(self) -> None:
        data = self.data.get("data")
        if not isinstance(data, dict):
            return
        preprocessor = None
        model = self.data.get("model")
        if isinstance(model, dict) and isinstance(model.get("data_preprocessor"), dict):
            preprocessor = model.pop("data_preprocessor")
            self.ignore("model.data_preprocessor", "mapped to Normalize and Pad in the pipelines")
        for split in ("train", "val", "test"):
            if isinstance(data.get(split), dict):
                self.dataset(data[split], f"data.{split}", split, preprocessor)

    def dataset(self, ds: dict, key: str, split: str, preprocessor: dict | None) -> None:
        kind = ds.get("type")
        if kind in DATASET_CONFIGS:
            shipped = yaml.safe_load((PACKAGED_CONFIGS / DATASET_CONFIGS[kind]).read_text())  # seg-accel's own file
            defaults = shipped["data"]["train"]
            ds["type"] = "CustomDataset"
            for name in DATASET_DEFAULT_KEYS:
                if name in defaults and name not in ds:
                    ds[name] = copy.deepcopy(defaults[name])
            self.mapped.notes[f"{key}.type"] = f"{kind}: seg-accel's {DATASET_CONFIGS[kind]} gives classes, palette " \
                                               "and suffixes"
        prefix = ds.pop("data_prefix", None)
        if prefix is not None:
            ds["img_dir"] = prefix.get("img_path", "")
            ds["ann_dir"] = prefix.get("seg_map_path", "")
            self.mapped.notes[f"{key}.img_dir"] = "from data_prefix (MMSegmentation 1.x)"
        if "ann_file" in ds:
            ann = ds.pop("ann_file")
            if ann:
                ds["split"] = ann
        meta = ds.pop("metainfo", None)
        if meta:
            for name in ("classes", "palette"):
                if name in meta:
                    ds[name] = list(meta[name])
        for name in ("backend_args", "serialize_data", "lazy_init", "test_mode", "filter_cfg", "max_refetch"):
            if name in ds:
                ds.pop(name)
                self.ignore(f"{key}.{name}", "mmengine dataset machinery")
        if "ignore_index" in ds:
            raise self.error("the ignored label is model.decode_head.ignore_index in seg-accel (255 by default)",
                             f"{key}.ignore_index")
        if isinstance(ds.get("pipeline"), list):
            ds["pipeline"] = self.pipeline(ds, ds["pipeline"], f"{key}.pipeline", split, preprocessor)

    def pipeline(self, ds: dict, steps: list, key: str, split: str, preprocessor: dict | None) -> list:
        out: list[dict] = []
        dropped: list[str] = []
        for i, step in enumerate(steps):
            if not isinstance(step, dict):
                out.append(step)
                continue
            kind = step.get("type")
            where = f"{key}.{i}"
            if kind in BOOKKEEPING_STEPS:
                if kind == "LoadAnnotations" and step.get("reduce_zero_label") is not None:
                    ds["reduce_zero_label"] = bool(step["reduce_zero_label"])
                dropped.append(kind)
                continue
            if kind == "MultiScaleFlipAug":
                out.extend(self.multi_scale_flip(step, where, split))
                dropped.append(kind)
                continue
            if kind == "TestTimeAug":
                self.test_time_aug(step, where)
                dropped.append(kind)
                continue
            out.append(self.step(dict(step), where))
        if preprocessor is not None:
            out.extend(self.preprocess(preprocessor, split, out))
        if dropped:
            self.mapped.notes[key] = f"MMSegmentation's {', '.join(dict.fromkeys(dropped))} mapped or dropped"
        return out

    def step(self, step: dict, key: str) -> dict:
        kind = step["type"]
        if kind == "Resize" and "img_scale" in step:  # MMSegmentation 0.x
            scale = step.pop("img_scale")
            ratio = step.pop("ratio_range", None)
            mode = step.pop("multiscale_mode", "range")
            keep = step.pop("keep_ratio", True)
            self.allow(step, key, ("type",), " (0.x Resize: img_scale, ratio_range, multiscale_mode, keep_ratio)")
            nested = isinstance(scale, list) and scale and isinstance(scale[0], list)
            if ratio is not None:
                return {"type": "RandomResize", "scale": scale[0] if nested else scale, "ratio_range": ratio,
                        "keep_ratio": keep}
            if nested and len(scale) > 1:
                if mode == "value":
                    return {"type": "RandomChoiceResize", "scales": scale, "keep_ratio": keep}
                return {"type": "RandomResize", "scale": scale, "keep_ratio": keep}
            return {"type": "Resize", "scale": scale[0] if nested else scale, "keep_ratio": keep}
        if kind in ("RandomResize", "RandomChoiceResize") and "resize_type" in step:
            if step.pop("resize_type") != "Resize":
                raise self.error("seg-accel resizes with Resize (resize_type='Resize')", f"{key}.resize_type")
            step.pop("resize_cfg", None)
        if kind == "RandomFlip" and "flip_ratio" in step:
            step["prob"] = step.pop("flip_ratio")
        return step

    def multi_scale_flip(self, step: dict, key: str, split: str) -> list[dict]:
        self.allow(step, key, ("type", "img_scale", "img_ratios", "flip", "flip_direction", "transforms", "scale"))
        scale = step.get("img_scale", step.get("scale"))
        out: list[dict] = []
        for j, inner in enumerate(step.get("transforms", [])):
            kind = inner.get("type")
            if kind in BOOKKEEPING_STEPS or kind == "RandomFlip":
                continue
            if kind == "Resize":
                if scale is not None:
                    out.append({"type": "Resize", "scale": scale, "keep_ratio": inner.get("keep_ratio", True)})
                continue
            out.append(self.step(dict(inner), f"{key}.transforms.{j}"))
        ratios, flip = step.get("img_ratios"), bool(step.get("flip", False))
        if split != "train" and (flip or (ratios not in (None, [1.0], 1.0))):
            test_cfg = {"img_ratios": ratios if isinstance(ratios, list) else [ratios or 1.0], "flip": flip}
            self.put("model.test_cfg", {**self.data.get("model", {}).get("test_cfg", {}), **test_cfg}, key,
                     "from MultiScaleFlipAug (img_ratios, flip)")
        return out

    def test_time_aug(self, step: dict, key: str) -> None:
        ratios, flip = [], False
        for group in step.get("transforms", []):
            for inner in group if isinstance(group, list) else [group]:
                if inner.get("type") == "Resize" and "scale_factor" in inner:
                    ratios.append(inner["scale_factor"])
                if inner.get("type") == "RandomFlip" and inner.get("prob", 0) == 1:
                    flip = True
        self.put("model.test_cfg", {**self.data.get("model", {}).get("test_cfg", {}),
                                    "img_ratios": ratios or [1.0], "flip": flip}, key,
                 "from TestTimeAug (scale factors, flip)")

    def preprocess(self, pre: dict, split: str, steps: list[dict]) -> list[dict]:
        key = "model.data_preprocessor"
        self.allow(pre, key, ("type", "mean", "std", "bgr_to_rgb", "rgb_to_bgr", "pad_val", "seg_pad_val", "size",
                              "size_divisor", "test_cfg"))
        if pre.get("type", "SegDataPreProcessor") != "SegDataPreProcessor":
            raise self.error(f"{pre['type']} has no seg-accel equivalent (SegDataPreProcessor)", f"{key}.type")
        if pre.get("rgb_to_bgr"):
            raise self.error("seg-accel feeds RGB images; rgb_to_bgr cannot be kept", f"{key}.rgb_to_bgr")
        out = []
        if pre.get("mean") is not None:
            if any(s.get("type") == "Normalize" for s in steps):
                raise self.error("the pipeline normalizes already (a Normalize step) and data_preprocessor too",
                                 f"{key}.mean")
            out.append({"type": "Normalize", "mean": list(pre["mean"]), "std": list(pre.get("std") or [1, 1, 1]),
                        "to_rgb": bool(pre.get("bgr_to_rgb", False))})
        if split == "train" and (pre.get("size") is not None or pre.get("size_divisor") is not None):
            pad = {"type": "Pad", "pad_val": pre.get("pad_val", 0), "seg_pad_val": pre.get("seg_pad_val", 255)}
            if pre.get("size") is not None:
                w_h = list(pre["size"])
                pad["size"] = w_h
            else:
                pad["size_divisor"] = pre["size_divisor"]
            out.append(pad)
        return out

    # ------------------------------------------------------------------ model
    def model(self) -> None:
        model = self.data.get("model")
        if not isinstance(model, dict):
            return
        segformer = self._segformer(model)
        from_py = self.origin("model.type").endswith(".py") or self.origin("model.backbone.type").endswith(".py")
        for part in ("type", "backbone.type", "decode_head.type", "auxiliary_head.type"):
            node: Any = model
            for p in part.split("."):
                node = node.get(p) if isinstance(node, dict) else None
            if not isinstance(node, str) or segformer:
                continue
            offer = NOT_BUILT.get(node)
            known = {"type": MMSEG_SEGMENTORS[:1], "backbone.type": ENCODER_DECODER_BACKBONES}.get(
                part, ENCODER_DECODER_HEADS)
            mmseg_model = model.get("type") in MMSEG_SEGMENTORS
            if offer is None and from_py and mmseg_model and node not in known:
                offer = OTHER_NETWORKS
            if offer is not None:
                builds = (f" (its EncoderDecoder builds the backbones {', '.join(ENCODER_DECODER_BACKBONES)} with the "
                          f"heads {', '.join(ENCODER_DECODER_HEADS)})") if part != "type" else ""
                raise self.error(f"MMSegmentation's {node} is not built by seg-accel{builds}; {offer}",
                                 f"model.{part}")
        test_cfg = model.get("test_cfg")
        if isinstance(test_cfg, dict):
            for name in ("crop_size", "stride"):  # MMSegmentation takes one number for a square
                if isinstance(test_cfg.get(name), int) and not isinstance(test_cfg[name], bool):
                    test_cfg[name] = [test_cfg[name], test_cfg[name]]
        if self._segformer(model):
            self.segformer(model)

    @staticmethod
    def _segformer(model: dict) -> bool:
        return model.get("type") == "EncoderDecoder" and (model.get("backbone") or {}).get("type") == \
            "MixVisionTransformer" and (model.get("decode_head") or {}).get("type") == "SegformerHead"

    def segformer(self, model: dict) -> None:
        key = "model"
        backbone, head = dict(model["backbone"]), dict(model["decode_head"])
        self.allow(backbone, f"{key}.backbone", ("type", "in_channels", "embed_dims", "num_stages", "num_layers",
                                                 "num_heads", "patch_sizes", "strides", "sr_ratios", "out_indices",
                                                 "mlp_ratio", "qkv_bias", "drop_rate", "attn_drop_rate",
                                                 "drop_path_rate", "act_cfg", "norm_cfg", "pretrained", "init_cfg",
                                                 "with_cp"), " (MixVisionTransformer)")
        self.allow(head, f"{key}.decode_head", ("type", "in_channels", "in_index", "channels", "dropout_ratio",
                                                "num_classes", "norm_cfg", "align_corners", "loss_decode",
                                                "interpolate_mode", "ignore_index", "sampler", "act_cfg",
                                                "init_cfg"), " (SegformerHead)")
        if model.get("auxiliary_head"):
            raise self.error("transformers' SegFormer has no auxiliary head", f"{key}.auxiliary_head")
        if backbone.get("qkv_bias", True) is not True:
            raise self.error("transformers' SegFormer always has query/key/value biases", f"{key}.backbone.qkv_bias")
        if (backbone.get("act_cfg") or {"type": "GELU"}).get("type") != "GELU":
            raise self.error("transformers' SegFormer uses GELU", f"{key}.backbone.act_cfg")
        embed = backbone.get("embed_dims", 64)
        heads = list(backbone.get("num_heads", [1, 2, 4, 8]))
        stages = backbone.get("num_stages", 4)
        mlp = backbone.get("mlp_ratio", 4)
        config = {
            "num_channels": backbone.get("in_channels", 3),
            "num_encoder_blocks": stages,
            "hidden_sizes": [embed * h for h in heads],
            "depths": list(backbone.get("num_layers", [3, 4, 6, 3])),
            "num_attention_heads": heads,
            "sr_ratios": list(backbone.get("sr_ratios", [8, 4, 2, 1])),
            "patch_sizes": list(backbone.get("patch_sizes", [7, 3, 3, 3])),
            "strides": list(backbone.get("strides", [4, 2, 2, 2])),
            "mlp_ratios": [mlp] * stages,
            "hidden_dropout_prob": backbone.get("drop_rate", 0.0),
            "attention_probs_dropout_prob": backbone.get("attn_drop_rate", 0.0),
            "drop_path_rate": backbone.get("drop_path_rate", 0.0),
            "decoder_hidden_size": head.get("channels", 256),
            "classifier_dropout_prob": head.get("dropout_ratio", 0.1),
        }
        if head.get("in_channels") is not None and list(head["in_channels"]) != config["hidden_sizes"]:
            raise self.error(f"SegformerHead reads the encoder's {config['hidden_sizes']} channels; in_channels says "
                             f"{list(head['in_channels'])}", f"{key}.decode_head.in_channels")
        if list(head.get("in_index", range(stages))) != list(range(stages)):
            raise self.error(f"SegFormer's head reads all {stages} stages (in_index {list(range(stages))})",
                             f"{key}.decode_head.in_index")
        new: dict[str, Any] = {"type": "SegformerForSemanticSegmentation"}
        weights = backbone.get("pretrained") or model.get("pretrained") or \
            (backbone.get("init_cfg") or {}).get("checkpoint")
        if weights:
            match = MIT_WEIGHTS.search(str(weights))
            if match:
                new["pretrained"] = f"nvidia/mit-{match.group(1)}"
            else:
                new["pretrained"] = weights
        new["config"] = config
        decode = {k: head[k] for k in ("align_corners", "loss_decode", "ignore_index", "sampler", "num_classes")
                  if k in head}
        new["decode_head"] = decode
        for name in ("test_cfg",):
            if model.get(name):
                new[name] = model[name]
        if (head.get("norm_cfg") or {}).get("type") == "SyncBN" and "sync_bn" not in self.data:
            self.put("sync_bn", True, "model.decode_head.norm_cfg", "from SegformerHead norm_cfg SyncBN")
        self.data["model"] = new
        self.mapped.notes["model"] = "MixVisionTransformer + SegformerHead -> transformers' SegFormer" + \
            (f" (weights {new['pretrained']})" if "pretrained" in new else "")

    def run(self, py_names: dict[str, str], names_read: set[str]) -> Mapped:
        self.from_1x = any(k in self.data for k in KEYS_1X)
        self.val_interval = None
        self.best: dict[str, Any] = {}
        self.variables(py_names, names_read)
        self.machinery()
        self.optim_wrapper()
        self.param_scheduler()
        self.loops()
        self.hooks()
        self.dataloaders()
        self.evaluators()
        self.runtime()
        self.datasets()
        self.model()
        if self.mapped.ignored:
            self.mapped.notices.append("ignored (MMSegmentation's own machinery; docs/configs.md says why): " +
                                       ", ".join(item.split(" (")[0] for item in self.mapped.ignored))
        if self.mapped.variables:
            self.mapped.notices.append("variables of the .py files (not config keys): " +
                                       ", ".join(sorted(set(self.mapped.variables))))
        return self.mapped


def translate(data: dict, origins: dict[str, str], py_names: dict[str, str], names_read: set[str], filename: str,
              lines: dict[str, int] | None = None) -> tuple[dict, dict[str, str], Mapped]:
    """``data`` in seg-accel's keys (see the module docstring); ``origins`` follow the keys."""
    translation = _Translation(data, origins, filename, lines)
    mapped = translation.run(py_names, names_read)
    return translation.data, translation.origins, mapped
