"""The mask-classification family: transformers' Mask2Former and MaskFormer, for semantic
segmentation.

``model: {type: Mask2FormerForUniversalSegmentation (or MaskFormerForInstanceSegmentation),
config: {...}, pretrained: ...}`` builds transformers' model with the data's labels, like the
transformers family. Such a model predicts ``num_queries`` (class, mask) pairs, so it is not
trained with per-pixel losses: its objective is the Hungarian-matching loss of
``seg_accel.losses.mask_classification`` (weights from ``model.config``: ``class_weight`` /
``cross_entropy_weight``, ``mask_weight``, ``dice_weight``, ``no_object_weight``,
``train_num_points``, ``oversample_ratio``, ``importance_sample_ratio``), over the final decoder
layer and, with ``use_auxiliary_loss``, every intermediate one.

For evaluation and inference the queries become per-class scores as MMSegmentation computes
them (mask logits upsampled to the input, ``sigmoid``, times the class probabilities without
no-object, summed over the queries); the model returns their log as its logits, so that the
argmax is the score's and a softmax gives the scores normalised over the classes (what the
aug-test merge and the probability maps use). The export is transformers' own folder, which
``from_pretrained`` and the image processor's ``post_process_semantic_segmentation`` read.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from seg_accel.errors import ConfigError
from seg_accel.losses.mask_classification import MaskClassificationLoss, MaskLossSettings, image_draw, semantic_targets
from seg_accel.models.families import register_family
from seg_accel.models.hf import TransformersFamily
from seg_accel.models.interface import EXPORT_CONFIG, SegOutput, as_seg_output

if TYPE_CHECKING:
    from seg_accel.config.schema import ModelConfig

logger = logging.getLogger("seg_accel")

ARCHITECTURES = {"Mask2FormerForUniversalSegmentation": "mask2former",
                 "MaskFormerForInstanceSegmentation": "maskformer"}
RAW_OUTPUT = "seg_accel_raw_output"  # set on the model while the objective runs its forward
_SCORE_FLOOR = 1e-8  # the log of a score: no class is -inf


def semantic_scores(class_logits_nqk: torch.Tensor, mask_logits_nqhw: torch.Tensor,
                    size: tuple[int, int]) -> torch.Tensor:
    """Per-class scores ``(N, C, *size)``: ``sum_q softmax(class)[c] * sigmoid(mask upsampled)``
    (MMSegmentation's ``MaskFormerHead.predict``; no-object left out)."""
    masks = F.interpolate(mask_logits_nqhw.float(), size=size, mode="bilinear", align_corners=False).sigmoid()
    probs = class_logits_nqk.float().softmax(-1)[..., :-1]
    return torch.einsum("nqc,nqhw->nchw", probs, masks)


def _semantic_output(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook: the raw output for the objective, else the log scores as the logits."""
    if getattr(model, RAW_OUTPUT, False):
        return output
    pixel_values = args[0] if args else kwargs["pixel_values"]
    scores = semantic_scores(output.class_queries_logits, output.masks_queries_logits,
                             tuple(pixel_values.shape[-2:]))
    return SegOutput(scores.clamp_min(_SCORE_FLOOR).log())


def _decoder_states_for_maskformer(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: transformers' MaskFormer with ``use_auxiliary_loss`` reads its auxiliary
    predictions from the decoder's hidden states but only asks for them when told (5.x raises
    a TypeError in every forward without ``output_hidden_states``)."""
    if model.config.model_type == "maskformer" and model.config.use_auxiliary_loss:
        kwargs = {**kwargs, "output_hidden_states": True}
    return args, kwargs


def install_semantic_output(model: nn.Module) -> nn.Module:
    """The hooks of this family on a built or loaded model (once)."""
    if not getattr(model, "seg_accel_semantic_hook", False):
        model.register_forward_pre_hook(_decoder_states_for_maskformer, with_kwargs=True)
        model.register_forward_hook(_semantic_output, with_kwargs=True)
        object.__setattr__(model, "seg_accel_semantic_hook", True)
    return model


def loss_settings(model: nn.Module) -> MaskLossSettings:
    """The loss options of a built or loaded model's config."""
    config = model.config
    if config.model_type == "maskformer":  # focal + dice on every pixel; the matching's class cost is 1
        return MaskLossSettings(num_classes=int(config.num_labels), class_weight=float(config.cross_entropy_weight),
                                mask_weight=float(config.mask_weight), dice_weight=float(config.dice_weight),
                                no_object_weight=float(config.no_object_weight), mask_loss="focal",
                                train_num_points=0, match_class_weight=1.0)
    return MaskLossSettings(num_classes=int(config.num_labels), class_weight=float(config.class_weight),
                            mask_weight=float(config.mask_weight), dice_weight=float(config.dice_weight),
                            no_object_weight=float(config.no_object_weight),
                            train_num_points=int(config.train_num_points),
                            oversample_ratio=float(config.oversample_ratio),
                            importance_sample_ratio=float(config.importance_sample_ratio))


def auxiliary_layers(model: nn.Module) -> int:
    """How many intermediate decoder predictions add loss terms (0 without ``use_auxiliary_loss``)."""
    config = model.config
    if not config.use_auxiliary_loss:
        return 0
    if config.model_type == "maskformer":  # the decoder's input and every layer but the last
        return int(config.decoder_config.decoder_layers)
    return int(config.decoder_layers) - 1  # transformers builds decoder_layers - 1 layers after the first prediction


class MaskClassificationObjective:
    """``objective(wrapped_model, batch, iteration) -> (total, logs)``: the forward pass and the
    matching loss of every decoder layer (``loss_cross_entropy``, ``loss_mask``, ``loss_dice`` of
    the final layer; ``loss_final``, ``loss_aux``: the final and the auxiliary layers' sums)."""

    def __init__(self, model: nn.Module, ignore_index: int, seed: int):
        self.model, self.ignore_index, self.seed = model, ignore_index, seed
        self.settings = loss_settings(model)
        self.loss = MaskClassificationLoss(self.settings)
        self.auxiliary = auxiliary_layers(model) > 0

    def describe(self) -> str:
        count = auxiliary_layers(self.model)
        s = self.settings
        points = f"{s.train_num_points} points per mask" if s.train_num_points else "every pixel"
        aux = (f"the final decoder layer and {count} auxiliary layers each add cross-entropy, mask and dice terms "
               f"(a first loss near {count + 1}x one layer's is expected)") if count else \
            "the final decoder layer's cross-entropy, mask and dice terms (no auxiliary layers)"
        return (f"mask classification loss: Hungarian matching per image; {aux}; mask terms on {points}; "
                f"weights class {s.class_weight:g}, mask {s.mask_weight:g}, dice {s.dice_weight:g}, "
                f"no-object {s.no_object_weight:g}; normalised over all processes")

    def layers(self, wrapped: nn.Module, pixel_values: torch.Tensor) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        object.__setattr__(self.model, RAW_OUTPUT, True)
        try:
            out = wrapped(pixel_values, output_auxiliary_logits=self.auxiliary)
        finally:
            object.__setattr__(self.model, RAW_OUTPUT, False)
        predictions = [(out.class_queries_logits, out.masks_queries_logits)]
        for aux in (out.auxiliary_logits or []) if self.auxiliary else []:
            predictions.append((aux["class_queries_logits"], aux["masks_queries_logits"]))
        return [list(zip(classes.unbind(0), masks.unbind(0))) for classes, masks in predictions]

    def __call__(self, wrapped: nn.Module, batch: dict[str, torch.Tensor],
                 iteration: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        layers = self.layers(wrapped, batch["pixel_values"])
        targets = semantic_targets(batch["labels"], self.settings.num_classes, self.ignore_index)
        device = batch["pixel_values"].device
        draws = [image_draw(self.seed, iteration, int(index), device) for index in batch["indices"].tolist()]
        self.loss.to(device)
        return self.loss(layers, targets, draws)


@register_family(order=45)
class MaskClassificationFamily(TransformersFamily):
    """transformers' Mask2Former and MaskFormer, trained with the matching loss."""

    name = "mask_classification"

    @classmethod
    def from_entry(cls, entry: Any, type_name: str) -> MaskClassificationFamily | None:
        return cls(entry) if getattr(entry, "__name__", None) in ARCHITECTURES and \
            str(getattr(entry, "__module__", "")).startswith("transformers") else None

    @classmethod
    def from_model(cls, model: nn.Module) -> MaskClassificationFamily | None:
        return cls(type(model)) if type(model).__name__ in ARCHITECTURES else None

    @classmethod
    def from_export(cls, config: dict[str, Any]) -> MaskClassificationFamily | None:
        import transformers

        architecture = next(iter(config.get("architectures") or []), None)
        if config.get("model_type") in ARCHITECTURES.values() and architecture in ARCHITECTURES:
            return cls(getattr(transformers, architecture))
        return None

    # -- config ---------------------------------------------------------------------------
    def check(self, model_cfg: ModelConfig, classes: list[str], key: str) -> None:
        from seg_accel.config.schema import HeadConfig

        head, label = model_cfg.decode_head, self.model_cls.__name__
        offers = ("its matching loss is set in model.config (class_weight, mask_weight, dice_weight, "
                  "no_object_weight, train_num_points, oversample_ratio, importance_sample_ratio)")
        if head.sampler is not None:
            raise ConfigError(f"{label} classifies masks, not pixels, so a pixel sampler (OHEM) has nothing to pick "
                              f"from; remove it: {offers}", key=f"{key}.decode_head.sampler")
        if head.loss_decode != HeadConfig().loss_decode:
            raise ConfigError(f"{label} is trained with its Hungarian-matching loss, not per-pixel losses; remove "
                              f"loss_decode: {offers}", key=f"{key}.decode_head.loss_decode")
        if head.out_channels is not None and head.out_channels != len(classes or [head.out_channels]):
            raise ConfigError(f"{label} predicts one score per class (plus no-object); a 1-channel sigmoid head does "
                              "not apply: remove out_channels", key=f"{key}.decode_head.out_channels")
        if model_cfg.auxiliary_head is not None:
            raise ConfigError(f"{label} has no FCN auxiliary head; its decoder layers give auxiliary terms "
                              "(model.config.use_auxiliary_loss): remove auxiliary_head", key=f"{key}.auxiliary_head")
        super().check(model_cfg, classes, key)

    def has_auxiliary_head(self, model_cfg: ModelConfig) -> bool | None:
        return None  # check() says why there is none and what stands in for it

    def build(self, model_cfg: ModelConfig, classes: list[str], key: str) -> nn.Module:
        return install_semantic_output(super().build(model_cfg, classes, key))

    def build_empty(self, model_cfg: ModelConfig, classes: list[str], key: str) -> nn.Module | None:
        model = super().build_empty(model_cfg, classes, key)
        return install_semantic_output(model) if model is not None else None

    # -- training -------------------------------------------------------------------------
    def training_objective(self, model: nn.Module, ignore_index: int, seed: int) -> MaskClassificationObjective:
        return MaskClassificationObjective(model, ignore_index, seed)

    def forward_fn(self, model: nn.Module, auxiliary: bool) -> Callable[[nn.Module, torch.Tensor], SegOutput]:
        def forward(wrapped: nn.Module, pixel_values: torch.Tensor) -> SegOutput:
            return as_seg_output(wrapped(pixel_values))

        return forward

    def needs_unused_parameter_search(self, model: nn.Module, aux_trained: bool) -> bool:
        # transformers' Swin (and other) backbones keep a final layernorm that the pixel decoder,
        # which reads the stages' own norms, never uses
        return True

    def backbone(self, model: nn.Module) -> tuple[str, nn.Module] | None:
        encoder = model.model.pixel_level_module.encoder
        return ("backbone", encoder)

    # -- export ---------------------------------------------------------------------------
    def export(self, model: nn.Module, folder: Path, classes: list[str],
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().export(model, folder, classes, state_dict)
        if model.config.model_type == "maskformer" and model.config.use_auxiliary_loss:
            # transformers 5's MaskFormer with use_auxiliary_loss fails in every forward that does not ask
            # for output_hidden_states (as from_pretrained + pipeline call it); the switch only concerns training
            config_file = Path(folder) / EXPORT_CONFIG
            config = json.loads(config_file.read_text())
            config["use_auxiliary_loss"] = False
            config_file.write_text(json.dumps(config, indent=2) + "\n")

    def load_export(self, folder: Path, config: dict[str, Any], trust_remote_code: bool = False) -> nn.Module:
        model = self.model_cls.from_pretrained(folder)
        return install_semantic_output(model)

    def export_processor(self, processor: Any) -> Any:
        """transformers' own processor class for the model (its ``post_process_semantic_segmentation``
        reads the queries), with the settings of seg-accel's processor."""
        import transformers

        prefix = "Mask2Former" if self.model_cls.__name__.startswith("Mask2Former") else "MaskFormer"
        settings = {k: v for k, v in processor.to_dict().items()
                    if k in ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_resize",
                             "size")}
        if settings.get("do_resize") is False:
            settings.pop("size", None)
        cls = getattr(transformers, f"{prefix}ImageProcessorPil", None) or getattr(transformers, f"{prefix}ImageProcessor")
        return cls(**settings, do_reduce_labels=False, ignore_index=255)

    def describe_export(self, config: dict[str, Any]) -> dict[str, str]:
        return {**super().describe_export(config), "pipeline": "image-segmentation"}

    def usage(self, repo_or_folder: str, config: dict[str, Any]) -> list[str]:
        architecture = str((config.get("architectures") or ["Mask2FormerForUniversalSegmentation"])[0])
        return ["```python",
                "import torch",
                "from PIL import Image",
                f"from transformers import AutoImageProcessor, {architecture}", "",
                f'processor = AutoImageProcessor.from_pretrained("{repo_or_folder}")',
                f'model = {architecture}.from_pretrained("{repo_or_folder}").eval()',
                'image = Image.open("image.jpg").convert("RGB")',
                "with torch.no_grad():",
                '    outputs = model(**processor(image, return_tensors="pt"))',
                "labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]",
                "```", ""]

