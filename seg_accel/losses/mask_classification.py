"""The matching loss of mask-classification models (Mask2Former, MaskFormer), for semantic
segmentation, normalised over all processes.

A label map becomes one binary mask per class present (``ignore_index`` pixels in none of
them) and its class id. Per image and per decoder layer, predictions (queries) are matched to
those masks by the Hungarian algorithm on ``class_weight * -p(class) + mask_weight * mask
cost + dice_weight * dice cost``; matched queries learn their mask (binary cross-entropy
(Mask2Former) or focal loss (MaskFormer) plus dice) and their class, unmatched ones the
no-object class (weight ``no_object_weight``). This is transformers' ``Mask2FormerLoss`` /
``MaskFormerLoss`` (facebookresearch's criterion), written again here for three reasons:

- the number of masks that normalises the mask terms, and the class weights that normalise
  the cross-entropy, are summed over all processes (one ``all_reduce``), so N processes train
  exactly the objective of one process on the whole batch (transformers reduces with a mean
  and then divides by the number of processes again);
- the random points of the point-sampled mask loss (Mask2Former's ``train_num_points``) are
  drawn per image from a generator seeded by (seed, iteration, sample index), so the points,
  the matching and the loss do not depend on how a batch is split over processes, and a
  resumed run draws what the uninterrupted run drew;
- ``ignore_index`` pixels are left out of the mask terms and of the matching costs (weight 0),
  not counted as background of every mask.

``train_num_points: 0`` computes the mask terms on every pixel (the label map's resolution,
predictions upsampled to it; the matching at the predictions' resolution), as MaskFormer does.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TERMS = ("loss_cross_entropy", "loss_mask", "loss_dice")


@dataclass(frozen=True)
class MaskLossSettings:
    """The loss options of a mask-classification model (transformers' config names)."""

    num_classes: int
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    mask_loss: str = "bce"  # "bce" (Mask2Former) or "focal" (MaskFormer)
    train_num_points: int = 12544  # 0: every pixel
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    match_class_weight: float | None = None  # the matching's class cost (None: class_weight)


@dataclass
class MaskTargets:
    """One image's targets: class ids ``(k,)``, binary masks ``(k, H, W)`` and the weight of
    each pixel ``(H, W)`` (0 at ``ignore_index``)."""

    classes: torch.Tensor
    masks: torch.Tensor
    valid: torch.Tensor


def semantic_targets(labels_nhw: torch.Tensor, num_classes: int, ignore_index: int) -> list[MaskTargets]:
    """Per image: one mask per class present (sorted by class id), ignored pixels in none."""
    targets = []
    for labels in labels_nhw:
        present = torch.unique(labels)
        present = present[(present != ignore_index) & (present >= 0) & (present < num_classes)]
        masks = (labels[None] == present[:, None, None]).float()
        targets.append(MaskTargets(present.long(), masks, (labels != ignore_index).float()))
    return targets


def sample_points(maps_nchw: torch.Tensor, points_np2: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """Bilinear values of ``maps`` at normalised ``[0, 1]`` points: ``(N, C, P)`` (outside the
    map: 0, as transformers and detectron2 sample; ``border`` for the pixel weights)."""
    grid = 2.0 * points_np2[:, :, None, :] - 1.0
    return F.grid_sample(maps_nchw, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)[..., 0]


# ``draw(purpose, shape)``: uniform [0, 1) numbers for the matching ("match") or the loss ("points")
Draw = Callable[[str, tuple[int, ...]], torch.Tensor]


def image_draw(seed: int, iteration: int, index: int, device: torch.device) -> Draw:
    """One image's random points at one iteration: a generator per purpose seeded by (seed,
    iteration, sample index), so that neither the process layout nor the order of the layers
    changes what is drawn."""
    generators = {}
    for salt, purpose in enumerate(("match", "points")):
        mixed = ((int(seed) * 1_000_003 + int(iteration)) * 1_000_033 + int(index)) * 4 + salt
        generators[purpose] = torch.Generator(device=device).manual_seed(mixed % (2**63 - 1))

    def draw(purpose: str, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=generators[purpose], device=device)

    return draw


# ------------------------------------------------------------------ per-point terms
def _bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none")


def _focal(logits: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    probs = logits.sigmoid()
    p_t = probs * labels + (1 - probs) * (1 - labels)
    loss = _bce(logits, labels) * (1 - p_t) ** gamma
    return loss * (alpha * labels + (1 - alpha) * (1 - labels)) if alpha >= 0 else loss


def _pairwise_mask_cost(logits_qp: torch.Tensor, labels_kp: torch.Tensor, weight_p: torch.Tensor,
                        settings: MaskLossSettings) -> torch.Tensor:
    """The mask term of every (query, target) pair ``(Q, k)``: weighted mean over the points."""
    if settings.mask_loss == "focal":
        pos = _focal(logits_qp, torch.ones_like(logits_qp), settings.focal_alpha, settings.focal_gamma)
        neg = _focal(logits_qp, torch.zeros_like(logits_qp), settings.focal_alpha, settings.focal_gamma)
    else:
        pos, neg = _bce(logits_qp, torch.ones_like(logits_qp)), _bce(logits_qp, torch.zeros_like(logits_qp))
    total = weight_p.sum().clamp_min(1e-6)
    return ((pos * weight_p) @ labels_kp.T + (neg * weight_p) @ (1 - labels_kp).T) / total


def _pairwise_dice_cost(logits_qp: torch.Tensor, labels_kp: torch.Tensor, weight_p: torch.Tensor) -> torch.Tensor:
    probs = logits_qp.sigmoid() * weight_p
    labels = labels_kp * weight_p
    numerator = 2 * probs @ labels.T
    denominator = probs.sum(-1)[:, None] + labels.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def _mask_terms(logits_kp: torch.Tensor, labels_kp: torch.Tensor, weight_kp: torch.Tensor,
                settings: MaskLossSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the masks of the weighted-mean mask term, sum of the dice terms)."""
    if settings.mask_loss == "focal":
        per_point = _focal(logits_kp, labels_kp, settings.focal_alpha, settings.focal_gamma)
    else:
        per_point = _bce(logits_kp, labels_kp)
    mask = ((per_point * weight_kp).sum(-1) / weight_kp.sum(-1).clamp_min(1e-6)).sum()
    probs = logits_kp.sigmoid() * weight_kp
    labels = labels_kp * weight_kp
    dice = 1 - (2 * (probs * labels).sum(-1) + 1) / (probs.sum(-1) + labels.sum(-1) + 1)
    return mask, dice.sum()


# ------------------------------------------------------------------ the loss
class MaskClassificationLoss(nn.Module):
    """``forward(layers, targets, draws)`` -> (total, logs). ``layers``: per decoder layer (the
    final one first, then the auxiliary ones) per image ``(class_logits (Q, C + 1),
    mask_logits (Q, h, w))``; ``targets`` from ``semantic_targets``; ``draws``: per image a
    function giving uniform random numbers (its point generator). ``reduce_sum`` sums a tensor
    over the processes and ``world_size`` counts them (torch.distributed's by default)."""

    def __init__(self, settings: MaskLossSettings, reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 world_size: Callable[[], int] | None = None):
        super().__init__()
        self.settings = settings
        self.reduce_sum = reduce_sum or _all_reduce_sum
        self.world_size = world_size or _world_size
        empty_weight = torch.ones(settings.num_classes + 1)
        empty_weight[-1] = settings.no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # -- matching -------------------------------------------------------------------------
    @torch.no_grad()
    def match(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, target: MaskTargets,
              draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        """(query indices, target indices) of one image's Hungarian matching."""
        from scipy.optimize import linear_sum_assignment

        s = self.settings
        if target.classes.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        cost_class = -class_logits.float().softmax(-1)[:, target.classes]
        masks, logits = target.masks[:, None], mask_logits.float()[:, None]
        if s.train_num_points > 0:
            points = draw("match", (1, s.train_num_points, 2)).to(logits)
            labels_kp = sample_points(masks, points.expand(masks.shape[0], -1, -1))[:, 0]
            weight_p = sample_points(target.valid[None, None], points, "border")[0, 0]
            logits_qp = sample_points(logits, points.expand(logits.shape[0], -1, -1))[:, 0]
        else:  # the targets at the predictions' resolution (MaskFormer)
            size = logits.shape[-2:]
            labels_kp = F.interpolate(masks, size=size, mode="nearest")[:, 0].flatten(1)
            weight_p = F.interpolate(target.valid[None, None], size=size, mode="nearest")[0, 0].flatten()
            logits_qp = logits[:, 0].flatten(1)
        class_cost_weight = s.class_weight if s.match_class_weight is None else s.match_class_weight
        cost = (s.mask_weight * _pairwise_mask_cost(logits_qp, labels_kp, weight_p, s)
                + class_cost_weight * cost_class + s.dice_weight * _pairwise_dice_cost(logits_qp, labels_kp, weight_p))
        big = torch.finfo(cost.dtype).max
        rows, cols = linear_sum_assignment(torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).cpu().numpy())
        return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)

    # -- the mask terms of one image ------------------------------------------------------
    def _image_mask_terms(self, mask_logits: torch.Tensor, target: MaskTargets, queries: torch.Tensor,
                          targets: torch.Tensor, draw: Draw) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        if queries.numel() == 0:
            zero = mask_logits.sum() * 0.0  # keeps every parameter in the graph
            return zero, zero
        pred = mask_logits[queries.to(mask_logits.device)].float()[:, None]  # (k, 1, h, w)
        masks = target.masks[targets.to(target.masks.device)][:, None]
        k = pred.shape[0]
        if s.train_num_points > 0:
            with torch.no_grad():
                points = self._uncertain_points(pred, draw)
                labels_kp = sample_points(masks, points)[:, 0]
                weight_kp = sample_points(target.valid[None, None].expand(k, -1, -1, -1), points, "border")[:, 0]
            logits_kp = sample_points(pred, points)[:, 0]
        else:
            size = masks.shape[-2:]
            logits_kp = F.interpolate(pred, size=size, mode="bilinear", align_corners=False)[:, 0].flatten(1)
            labels_kp = masks[:, 0].flatten(1)
            weight_kp = target.valid.flatten()[None].expand(k, -1)
        return _mask_terms(logits_kp, labels_kp, weight_kp, s)

    @torch.no_grad()
    def _uncertain_points(self, pred_k1hw: torch.Tensor, draw: Draw) -> torch.Tensor:
        """PointRend's sampling: of ``oversample_ratio * N`` random points, the
        ``importance_sample_ratio * N`` most uncertain (logit nearest 0), then random ones."""
        s = self.settings
        k, num = pred_k1hw.shape[0], s.train_num_points
        oversampled = int(num * s.oversample_ratio)
        candidates = draw("points", (k, oversampled, 2)).to(pred_k1hw)
        uncertainty = -sample_points(pred_k1hw, candidates)[:, 0].abs()
        uncertain = int(s.importance_sample_ratio * num)
        top = torch.topk(uncertainty, k=uncertain, dim=1).indices
        points = torch.gather(candidates, 1, top[..., None].expand(-1, -1, 2))
        if num - uncertain > 0:
            points = torch.cat([points, draw("points", (k, num - uncertain, 2)).to(pred_k1hw)], dim=1)
        return points

    # -- forward --------------------------------------------------------------------------
    def forward(self, layers: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]], targets: Sequence[MaskTargets],
                draws: Sequence[Draw]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = self.settings
        device = layers[0][0][0].device
        matches = []
        for layer in layers:
            matches.append([self.match(cls, masks, target, draw)
                            for (cls, masks), target, draw in zip(layer, targets, draws)])
        # the normalisers, summed over all processes in one call: the number of masks, and per
        # layer the class weights of every query's target (what CrossEntropyLoss(weight) divides by)
        num_masks = float(sum(int(t.classes.numel()) for t in targets))
        queries = sum(int(cls.shape[0]) for cls, _ in layers[0])
        weight_sums = []
        for layer_matches in matches:  # a matched query's class weighs 1, the others no_object_weight
            matched = sum(int(i.numel()) for i, _ in layer_matches)
            weight_sums.append(matched + (queries - matched) * s.no_object_weight)
        local = torch.tensor([num_masks, *weight_sums], dtype=torch.float64, device=device)
        world = self.world_size()
        summed = self.reduce_sum(local.clone())
        mask_norm = torch.clamp(summed[0] / world, min=1).float()
        logs: dict[str, torch.Tensor] = {}
        total_final = total_aux = None
        for depth, (layer, layer_matches) in enumerate(zip(layers, matches)):
            terms = self._layer_terms(layer, targets, layer_matches, draws, mask_norm,
                                      (summed[1 + depth] / world).float())
            weighted = {"loss_cross_entropy": s.class_weight * terms[0], "loss_mask": s.mask_weight * terms[1],
                        "loss_dice": s.dice_weight * terms[2]}
            layer_total = sum(weighted.values())
            if depth == 0:
                logs.update({name: value.detach() for name, value in weighted.items()})
                total_final = layer_total
            else:
                total_aux = layer_total if total_aux is None else total_aux + layer_total
        logs["loss_final"] = total_final.detach()
        total = total_final
        if total_aux is not None:
            logs["loss_aux"] = total_aux.detach()
            total = total_final + total_aux
        return total, logs

    def _layer_terms(self, layer: Sequence[tuple[torch.Tensor, torch.Tensor]], targets: Sequence[MaskTargets],
                     layer_matches: list[tuple[torch.Tensor, torch.Tensor]], draws: Sequence[Draw],
                     mask_norm: torch.Tensor, weight_norm: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(cross-entropy, mask, dice) of one decoder layer, each normalised over all processes."""
        s = self.settings
        ce_sum = mask_sum = dice_sum = 0.0
        for (cls, masks), target, (queries, matched), draw in zip(layer, targets, layer_matches, draws):
            labels = torch.full((cls.shape[0],), s.num_classes, dtype=torch.long, device=cls.device)
            labels[queries.to(cls.device)] = target.classes[matched.to(target.classes.device)].to(cls.device)
            ce = F.cross_entropy(cls.float(), labels, weight=self.empty_weight.to(cls.device), reduction="none")
            ce_sum = ce_sum + ce.sum()  # each query's term already carries its class weight
            mask_term, dice_term = self._image_mask_terms(masks, target, queries, matched, draw)
            mask_sum, dice_sum = mask_sum + mask_term, dice_sum + dice_term
        return ce_sum / weight_norm, mask_sum / mask_norm, dice_sum / mask_norm


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor
