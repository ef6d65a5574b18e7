"""Prediction on raw, unlabeled images: ``seg_accel.Predictor`` and ``seg-accel predict``.

A ``Predictor`` holds a model, the test pipeline (resize, normalisation) and the inference
settings (``model.test_cfg``: whole or slide, scales, flip). It comes from a training config
plus a checkpoint (``Predictor.from_config``) or from an export alone
(``Predictor.from_export``: the image processor saved beside the weights gives the
normalisation). ``predictor(image)`` returns the class map and the per-class probabilities at
the image's own size; ``predictor.run(inputs, out_dir)`` writes, for every image, a label PNG
(with the palette), an overlay and, if asked, its probability maps, each named after the
source file; under several processes each process takes its share of the images, every image
exactly once.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seg_accel.data.base import image_to_rgb8
from seg_accel.data.images import IMAGE_SUFFIXES, ImageFiles, collect_inputs, output_names  # noqa: F401 (API)
from seg_accel.data.transforms import build_pipeline
from seg_accel.inference.inferencer import Inferencer
from seg_accel.errors import ConfigError, DataError
from seg_accel.metrics.palette import default_palette
from seg_accel.runtime.storage import atomic_file
from seg_accel.threads import one_thread

logger = logging.getLogger("seg_accel")

PROB_FORMATS = ("png", "npy", "safetensors")
MAX_PROCESSOR_SIDE = 8192  # an export's preprocessor_config.json resize, at most (a 8192^2 image: 0.8 GB of float32)


# --------------------------------------------------------------------------- the predictor
@dataclass
class Prediction:
    """One image's prediction at its own size: ``labels`` ``(H, W)`` class ids and ``probs``
    ``(C, H, W)`` softmax probabilities (a 1-channel sigmoid head: ``(1, H, W)``, the
    foreground's probability, ``labels = probs[0] > threshold``)."""

    labels: np.ndarray
    probs: np.ndarray


def _test_pipeline(data_cfg: Any) -> list[dict]:
    """``data.test``'s pipeline, else ``data.val``'s; without either, the training pipeline's
    ``Normalize`` alone."""
    for split in ("test", "val"):
        split_cfg = getattr(data_cfg, split)
        if isinstance(split_cfg, dict) and split_cfg.get("pipeline") is not None:
            return list(split_cfg["pipeline"])
    train = data_cfg.train.get("pipeline") or []
    return [step for step in train if isinstance(step, dict) and step.get("type") == "Normalize"]


def _config_palette(data_cfg: Any, classes: list[str]) -> np.ndarray | None:
    for split in ("test", "val", "train"):
        split_cfg = getattr(data_cfg, split)
        if isinstance(split_cfg, dict) and split_cfg.get("palette") is not None:
            return np.asarray(split_cfg["palette"], dtype=np.uint8)
    return None


def pipeline_from_processor(folder: Path) -> list[dict]:
    """The test pipeline an export's ``preprocessor_config.json`` stands for (rescale 1/255 and
    mean/std in 0-1 units -> ``Normalize`` in 0-255 units; a fixed ``size`` -> ``Resize``)."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        logger.warning("%s has no preprocessor_config.json: images are normalised with ImageNet's mean and std",
                       folder)
        from seg_accel.models.processor import IMAGENET_MEAN, IMAGENET_STD

        return [{"type": "Normalize", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}]
    if file.stat().st_size > 1 << 20:
        raise ConfigError(f"{file} is {file.stat().st_size:,} bytes: not an image processor's settings", key="SOURCE")
    try:
        settings = json.loads(file.read_text())
    except ValueError as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}", key="SOURCE") from exc
    if not isinstance(settings, dict):
        raise ConfigError(f"{file} holds {type(settings).__name__}, not a JSON object", key="SOURCE")
    pipeline: list[dict] = []
    if settings.get("do_resize") and isinstance(settings.get("size"), dict) and "height" in settings["size"]:
        size = settings["size"]
        try:
            height, width = int(size["height"]), int(size["width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{file}: size must hold integer height and width, got {size}", key="SOURCE") from exc
        # an export's files are data from elsewhere: its resize sizes every image's memory
        if not (1 <= height <= MAX_PROCESSOR_SIDE and 1 <= width <= MAX_PROCESSOR_SIDE):
            raise ConfigError(f"{file}: size {height}x{width} is outside 1..{MAX_PROCESSOR_SIDE} pixels a side "
                              "(MAX_PROCESSOR_SIDE; a damaged or crafted export?)", key="SOURCE")
        pipeline.append({"type": "Resize", "scale": [width, height], "keep_ratio": False})
    # the processor: (x * rescale_factor - mean) / std; Normalize in 0-255 units: (x - mean') / std'
    factor = float(settings.get("rescale_factor", 1 / 255)) if settings.get("do_rescale", True) else 1.0
    if not isinstance(factor, float) or not 0 < factor <= 1:
        raise ConfigError(f"{file}: rescale_factor must be in (0, 1], got {factor}", key="SOURCE")
    if settings.get("do_normalize", True):
        mean = [m / factor for m in settings.get("image_mean", [0.485, 0.456, 0.406])]
        std = [s / factor for s in settings.get("image_std", [0.229, 0.224, 0.225])]
        pipeline.append({"type": "Normalize", "mean": mean, "std": std})
    elif factor != 1.0:
        pipeline.append({"type": "Normalize", "mean": [0.0] * 3, "std": [1 / factor] * 3})
    return pipeline


class Predictor:
    """Run a segmentation model on images. ``Predictor.load(source, weights=None)`` takes a
    training config (YAML) with a checkpoint or export, a work dir, or an export folder / Hub
    id alone."""

    def __init__(self, model: torch.nn.Module, classes: Sequence[str], pipeline: list[dict] | None = None,
                 test_cfg: Any = None, palette: Any = None, align_corners: bool = False,
                 threshold: float | None = None, device: str | torch.device | None = None, autocast: Any = None,
                 ignore_index: int = 255):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(self.device).eval()
        self.classes = list(classes)
        self.pipeline = list(pipeline or [])
        self.transforms = build_pipeline(self.pipeline, "pipeline")
        self.inferencer = Inferencer(test_cfg, align_corners, autocast, threshold)
        self.palette = np.asarray(palette, dtype=np.uint8) if palette is not None else default_palette(len(self.classes))
        self.ignore_index = ignore_index

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: str | os.PathLike, weights: str, cfg_options: Sequence[str] = (),
                    aug_test: bool = False, device: str | torch.device | None = None,
                    trust_remote_code: bool = False) -> Predictor:
        """A training config (its test pipeline, ``model.test_cfg``, classes, palette) and the
        weights: a checkpoint folder, an export folder or a Hub id."""
        from seg_accel.config import load_config
        from seg_accel.validate import validate_train_config

        raw = load_config(str(config), list(cfg_options))
        cfg = validate_train_config(raw)
        return cls.from_train_config(cfg, weights, aug_test=aug_test, device=device,
                                     trust_remote_code=trust_remote_code)

    @classmethod
    def from_train_config(cls, cfg: Any, weights: str, aug_test: bool = False,
                          device: str | torch.device | None = None, autocast: Any = None,
                          trust_remote_code: bool = False) -> Predictor:
        import dataclasses

        from seg_accel.inference.inferencer import DEFAULT_AUG_RATIOS
        from seg_accel.models import load_model

        model = load_model(str(weights), model_cfg=cfg.model, classes=list(cfg.classes),
                           trust_remote_code=trust_remote_code)
        test_cfg = cfg.model.test_cfg
        if aug_test:
            test_cfg = dataclasses.replace(test_cfg, img_ratios=test_cfg.img_ratios or list(DEFAULT_AUG_RATIOS),
                                           flip=True)
        head = cfg.model.decode_head
        return cls(model, list(cfg.classes), _test_pipeline(cfg.data), test_cfg,
                   _config_palette(cfg.data, list(cfg.classes)), head.align_corners, head.threshold, device,
                   autocast, cfg.ignore_index)

    @classmethod
    def from_export(cls, source: str | os.PathLike, device: str | torch.device | None = None,
                    threshold: float | None = None, trust_remote_code: bool = False) -> Predictor:
        """An export folder or Hub id alone: classes from its ``id2label``, the pipeline from its
        image processor, whole-image inference. Nothing the export names is imported unless
        ``trust_remote_code``."""
        from seg_accel.models import family_of_model, load_model, resolve_export

        try:
            folder = resolve_export(source)
            model = load_model(folder, trust_remote_code=trust_remote_code)
        except (OSError, ImportError, ValueError) as exc:
            raise ConfigError(f"cannot load the model: {exc}", key="SOURCE") from exc
        config = json.loads((folder / "config.json").read_text())
        id2label = family_of_model(model).id2label(config)
        names = [id2label[k] for k in sorted(id2label, key=int)] if id2label else []
        if len(names) == 1:  # a 1-channel sigmoid head: its channel is the second class
            names = ["background", names[0]]
        if not names:
            raise ConfigError(f"{folder}/config.json has no id2label: cannot name the classes", key="SOURCE")
        return cls(model, names, pipeline_from_processor(folder), threshold=threshold, device=device)

    @classmethod
    def load(cls, source: str | os.PathLike, weights: str | None = None, cfg_options: Sequence[str] = (),
             aug_test: bool = False, device: str | torch.device | None = None,
             trust_remote_code: bool = False) -> Predictor:
        """``source``: a config (then ``weights`` is required), a work dir (its config and final
        export, else best/newest checkpoint) or an export folder / Hub id."""
        from seg_accel.runtime.checkpoints import pick_weights
        from seg_accel.runtime.workdir import CONFIG_FILE

        path = Path(source)
        if path.is_dir() and (path / CONFIG_FILE).is_file():
            return cls.from_config(path / CONFIG_FILE, weights or str(pick_weights(path)), cfg_options, aug_test,
                                   device, trust_remote_code)
        if is_config_source(str(source)):
            if weights is None:
                raise ConfigError(f"{source} is a config: give the checkpoint or export to predict with too",
                                  key="CHECKPOINT")
            return cls.from_config(source, weights, cfg_options, aug_test, device, trust_remote_code)
        if weights is not None:
            raise ConfigError(f"{source} is an export: it holds its own weights (no CHECKPOINT)", key="CHECKPOINT")
        return cls.from_export(source, device, trust_remote_code=trust_remote_code)

    # -- prediction -------------------------------------------------------------------------
    def prepare(self, image: Any) -> torch.Tensor:
        """An image (path, PIL image or ``(H, W[, C])`` array) through the test pipeline: ``(3, h, w)``."""
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image

            with Image.open(image) as opened:
                rgb, _ = image_to_rgb8(opened)
        else:
            rgb, _ = image_to_rgb8(image)
        with one_thread():
            results = {"img": torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()}
            rng = np.random.default_rng(0)
            for transform in self.transforms:
                results = transform(results, rng)
        return results["img"].contiguous()

    @torch.no_grad()
    def predict_batch(self, pixel_values: torch.Tensor, size: tuple[int, int],
                      pixel_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels (N, H, W), probs (N, C, H, W))`` at ``size`` for a prepared batch."""
        scores = self.inferencer.scores(self.model, pixel_values.to(self.device), tuple(size),
                                        pixel_mask.to(self.device) if pixel_mask is not None else None)
        if self.inferencer.augmented:  # already averaged probabilities
            probs = scores
        else:
            probs = scores.sigmoid() if scores.shape[1] == 1 else scores.softmax(1)
        if probs.shape[1] == 1:
            return self.inferencer.predict(scores), probs
        # the argmax of the probabilities themselves: where two logits differ by less than float32
        # resolves after the softmax, the saved maps still give the label map back (ties: the lower id)
        return probs.argmax(1), probs

    def __call__(self, image: Any) -> Prediction:
        if isinstance(image, (str, os.PathLike)):
            from PIL import Image

            with Image.open(image) as opened:
                size = (opened.height, opened.width)
        else:
            size = tuple(np.asarray(image).shape[:2])
        labels, probs = self.predict_batch(self.prepare(image)[None], size)
        return Prediction(labels[0].cpu().numpy(), probs[0].float().cpu().numpy())

    def run(self, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, probs: str | None = None,
            probs_dtype: str = "float16", overlays: bool = True, opacity: float = 0.5, accelerator: Any = None,
            samples_per_gpu: int | str = "auto", workers: int = 0, progress: bool = True,
            hub_dataset: dict[str, Any] | None = None) -> list[Path]:
        """Predict every input image (files, folders, globs; or with ``hub_dataset``, ``{"path", "split",
        "name", "image_column"}``, the images of a dataset split); write ``labels/<name>.png``,
        ``overlays/<name>.png`` and with ``probs`` (png, npy or safetensors) ``probs/<name>...`` under
        ``out_dir``. Returns the label PNGs this process wrote (under several processes: its share)."""
        from tqdm.auto import tqdm

        from seg_accel.data import build_val_loader

        if probs is not None and probs not in PROB_FORMATS:
            raise ConfigError(f"must be one of {', '.join(PROB_FORMATS)}, got {probs!r}", key="--probs")
        if probs_dtype not in ("float16", "float32"):
            raise ConfigError(f"must be float16 or float32, got {probs_dtype!r}", key="--probs-dtype")
        if hub_dataset is not None:
            from seg_accel.data.images import HubImages

            dataset = HubImages(hub_dataset["path"], hub_dataset.get("split", "test"), self.classes, self.pipeline,
                                hub_dataset.get("name"), hub_dataset.get("image_column", "image"))
            names = [dataset.sample_name(i) for i in range(len(dataset))]
        else:
            paths = collect_inputs([str(p) for p in inputs])
            out = Path(out_dir).resolve()
            own = [p for p in paths if Path(p).resolve().is_relative_to(out)]
            if own:  # --out inside an input folder: what earlier runs wrote there is not an input
                paths = [p for p in paths if p not in own]
                logger.info("left out %d image(s) under the output folder %s (outputs of an earlier run)", len(own),
                            out_dir)
                if not paths:
                    raise ConfigError(f"every input image is under the output folder {out_dir}", key="INPUTS")
            names = output_names(paths)
            dataset = ImageFiles(paths, self.classes, self.pipeline)
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        loader = build_val_loader(dataset, samples_per_gpu, workers, rank, world, device_type=self.device.type)
        writer = PredictionWriter(Path(out_dir), self.classes, self.palette, probs, probs_dtype, overlays, opacity)
        main = rank == 0
        if main:
            logger.info("predicting %d image(s) on %d process(es) into %s (labels%s%s)", len(dataset), world, out_dir,
                        ", overlays" if overlays else "", f", probabilities as {probs}" if probs else "")
        written: list[Path] = []
        with tqdm(total=len(dataset), desc="predict", disable=not (progress and main), dynamic_ncols=True) as bar:
            for batch in loader:
                try:
                    labels, prob_maps = self.predict_batch(batch["pixel_values"], batch["labels"].shape[-2:],
                                                           batch.get("pixel_mask"))
                except DataError as exc:  # name the images
                    raise DataError(f"{', '.join(names[i] for i in batch['indices'].tolist())}: {exc}") from exc
                for index, label, prob in zip(batch["indices"].tolist(), labels.cpu().numpy(),
                                              prob_maps.float().cpu()):
                    rgb, _ = dataset.read(index) if overlays else (None, None)
                    written.append(writer.write(names[index], label, prob.numpy(), rgb))
                bar.update(len(labels) * world)  # the others advance alike
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return written


def is_config_source(text: str) -> bool:
    """A YAML config file (the command resolves packaged config names before)."""
    return text.endswith((".yaml", ".yml"))


# --------------------------------------------------------------------------- outputs
def save_label_png(path: Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """Class ids as an indexed PNG with the palette (more than 256 classes: 16-bit grey)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if labels.max(initial=0) < 256:
        image = Image.fromarray(labels.astype(np.uint8), mode="P")
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: min(len(palette), 256)] = palette[:256]
        image.putpalette(flat.ravel().tolist())
    else:
        image = Image.fromarray(labels.astype(np.uint16))
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG")


class PredictionWriter:
    """Where and how one image's outputs are written (``run`` and tests use it)."""

    def __init__(self, out_dir: Path, classes: list[str], palette: np.ndarray, probs: str | None,
                 probs_dtype: str = "float16", overlays: bool = True, opacity: float = 0.5):
        self.out_dir, self.classes, self.palette = out_dir, classes, np.asarray(palette, dtype=np.uint8)
        self.probs, self.probs_dtype, self.overlays, self.opacity = probs, probs_dtype, overlays, opacity

    def write(self, name: str, labels: np.ndarray, probs: np.ndarray, rgb: np.ndarray | None) -> Path:
        label_png = self.out_dir / "labels" / f"{name}.png"
        save_label_png(label_png, labels, self.palette)
        if self.overlays and rgb is not None:
            from seg_accel.metrics.palette import overlay_panel

            panel = overlay_panel([("image", rgb), ("prediction", rgb, labels)], self.classes, self.palette,
                                  self.opacity, present=np.unique(labels))
            target = self.out_dir / "overlays" / f"{name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(target) as tmp:
                panel.save(tmp, format="PNG")
        if self.probs is not None:
            self._write_probs(name, probs)
        return label_png

    def _write_probs(self, name: str, probs: np.ndarray) -> None:
        folder = self.out_dir / "probs"
        if self.probs == "png":  # one 8-bit map per class: round(p * 255)
            from PIL import Image

            target = folder / name
            target.mkdir(parents=True, exist_ok=True)
            names = self.classes if probs.shape[0] == len(self.classes) else self.classes[1:]
            for index, (channel, class_name) in enumerate(zip(probs, names)):
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in class_name)
                if not safe.strip(".") or safe.startswith("."):  # "..", "": not a file name of its own
                    safe = f"class{index + len(self.classes) - len(names)}"
                with atomic_file(target / f"{safe}.png") as tmp:
                    Image.fromarray(np.rint(channel * 255).clip(0, 255).astype(np.uint8)).save(tmp, format="PNG")
            return
        array = probs.astype(np.float16 if self.probs_dtype == "float16" else np.float32)
        path = folder / f"{name}.{'npy' if self.probs == 'npy' else 'safetensors'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:  # a full disk leaves the old file or none, never half of one
            if self.probs == "npy":  # serialised first: Python's write reports a full disk as such
                import io

                buffer = io.BytesIO()
                np.save(buffer, array)
                tmp.write_bytes(buffer.getvalue())
            else:
                from safetensors.numpy import save_file

                save_file({"probs": array}, str(tmp), metadata={"classes": json.dumps(self.classes)})
