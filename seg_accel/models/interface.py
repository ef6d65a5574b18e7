"""The model interface: what seg-accel needs from a segmentation network, and the adapters
("families") that give it for each kind of model.

Every trainable model is an ``nn.Module`` whose ``forward`` takes ``pixel_values``
``(N, 3, H, W)`` as its first argument and returns per-class logits ``(N, C, h, w)`` at
some stride (``h = H / s``): a tensor, or ``{"logits": ..., "aux_logits": ...}`` (also a
tuple ``(logits, aux_logits)`` or an object with those attributes, as transformers
returns) when it has an auxiliary head. Its parameter names are what ``paramwise_cfg``
matches. A ``ModelFamily`` knows how to build such a model from the ``model`` section,
what the config may hold, how to export it to a folder and load it back in one call,
and family details (auxiliary outputs, unused parameters under DDP, the backbone that
``backbone_pretrained`` fills).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from seg_accel.config.schema import ModelConfig

EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"


@dataclass
class SegOutput:
    """A forward pass: per-class logits ``(N, C, h, w)`` and the auxiliary head's, if any."""

    logits: torch.Tensor
    aux_logits: torch.Tensor | None = None


def as_seg_output(raw: Any) -> SegOutput:
    """Read what a model's ``forward`` returned (tensor, mapping, tuple or output object)."""
    if isinstance(raw, SegOutput):
        return raw
    if torch.is_tensor(raw):
        return SegOutput(raw)
    if isinstance(raw, Mapping) and "logits" in raw:
        return SegOutput(raw["logits"], raw.get("aux_logits"))
    if hasattr(raw, "logits") and torch.is_tensor(raw.logits):  # transformers' ModelOutput
        return SegOutput(raw.logits, getattr(raw, "aux_logits", None))
    if isinstance(raw, (tuple, list)) and raw and torch.is_tensor(raw[0]):
        return SegOutput(raw[0], raw[1] if len(raw) > 1 and torch.is_tensor(raw[1]) else None)
    raise TypeError(
        f"the model's forward returned {type(raw).__name__}; seg-accel needs the logits (N, C, h, w): a tensor, "
        "{'logits': ..., 'aux_logits': ...} or (logits, aux_logits)")


# what torch says when an input is smaller than a layer takes (a 1x1 or 8x8 image)
_TOO_SMALL = ("Kernel size can't be greater than actual input size", "Output size is too small",
              "input image is smaller than kernel", "Expected input's spatial")


def run_model(model: nn.Module, pixel_values: torch.Tensor) -> Any:
    """``model(pixel_values)``; an input smaller than the model's layers take is a ``DataError``
    saying its size and what to do, not torch's traceback."""
    try:
        return model(pixel_values)
    except RuntimeError as exc:
        text = str(exc)
        if not any(marker in text for marker in _TOO_SMALL):
            raise
        from seg_accel.errors import DataError

        height, width = pixel_values.shape[-2:]
        raise DataError(f"the model cannot take an input of {height}x{width} pixels (h x w; torch: "
                        f"{text.splitlines()[0][:160]}): resize or pad such images in the pipeline (Resize, Pad), "
                        "or leave them out") from exc


def segmentation_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, C, h, w)`` of any seg-accel model (wrapped by DDP or not)."""
    return as_seg_output(run_model(model, pixel_values)).logits


def label_maps(classes: list[str], outputs: int) -> tuple[dict[int, str], dict[str, int]]:
    """One label per output channel; a 1-channel binary head's channel is the second class."""
    names = classes if outputs == len(classes) else classes[1:]
    id2label = {i: name for i, name in enumerate(names)}
    return id2label, {name: i for i, name in id2label.items()}


MAX_EXPORT_CLASSES = 10_000  # an export's class count sizes its head: a crafted file gets no more


