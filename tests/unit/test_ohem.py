"""OHEM (docs/behaviour.md section 6): our order-statistic sampler against a full-sort reference."""
from __future__ import annotations

import random
import sys

import pytest
import torch

from seg_accel.losses import OHEMPixelSampler
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from ohem_reference import IGNORE, ce_pixel_losses, full_sort_reference  # noqa: E402  (the one reference: bench/ohem_reference.py)


def random_case(rng: random.Random):
    n, c = rng.choice([1, 2]), rng.choice([2, 3, 5])
    h, w = rng.randint(1, 9), rng.randint(1, 9)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    labels = torch.randint(0, c, (n, h, w), generator=gen)
    ignored = rng.choice([0.0, 0.3, 0.9, 1.0])  # 1.0: no valid pixel at all
    labels[torch.rand(n, h, w, generator=gen) < ignored] = IGNORE
    kind = rng.choice(["normal", "ties", "confident"])
    logits = torch.randn(n, c, h, w, generator=gen) * 2
    if kind == "ties":  # few distinct values: many equal probabilities and losses
        logits = logits.round()
    if kind == "confident":  # every pixel's true class far ahead: all above thresh
        logits.scatter_add_(1, labels.clamp(max=c - 1).unsqueeze(1), torch.full((n, 1, h, w), 20.0))
    thresh = rng.choice([None, None, 0.05, 0.3, 0.7, 1.0])
    min_kept = rng.choice([1, 3, 10, 1000])  # 1000: more than there are valid pixels
    return logits, labels, thresh, min_kept, kind, ignored


@pytest.mark.parametrize("seed", range(200))
def test_mask_equals_the_full_sort_reference(seed):
    logits, labels, thresh, min_kept, kind, ignored = random_case(random.Random(seed))
    ours = OHEMPixelSampler(thresh=thresh, min_kept=min_kept).sample(logits, labels, IGNORE, ce_pixel_losses)
    assert torch.equal(ours, full_sort_reference(logits, labels, thresh, min_kept)), (kind, thresh, min_kept, ignored)
    assert not ours[labels == IGNORE].any()


def test_the_random_cases_cover_the_edges():
    seen = set()
    for seed in range(200):
        logits, labels, thresh, min_kept, kind, ignored = random_case(random.Random(seed))
        valid = int((labels != IGNORE).sum())
        seen.add("no valid pixel" if valid == 0 else "")
        seen.add("fewer valid than min_kept" if 0 < valid < min_kept * labels.shape[0] else "")
        seen.add(f"ties {thresh is None}" if kind == "ties" and valid else "")
        if kind == "confident" and thresh is not None and valid:
            prob = logits.softmax(1).gather(1, labels.clamp(max=logits.shape[1] - 1).unsqueeze(1))
            seen.add("all above thresh" if (prob[labels.unsqueeze(1) != IGNORE] >= thresh).all() else "")
    assert {"no valid pixel", "fewer valid than min_kept", "ties True", "ties False", "all above thresh"} <= seen


def test_examples_by_hand():
    # 1 image, 2 classes, 4 pixels; true-class probabilities 0.9, 0.6, 0.4, 0.2 (one more ignored)
    probs = torch.tensor([0.9, 0.6, 0.4, 0.2, 0.5])
    logits = torch.stack([torch.zeros(5), torch.log(probs / (1 - probs))]).view(1, 2, 1, 5)
    labels = torch.tensor([[[1, 1, 1, 1, IGNORE]]])
    keep = OHEMPixelSampler(thresh=0.5, min_kept=1).sample(logits, labels, IGNORE)
    assert keep.tolist() == [[[0.0, 0.0, 1.0, 1.0, 0.0]]]  # below 0.5
    keep = OHEMPixelSampler(thresh=0.3, min_kept=3).sample(logits, labels, IGNORE)
    assert keep.tolist() == [[[0.0, 1.0, 1.0, 1.0, 0.0]]]  # 4th smallest p is 0.9 -> threshold 0.9: the 3 below it
    keep = OHEMPixelSampler(min_kept=2).sample(logits, labels, IGNORE, ce_pixel_losses)
    assert keep.tolist() == [[[0.0, 0.0, 1.0, 1.0, 0.0]]]  # the 2 largest losses


