"""Turn a head's logits into the named, summed losses of docs/behaviour.md sections 5 and 6."""
from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from seg_accel.config.types import join_key
from seg_accel.errors import ConfigError
from seg_accel.logits import BINARY_THRESHOLD, predict, resize_logits  # noqa: F401 (part of this module's API)
from seg_accel.registry import LOSSES, SAMPLERS

logger = logging.getLogger("seg_accel")

@torch.no_grad()
def pixel_accuracy(logits_nchw: torch.Tensor, labels_nhw: torch.Tensor, ignore_index: int,
                   threshold: float | None = None) -> torch.Tensor:
    """Accuracy in % over non-ignored pixels (0 when there are none)."""
    valid = labels_nhw != ignore_index
    correct = (predict(logits_nchw, threshold) == labels_nhw) & valid
    return correct.sum().float() * 100.0 / valid.sum().clamp_min(1).float()


LOSS_SIGNATURE = "forward(logits_nchw, labels_nhw, ignore_index=255, pixel_weight_nhw=None)"


def loss_keywords(loss: nn.Module, key: str) -> set[str]:
    """Check a loss against the loss interface and return the optional keywords its forward
    takes (``pixel_weight_nhw``: needed only under a pixel sampler).

    A loss is an ``nn.Module`` with a ``loss_name`` (str) whose ``forward`` takes the logits
    ``(N, C, H, W)`` (already resized to the labels) and the labels ``(N, H, W)`` positionally,
    ``ignore_index`` by keyword, optionally ``pixel_weight_nhw`` (the sampler's 0/1 weights),
    and returns a scalar tensor."""
    name = type(loss).__name__
    if not isinstance(getattr(loss, "loss_name", None), str):
        raise ConfigError(f"loss {name} has no loss_name (a str attribute naming it in the logs, e.g. 'loss_ce'; "
                          "losses named loss_* are trained on)", key=key)
    try:
        params = list(inspect.signature(loss.forward).parameters.values())
    except (TypeError, ValueError):
        return {"ignore_index", "pixel_weight_nhw"}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var_positional = any(p.kind is p.VAR_POSITIONAL for p in params)
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    keywords = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    shown = f"{name}.forward{inspect.signature(loss.forward)}"
    if len(positional) < 2 and not var_positional:
        raise ConfigError(f"{shown} must take the logits and the labels: {LOSS_SIGNATURE}", key=key)
    given = {"ignore_index", "pixel_weight_nhw"}
    required = [p.name for p in positional[2:] if p.default is p.empty and p.name not in given]
    required += [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty and p.name not in given]
    if required:
        raise ConfigError(f"{shown} requires {', '.join(required)}, which seg-accel does not pass: {LOSS_SIGNATURE}",
                          key=key)
    accepted = {k for k in given if k in keywords or var_keyword}
    if "ignore_index" not in accepted:
        raise ConfigError(f"{shown} does not take ignore_index (the label of unlabelled pixels, which it must "
                          f"leave out): {LOSS_SIGNATURE}", key=key)
    return accepted


class HeadLosses(nn.Module):
    """The losses of one head (``decode`` or ``aux``) from its config section.

    Logits are resized to the label size; the head's sampler (OHEM), if any, weights
    the pixels. Returns the total to backpropagate (the sum of losses named
    ``loss_*``) and a dict of detached values to log, keyed ``<prefix>.<loss_name>``
    (equal names add up), plus ``<prefix>.acc_seg`` and, with a sampler,
    ``<prefix>.ohem_kept`` (kept fraction of the valid pixels).
    """

    def __init__(
        self,
        loss_cfgs: list[dict],
        num_classes: int,
        prefix: str = "decode",
        ignore_index: int = 255,
        align_corners: bool = False,
        key: str = "model.decode_head",
        sampler: dict | None = None,
        threshold: float | None = None,
        many: bool | None = None,
    ):
        super().__init__()
        many = len(loss_cfgs) > 1 if many is None else many
        loss_key = join_key(key, "loss_decode")
        self.losses = nn.ModuleList()
        self.keywords: list[set[str]] = []  # optional keywords each loss's forward takes
        self.keys: list[str] = []  # each loss's config key
        self.key = key
        for i, cfg in enumerate(loss_cfgs):
            item = join_key(loss_key, i) if many else loss_key
            loss = LOSSES.build(cfg, item)
            weights = getattr(loss, "class_weight", None)
            if weights is not None and len(weights) != num_classes:
                raise ConfigError(
                    f"class_weight has {len(weights)} values but there are {num_classes} classes",
                    key=join_key(item, "class_weight"),
                )
            self.losses.append(loss)
            self.keywords.append(loss_keywords(loss, item))
            self.keys.append(item)
        self.sampler = None if sampler is None else SAMPLERS.build(sampler, join_key(key, "sampler"))
        if self.sampler is not None:
            for item, keywords, loss in zip(self.keys, self.keywords, self.losses):
                if "pixel_weight_nhw" not in keywords:
                    raise ConfigError(f"{type(loss).__name__}.forward does not take pixel_weight_nhw, so the "
                                      f"sampler ({sampler.get('type')}) cannot weight its pixels: {LOSS_SIGNATURE}",
                                      key=item)
        if self.sampler is not None and getattr(self.sampler, "thresh", 0) is None and \
                not any(hasattr(m, "pixel_loss") for m in self.losses):
            raise ConfigError(
                f"OHEM without thresh ranks pixels by their per-pixel loss, which none of "
                f"{', '.join(type(m).__name__ for m in self.losses)} has; set sampler.thresh or add a per-pixel loss "
                "(CrossEntropyLoss, FocalLoss)", key=join_key(key, "sampler"))
        self.prefix = prefix
        self.ignore_index = ignore_index
        self.align_corners = align_corners
        self.threshold = threshold

    def logged_only(self) -> list[str]:
        """Names of losses that are computed and logged but not trained on."""
        return [f"{self.prefix}.{m.loss_name}" for m in self.losses if not m.loss_name.startswith("loss_")]

    def trains(self) -> bool:
        return len(self.logged_only()) < len(self.losses)

    def pixel_losses(self, logits_nchw: torch.Tensor, labels_nhw: torch.Tensor) -> torch.Tensor:
        """Sum of the losses' unreduced per-pixel values times their ``loss_weight`` (for OHEM without
        thresh: MMSegmentation ranks pixels by the sum of each loss's ``reduction='none'`` output,
        which includes its ``loss_weight``). A loss with no per-pixel value (Dice, Lovasz) adds the
        same number to every pixel there, which changes no rank: it is left out, and ranks as there."""
        return sum(getattr(m, "loss_weight", 1.0) * m.pixel_loss(logits_nchw, labels_nhw, self.ignore_index)
                   for m in self.losses if hasattr(m, "pixel_loss"))

    def forward(self, logits_nchw: torch.Tensor, labels_nhw: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = resize_logits(logits_nchw, labels_nhw.shape[-2:], self.align_corners).float()
        logs: dict[str, torch.Tensor] = {}
        weight = None
        if self.sampler is not None:
            weight = self.sampler.sample(logits, labels_nhw, self.ignore_index, self.pixel_losses)
            valid = (labels_nhw != self.ignore_index).sum().clamp_min(1)
            logs[f"{self.prefix}.ohem_kept"] = weight.sum() / valid
        named: dict[str, torch.Tensor] = {}
        for loss_fn, key in zip(self.losses, self.keys):
            name = f"{self.prefix}.{loss_fn.loss_name}"
            kwargs: dict[str, Any] = {"ignore_index": self.ignore_index}
            if weight is not None:
                kwargs["pixel_weight_nhw"] = weight
            value = loss_fn(logits, labels_nhw, **kwargs)
            if not (torch.is_tensor(value) and value.numel() == 1):
                raise ConfigError(f"{type(loss_fn).__name__} returned {type(value).__name__}"
                                  f"{tuple(value.shape) if torch.is_tensor(value) else ''}; a loss returns a scalar "
                                  "tensor", key=key)
            named[name] = named[name] + value if name in named else value
        trained = [v for k, v in named.items() if k.split(".", 1)[1].startswith("loss_")]
        total = torch.stack(trained).sum() if trained else logits.sum() * 0.0
        logs.update({k: v.detach() for k, v in named.items()})
        logs[f"{self.prefix}.acc_seg"] = pixel_accuracy(logits, labels_nhw, self.ignore_index, self.threshold)
        return total, logs


    def try_on_a_batch(self, channels: int) -> None:
        """Run the losses on a small random batch (2 x channels x 8 x 8, some pixels ignored):
        a loss that fails or returns something else than a scalar is a config error now,
        not at the first training step."""
        generator = torch.Generator().manual_seed(0)
        logits = torch.randn(2, channels, 8, 8, generator=generator, requires_grad=True)
        labels = torch.randint(0, max(channels, 2), (2, 8, 8), generator=generator)
        labels[:, 0] = self.ignore_index
        try:
            total, _ = self(logits, labels)
            total.backward()
        except ConfigError:
            raise
        except Exception as exc:  # the user's code: say which loss and what it raised
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConfigError(f"the losses fail on a small batch (logits {tuple(logits.shape)}, labels "
                              f"{tuple(labels.shape)}): {type(exc).__name__}: {message}", key=self.key) from exc


def build_head_losses(head_cfg: Any, num_classes: int, prefix: str, key: str) -> HeadLosses:
    """``HeadLosses`` from a ``model.decode_head`` / ``model.auxiliary_head`` section."""
    return HeadLosses(
        head_cfg.loss_cfgs(), num_classes, prefix, head_cfg.ignore_index, head_cfg.align_corners, key,
        sampler=head_cfg.sampler, threshold=getattr(head_cfg, "threshold", None),
        many=isinstance(head_cfg.loss_decode, (list, tuple)),
    )