def export_class_count(value: Any, folder: Any, name: str) -> int:
    """An export's class count (``config.json``'s ``name``), read as data: an integer from 1 to
    ``MAX_EXPORT_CLASSES``."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_EXPORT_CLASSES:
        raise ValueError(f"{folder}/config.json: {name} must be an integer from 1 to {MAX_EXPORT_CLASSES}, "
                         f"got {value!r}")
    return value


# set on a model (True) for the duration of a loss forward: a model whose auxiliary head runs only
# in training returns its logits also in eval mode (a workflow's val phase computes the losses)
RETURN_AUX = "seg_accel_return_aux"


def load_export_weights(model: nn.Module, file: Path, what: str) -> None:
    """An export's ``model.safetensors`` into ``model``, every tensor fitting (a ``ValueError``
    naming ``file``, ``what`` and the first differences otherwise)."""
    from safetensors.torch import load_file

    try:
        model.load_state_dict(load_file(str(file)), strict=True)
    except RuntimeError as exc:  # missing, unexpected or misshapen tensors: torch lists them over many lines
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"{file} does not fit the {what} of its config.json: {'; '.join(lines[1:4])[:400]}") from exc


LayerIds = Callable[[str], int]  # a parameter name -> its layer id (layer-wise lr decay)


class ModelFamily:
    """How seg-accel builds, runs, exports and reloads one kind of model: the only place that
    knows that kind. Families are registered in ``seg_accel.models.families`` (by ``name``) and
    asked, in their registration order, whether they take a ``model.type`` entry
    (``from_entry``), a built model (``from_model``) or an export folder's ``config.json``
    (``from_export``). Subclasses override what differs; the defaults suit a model that
    follows the interface by itself."""

    name = "model"  # recorded in every export's config.json (``seg_accel_family``)
    # prefix of seg-accel's own entries in an export's config.json ("_" where the library
    # that reads the folder passes every other entry to the model's constructor: smp)
    export_metadata_prefix = ""
    # whether the family builds ``model.auxiliary_head`` from its head options (in_index, ...)
    builds_auxiliary_head = False
    # whether the family builds both heads from ``model.decode_head``/``auxiliary_head`` (their
    # ``type`` and module options: MMSegmentation's EncoderDecoder)
    builds_heads = False

    # -- recognising ----------------------------------------------------------------------
    @classmethod
    def from_entry(cls, entry: Any, type_name: str) -> ModelFamily | None:
        """The family object for ``model.type`` (``entry``: what ``MODELS`` holds under that
        name), or None when this family does not take it."""
        return None

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelFamily | None:
        """The family object of a model this family built or loaded, else None (asked only for
        models that do not carry their family: one loaded by other means)."""
        return None

    @classmethod
    def from_export(cls, config: dict[str, Any]) -> ModelFamily | None:
        """The family object for an export whose ``config.json`` is ``config`` (asked for exports
        that do not name their family: those written before exports recorded it)."""
        return None

    # -- config ---------------------------------------------------------------------------
    def check(self, model_cfg: ModelConfig, classes: list[str], key: str) -> None:
        """Validation of the ``model`` section against this family and the data (no weights)."""

    def build(self, model_cfg: ModelConfig, classes: list[str], key: str) -> nn.Module:
        raise NotImplementedError

    def build_empty(self, model_cfg: ModelConfig, classes: list[str], key: str) -> nn.Module | None:
        """The architecture on the meta device (names, shapes, module types; no memory), or
        None when it cannot be known without downloading."""
        from accelerate import init_empty_weights

        with init_empty_weights():
            return self.build(model_cfg, classes, key)

    def architecture_only(self, model_cfg: ModelConfig) -> ModelConfig:
        """The ``model`` section with no weights to fetch (``backbone_pretrained`` and the
        family's own ImageNet weights dropped): for building a model whose every weight a
        checkpoint then replaces."""
        import dataclasses

        return dataclasses.replace(model_cfg, backbone_pretrained=None)

    def has_auxiliary_head(self, model_cfg: ModelConfig) -> bool | None:
        """Whether the configured model can have an auxiliary head (None: known only from its
        forward's output). False makes ``model.auxiliary_head`` a config error."""
        return None

    # -- training -------------------------------------------------------------------------
    def forward_fn(self, model: nn.Module, auxiliary: bool) -> Callable[[nn.Module, torch.Tensor], SegOutput]:
        """``f(model_or_its_ddp_wrapper, pixel_values) -> SegOutput`` for training; ``model`` is
        the unwrapped module (hooks go there). With ``auxiliary`` the output must hold the
        auxiliary logits."""

        def forward(wrapped: nn.Module, pixel_values: torch.Tensor) -> SegOutput:
            object.__setattr__(model, RETURN_AUX, auxiliary)
            try:
                out = as_seg_output(run_model(wrapped, pixel_values))
            finally:
                object.__setattr__(model, RETURN_AUX, False)
            if auxiliary and out.aux_logits is None:
                raise RuntimeError(f"{type(model).__name__}.forward returned no aux_logits, but model.auxiliary_head "
                                   "configures losses for them: return {'logits': ..., 'aux_logits': ...}")
            return out

        return forward

    def training_objective(self, model: nn.Module, ignore_index: int, seed: int) -> Any | None:
        """The family's own training objective, ``f(wrapped_model, batch, iteration) -> (total,
        logs)`` (with a ``describe()`` line for the run summary), or None: the heads' per-pixel
        losses on ``forward_fn``'s logits (every family but mask classification)."""
        return None

    def needs_unused_parameter_search(self, model: nn.Module, aux_trained: bool) -> bool:
        """Whether DDP must look for parameters without gradients (``find_unused_parameters``)."""
        return False

    def backbone(self, model: nn.Module) -> tuple[str, nn.Module] | None:
        """``(attribute, module)`` that ``backbone_pretrained`` fills, if the family has one."""
        backbone = getattr(model, "backbone", None)
        return ("backbone", backbone) if isinstance(backbone, nn.Module) else None

    def backbone_weights(self, target_name: str, target: nn.Module,
                         source: str) -> tuple[str, Iterator[dict[str, torch.Tensor]]] | None:
        """``backbone_pretrained``: (a name for ``source``, its weights read in one or more ways,
        best first, only tensors the source's checkpoint holds), or None when the family cannot
        read backbone weights."""
        return None

    def layer_ids(self, model: nn.Module, num_layers: int, decay_type: str) -> LayerIds | None:
        """MMSegmentation's layer ids of the model's parameters for layer-wise lr decay (ids 0 ..
        ``num_layers + 1``: embeddings first, heads last), or None when the family cannot number
        this model's layers."""
        return None

    def output_channels(self, model: nn.Module) -> int | None:
        """The number of output channels of a built or loaded model (None: not known)."""
        return getattr(model, "num_classes", None)

    # -- export ---------------------------------------------------------------------------
    def export(self, model: nn.Module, folder: Path, classes: list[str],
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the weights and a ``config.json`` (``EXPORT_CONFIG``, with ``id2label``) from
        which ``load_export`` rebuilds the model into ``folder``."""
        raise NotImplementedError

    def load_export(self, folder: Path, config: dict[str, Any], trust_remote_code: bool = False) -> nn.Module:
        """The model of an export folder this family wrote (``config``: its ``config.json``). An
        export is data from elsewhere: nothing it names may be imported or called unless
        ``trust_remote_code`` (the user's opt-in)."""
        raise NotImplementedError

    def export_state_dict(self, folder: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The export's weights under the names of the model's ``state_dict`` (``load_from``)."""
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            state.update(load_file(str(file)))
        return state

    def export_processor(self, processor: Any) -> Any:
        """The image processor an export holds, from seg-accel's (a ``SegformerImageProcessor``
        with the test pipeline's settings): a family whose library post-processes with another
        processor class returns one with the same settings."""
        return processor

    def id2label(self, config: dict[str, Any]) -> dict[str, str]:
        """The class names of an export (``{"0": name, ...}``) from its ``config.json``."""
        return dict(config.get("id2label") or {})

    def describe_export(self, config: dict[str, Any]) -> dict[str, str]:
        """For the model card: ``architecture`` (class name), ``library`` (the Hub's
        ``library_name``) and ``tag``."""
        architecture = str((config.get("architectures") or [self.name])[0])
        return {"architecture": architecture, "library": "pytorch", "tag": self.name}

    def usage(self, repo_or_folder: str, config: dict[str, Any]) -> list[str]:
        """Markdown lines (the model card's "How to use") that load the export."""
        return ["```python", "import seg_accel", "", f'model = seg_accel.load_model("{repo_or_folder}").eval()',
                "```", ""]