def test_head_with_ohem_logs_the_kept_fraction_and_does_not_renormalise():
    from seg_accel.losses import CrossEntropyLoss, HeadLosses

    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 3, 6, 6, generator=gen), torch.randint(0, 3, (2, 6, 6), generator=gen)
    head = HeadLosses([{"type": "CrossEntropyLoss"}], 3, sampler={"type": "OHEMPixelSampler", "thresh": 0.4,
                                                                  "min_kept": 5})
    total, logs = head(logits, labels)
    weight = OHEMPixelSampler(thresh=0.4, min_kept=5).sample(logits, labels, IGNORE)
    assert float(logs["decode.ohem_kept"]) == pytest.approx(float(weight.mean()))
    expected = CrossEntropyLoss(reduction="sum")(logits, labels, pixel_weight_nhw=weight) / labels.numel()
    assert float(total) == pytest.approx(float(expected))


def test_ohem_without_thresh_needs_per_pixel_losses():
    from seg_accel.errors import ConfigError
    from seg_accel.losses import HeadLosses

    with pytest.raises(ConfigError, match="DiceLoss") as info:
        HeadLosses([{"type": "DiceLoss"}], 3, sampler={"type": "OHEMPixelSampler", "min_kept": 5})
    assert info.value.key == "model.decode_head.sampler"


def ohem_dice_case():
    torch.manual_seed(0)
    return torch.randn(2, 4, 32, 32) * 2, torch.randint(0, 4, (2, 32, 32))


def test_ohem_with_thresh_weights_the_dice_term_too_as_documented():
    """Issue 23, finding 10(b), decided: seg-accel keeps applying the sampler's weights to every
    loss, Dice included (the pixels OHEM drops train nothing); mmseg 0.30's DiceLoss ignores them.
    The example's two values are the ones docs/differences.md gives."""
    from seg_accel.losses import DiceLoss, HeadLosses
    from tests.conftest import REPO

    logits, labels = ohem_dice_case()
    heads = HeadLosses([{"type": "CrossEntropyLoss"}, {"type": "DiceLoss"}], 4,
                       sampler={"type": "OHEMPixelSampler", "thresh": 0.7, "min_kept": 100})
    _, logs = heads(logits, labels)
    weight = heads.sampler.sample(logits, labels, IGNORE, heads.pixel_losses)
    ours, unweighted = float(logs["decode.loss_dice"]), float(DiceLoss()(logits, labels, ignore_index=IGNORE))
    assert ours == pytest.approx(float(DiceLoss()(logits, labels, pixel_weight_nhw=weight, ignore_index=IGNORE)))
    assert abs(ours - unweighted) > 0.05
    text = (REPO / "docs/differences.md").read_text()
    assert f"{ours:.4f}" in text and f"{unweighted:.4f}" in text and f"{float(logs['decode.ohem_kept']):.1%}" in text


def test_ohem_without_thresh_with_ce_and_dice_ranks_by_the_per_pixel_losses_as_mmseg():
    """Issue 23, finding 10(c), decided: matched to mmseg, which trains CE + Dice with OHEM without
    thresh (its Dice adds the same number to every pixel's rank, which changes no rank): the
    pixels kept are those CE alone ranks highest."""
    from seg_accel.losses import HeadLosses

    logits, labels = ohem_dice_case()
    both = HeadLosses([{"type": "CrossEntropyLoss"}, {"type": "DiceLoss", "loss_weight": 3.0}], 4,
                      sampler={"type": "OHEMPixelSampler", "min_kept": 300})
    ce = HeadLosses([{"type": "CrossEntropyLoss"}], 4, sampler={"type": "OHEMPixelSampler", "min_kept": 300})
    kept_both = both.sampler.sample(logits, labels, IGNORE, both.pixel_losses)
    assert torch.equal(kept_both, ce.sampler.sample(logits, labels, IGNORE, ce.pixel_losses))
    assert torch.equal(kept_both, full_sort_reference(logits, labels, None, 300))
    total, logs = both(logits, labels)
    assert torch.isfinite(total) and "decode.loss_dice" in logs
