"""The mask-classification family (Mask2Former, MaskFormer): the matching loss against
transformers' own, the semantic scores against its post-processing, the config errors."""
from __future__ import annotations

import copy

import pytest
import torch

from seg_accel.errors import ConfigError
from seg_accel.losses.mask_classification import (
    MaskClassificationLoss,
    MaskLossSettings,
    image_draw,
    semantic_targets,
)
from tests.conftest import REPO, make_trainer, run_script, tiny_config, write_yaml

transformers = pytest.importorskip("transformers")
pytest.importorskip("scipy")

SWIN = {"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4,
        "drop_path_rate": 0.0, "out_features": ["stage1", "stage2", "stage3", "stage4"]}
TINY_MASK2FORMER = {
    "type": "Mask2FormerForUniversalSegmentation",
    "config": {"backbone_config": SWIN, "hidden_dim": 32, "mask_feature_size": 32, "feature_size": 32,
               "encoder_layers": 1, "decoder_layers": 3, "num_queries": 8, "num_attention_heads": 2,
               "dim_feedforward": 64, "encoder_feedforward_dim": 64, "train_num_points": 64},
}
TINY_MASKFORMER = {
    "type": "MaskFormerForInstanceSegmentation",
    "config": {"backbone_config": SWIN, "fpn_feature_size": 32, "mask_feature_size": 32,
               "use_auxiliary_loss": True,
               "decoder_config": {"model_type": "detr", "d_model": 32, "encoder_layers": 1, "decoder_layers": 2,
                                  "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                                  "decoder_ffn_dim": 64, "num_queries": 8}},
}
TINY = {"mask2former": TINY_MASK2FORMER, "maskformer": TINY_MASKFORMER}
CLASSES = ["background", "circle", "square", "triangle"]


def mask_config(kind: str = "mask2former", iters: int = 2) -> dict:
    cfg = tiny_config(model=copy.deepcopy(TINY[kind]))
    cfg["runner"]["max_iters"] = iters
    cfg["data"]["train"]["num_samples"] = 8
    cfg["data"]["val"]["num_samples"] = 2
    for split in ("train", "val"):  # at 32x32 the last stage is 1x1: its GroupNorm needs more at batch 1
        cfg["data"][split]["img_size"] = [64, 64]
    return cfg


def build(kind: str):
    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from seg_accel.models import build_model

    torch.manual_seed(0)
    return build_model(parse_section(copy.deepcopy(TINY[kind]), ModelConfig, "model"), CLASSES)


def labels_with_ignore(n: int, side: int = 64, ignore: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (n, side // 8, side // 8), generator=generator)
    labels = labels.repeat_interleave(8, 1).repeat_interleave(8, 2)
    labels[:, : side // 4] = 3
    if ignore:
        labels[:, -6:, :] = 255
    return labels


def outputs_of(model, x, labels, **forward):
    targets = semantic_targets(labels, len(CLASSES), 255)
    from seg_accel.models.mask_classification import RAW_OUTPUT

    object.__setattr__(model, RAW_OUTPUT, True)
    try:
        out = model(x, mask_labels=[t.masks for t in targets], class_labels=[t.classes for t in targets],
                    output_auxiliary_logits=True, **forward)
    finally:
        object.__setattr__(model, RAW_OUTPUT, False)
    return out, targets


def layers_of(out) -> list:
    predictions = [(out.class_queries_logits, out.masks_queries_logits)]
    predictions += [(a["class_queries_logits"], a["masks_queries_logits"]) for a in out.auxiliary_logits or []]
    return [list(zip(c.unbind(0), m.unbind(0))) for c, m in predictions]


def test_the_mask2former_loss_is_transformers_own_given_the_same_random_points(monkeypatch):
    from seg_accel.models.mask_classification import loss_settings

    model = build("mask2former").train()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = labels_with_ignore(1)
    calls, real_rand = [], torch.rand

    def recording(*args, **kwargs):
        calls.append(real_rand(*args, **kwargs))
        return calls[-1]

    torch.manual_seed(5)
    monkeypatch.setattr(torch, "rand", recording)
    out, targets = outputs_of(model, x, labels)
    monkeypatch.setattr(torch, "rand", real_rand)
    assert len(calls) == 3 * 3  # per layer: the matching's points, the candidates, the random points
    # transformers draws, per layer, the matching's points then the loss's: replay them by purpose
    queues = {"match": calls[0::3], "points": [c for i, c in enumerate(calls) if i % 3]}

    def replay(purpose, shape):
        drawn = queues[purpose].pop(0)
        assert tuple(drawn.shape) == tuple(shape)
        return drawn

    total, logs = MaskClassificationLoss(loss_settings(model))(layers_of(out), targets, [replay])
    assert torch.allclose(total, out.loss, rtol=1e-6, atol=1e-6), (total, out.loss)
    assert set(logs) == {"loss_cross_entropy", "loss_mask", "loss_dice", "loss_final", "loss_aux"}
    assert torch.allclose(logs["loss_final"] + logs["loss_aux"], out.loss, rtol=1e-6)
    terms = logs["loss_cross_entropy"] + logs["loss_mask"] + logs["loss_dice"]
    assert torch.allclose(terms, logs["loss_final"])


def test_the_maskformer_loss_is_transformers_own_on_a_batch():
    from seg_accel.models.mask_classification import loss_settings

    model = build("maskformer").train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out, targets = outputs_of(model, x, labels_with_ignore(2), output_hidden_states=True)
    assert len(out.auxiliary_logits) == 2
    settings = loss_settings(model)
    assert settings.mask_loss == "focal" and settings.train_num_points == 0
    total, logs = MaskClassificationLoss(settings)(layers_of(out), targets, [None, None])
    assert torch.allclose(total, out.loss, rtol=1e-6, atol=1e-6), (total, out.loss)


def test_ignored_pixels_are_in_no_mask_and_out_of_the_loss():
    labels = labels_with_ignore(1, ignore=True)
    (target,) = semantic_targets(labels, 4, 255)
    assert target.masks.sum(0)[-6:].max() == 0 and target.valid[-6:].max() == 0
    assert torch.equal(target.masks.sum(0) + (1 - target.valid), torch.ones(64, 64))
    # the loss does not change with the predictions at ignored pixels
    settings = MaskLossSettings(num_classes=4, train_num_points=0, mask_loss="focal")
    loss = MaskClassificationLoss(settings)
    classes = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    masks = torch.randn(8, 64, 64, generator=torch.Generator().manual_seed(1))
    changed = masks.clone()
    changed[:, -6:] = 40.0
    first, _ = loss([[(classes, masks)]], [target], [None])
    second, _ = loss([[(classes, changed)]], [target], [None])
    assert torch.allclose(first, second, atol=1e-5)
    assert not torch.allclose(*(loss([[(classes, m)]], [t], [None])[0] for m, t in
                                ((masks, target), (changed, semantic_targets(labels_with_ignore(1), 4, 255)[0]))))


def test_points_depend_on_the_image_and_iteration_only():
    a = image_draw(0, 7, 3, torch.device("cpu"))
    b = image_draw(0, 7, 3, torch.device("cpu"))
    assert torch.equal(a("points", (2, 5, 2)), b("points", (2, 5, 2)))
    assert torch.equal(a("match", (1, 5, 2)), b("match", (1, 5, 2)))  # one purpose's draws leave the other's alone
    assert not torch.equal(image_draw(0, 8, 3, torch.device("cpu"))("match", (1, 5, 2)),
                           image_draw(0, 7, 3, torch.device("cpu"))("match", (1, 5, 2)))


def test_per_process_normalisation_sums_masks_and_class_weights_over_processes():
    """Two simulated processes, each normalising by the global sums / 2, average to the loss of
    one process on all four images; with per-process counts they do not."""
    settings = MaskLossSettings(num_classes=4, train_num_points=32)
    gen = torch.Generator().manual_seed(0)
    classes = [torch.randn(8, 5, generator=gen) for _ in range(4)]
    masks = [torch.randn(8, 16, 16, generator=gen) for _ in range(4)]
    labels = torch.randint(0, 4, (4, 64, 64), generator=gen)
    labels[0] = 0  # images with different numbers of classes
    labels[1, :, :32] = 1
    labels[1, :, 32:] = 2
    targets = semantic_targets(labels, 4, 255)
    draws = [image_draw(0, 1, i, torch.device("cpu")) for i in range(4)]
    whole, _ = MaskClassificationLoss(settings, reduce_sum=lambda t: t, world_size=lambda: 1)(
        [list(zip(classes, masks))], targets, draws)
    locals_ = []

    def recording(t):
        locals_.append(t.clone())
        return t

    halves = [slice(0, 2), slice(2, 4)]
    for part in halves:  # first pass: each process's local sums
        MaskClassificationLoss(settings, reduce_sum=recording, world_size=lambda: 1)(
            [list(zip(classes[part], masks[part]))], targets[part],
            [image_draw(0, 1, i, torch.device("cpu")) for i in range(4)][part])
    summed = locals_[0] + locals_[1]
    losses = [MaskClassificationLoss(settings, reduce_sum=lambda t: summed.clone(), world_size=lambda: 2)(
        [list(zip(classes[part], masks[part]))], targets[part],
        [image_draw(0, 1, i, torch.device("cpu")) for i in range(4)][part])[0] for part in halves]
    assert torch.allclose((losses[0] + losses[1]) / 2, whole, rtol=1e-6)
    per_process = [MaskClassificationLoss(settings, reduce_sum=lambda t: t, world_size=lambda: 1)(
        [list(zip(classes[part], masks[part]))], targets[part],
        [image_draw(0, 1, i, torch.device("cpu")) for i in range(4)][part])[0] for part in halves]
    assert not torch.allclose((per_process[0] + per_process[1]) / 2, whole, rtol=1e-3)


@pytest.mark.parametrize("kind", ["mask2former", "maskformer"])
def test_semantic_scores_argmax_is_the_image_processors_post_processing(kind):
    """Mask2Former's processor upsamples the masks to 384x384 first, MaskFormer's sums at the
    masks' resolution: at a 384x384 input (Mask2Former) and at the masks' resolution (MaskFormer)
    both orders meet, and the argmax is the same pixel for pixel."""
    from seg_accel.models.mask_classification import RAW_OUTPUT, semantic_scores

    model = build(kind).eval()
    processor_cls = transformers.Mask2FormerImageProcessor if kind == "mask2former" else \
        transformers.MaskFormerImageProcessor
    side = 384 if kind == "mask2former" else 64
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        object.__setattr__(model, RAW_OUTPUT, True)
        raw = model(x)
        object.__setattr__(model, RAW_OUTPUT, False)
        logits = model(x).logits
    size = (side, side) if kind == "mask2former" else tuple(raw.masks_queries_logits.shape[-2:])
    ours = semantic_scores(raw.class_queries_logits, raw.masks_queries_logits, size).argmax(1)
    theirs = processor_cls().post_process_semantic_segmentation(raw, target_sizes=[size, size])
    assert all(torch.equal(ours[i], theirs[i]) for i in range(2))
    if kind == "mask2former":  # the model's logits are the log scores at the input's size
        assert torch.equal(logits.argmax(1), ours)
        scores = semantic_scores(raw.class_queries_logits, raw.masks_queries_logits, size)
        assert torch.allclose(logits.softmax(1), scores / scores.sum(1, keepdim=True), atol=1e-5)


@pytest.mark.parametrize(("change", "key", "words"), [
    ({"decode_head": {"sampler": {"type": "OHEMPixelSampler", "thresh": 0.7}}}, "model.decode_head.sampler",
     "pixel sampler (OHEM)"),
    ({"decode_head": {"loss_decode": [{"type": "CrossEntropyLoss"}, {"type": "DiceLoss"}]}},
     "model.decode_head.loss_decode", "Hungarian-matching loss"),
    ({"auxiliary_head": {"loss_decode": {"type": "CrossEntropyLoss", "loss_weight": 0.4}}}, "model.auxiliary_head",
     "use_auxiliary_loss"),
])
def test_what_does_not_apply_to_mask_classification_is_one_error_saying_why(change, key, words):
    from seg_accel.config.loader import Config
    from seg_accel.validate import validate_train_config

    cfg = mask_config()
    cfg["model"].update(change)
    with pytest.raises(ConfigError) as info:
        validate_train_config(Config(cfg, "exp.yaml"))
    assert info.value.key == key and words in str(info.value)
    assert "model.config" in str(info.value)  # what the family offers instead


def test_the_command_says_it_in_one_line_with_exit_2_also_on_two_processes(tmp_path):
    cfg = mask_config()
    cfg["model"]["decode_head"] = {"sampler": {"type": "OHEMPixelSampler"}}
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    for extra in ([], ["--num-processes", "2"]):
        run = run_script(["-m", "seg_accel", "train", str(path), "--work-dir", str(tmp_path / "w"), *extra], REPO)
        assert run.returncode == 2, run.stderr[-2000:]
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "model.decode_head.sampler" in lines[0], run.stderr


def test_training_logs_each_term_and_says_how_many_layers_add_auxiliary_terms(tmp_path, fresh_accelerate):
    from tests.conftest import json_log

    trainer, _ = make_trainer(tmp_path, mask_config(iters=2))
    trainer.train()
    text = next((tmp_path / "work").glob("*.log")).read_text()
    assert "the final decoder layer and 2 auxiliary layers" in text
    (record,) = [r for r in json_log(tmp_path / "work") if r.get("mode") == "train"]
    for key in ("loss", "loss_cross_entropy", "loss_mask", "loss_dice", "loss_final", "loss_aux"):
        assert record[key] > 0, key
    assert record["loss"] == pytest.approx(record["loss_final"] + record["loss_aux"], rel=1e-5)
    final = tmp_path / "work" / "final"
    reloaded = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(final)
    assert reloaded.config.id2label[3] == "triangle"


@pytest.mark.slow  # three launches, about 35 s
@pytest.mark.multiprocess
def test_two_processes_of_two_images_train_what_one_process_of_four_trains(tmp_path):
    """Same loss and same gradients (to 1e-5); with per-process mask counts they differ."""
    from tests.conftest import accelerate_launch

    results = {}
    for name, processes, extra in (("one", 1, []), ("two", 2, []), ("per_process", 2, ["--per-process"])):
        out = tmp_path / f"{name}.pt"
        run = accelerate_launch(["-m", "tests.integration.mask_grads", str(out), *extra], REPO, processes)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        results[name] = torch.load(out)
    one, two, per_process = results["one"], results["two"], results["per_process"]
    assert len(one["grads"]) == one["params"] - 2  # every parameter learns but Swin's unused final layernorm
    assert torch.allclose(one["loss"], two["loss"], rtol=1e-5, atol=1e-5), (one["loss"], two["loss"])
    for name, grad in one["grads"].items():
        assert torch.allclose(grad, two["grads"][name], rtol=1e-5, atol=1e-5), name
    differs = [name for name, grad in one["grads"].items()
               if not torch.allclose(grad, per_process["grads"][name], rtol=1e-4, atol=1e-5)]
    assert not torch.allclose(one["loss"], per_process["loss"], rtol=1e-3) and len(differs) > len(one["grads"]) // 2


def test_a_padded_batch_carries_a_pixel_mask_and_inference_leaves_the_padding_out():
    """The Pad transform's padding reaches the batch as a pixel_mask; a padded and an unpadded
    copy of one image get equal scores (without the mask, the padding would change them)."""
    from seg_accel.data.loader import collate
    from seg_accel.data.transforms import Pad
    from seg_accel.inference.inferencer import Inferencer

    generator = torch.Generator().manual_seed(4)
    image = torch.randn(3, 48, 40, generator=generator)
    label = torch.randint(0, 4, (48, 40), generator=generator)
    padded = Pad(size=[64, 64])({"img": image.clone(), "gt_seg_map": label.clone()}, None)
    assert padded["valid_hw"] == (48, 40) and padded["img"].shape == (3, 64, 64)
    other = Pad(size=[64, 64])({"img": torch.randn(3, 64, 64), "gt_seg_map": torch.zeros(64, 64, dtype=torch.long)},
                               None)
    assert "valid_hw" not in other  # nothing to pad: no mask entry
    batch = collate([{"pixel_values": padded["img"], "labels": padded["gt_seg_map"], "index": 0,
                      "valid_hw": padded["valid_hw"]},
                     {"pixel_values": other["img"], "labels": other["gt_seg_map"], "index": 1}])
    mask = batch["pixel_mask"]
    assert mask.shape == (2, 64, 64) and int(mask[0].sum()) == 48 * 40 and bool(mask[1].all())
    assert "pixel_mask" not in collate([{"pixel_values": other["img"], "labels": other["gt_seg_map"], "index": 1}])

    model = build("mask2former").eval()
    for inferencer in (Inferencer(None), Inferencer(type("T", (), {"img_ratios": [0.75, 1.0], "flip": True})())):
        alone = inferencer.scores(model, image[None], (48, 40))
        in_batch = inferencer.scores(model, batch["pixel_values"], (48, 40), mask)
        assert torch.allclose(in_batch[0], alone[0], atol=1e-5)
    without = Inferencer(None).scores(model, padded["img"][None], (64, 64))[..., :48, :40]
    assert not torch.allclose(without, Inferencer(None).scores(model, image[None], (48, 40)), atol=1e-3)


def test_backbone_pretrained_fills_the_pixel_level_encoder(tmp_path):
    """``backbone_pretrained`` (a save_pretrained folder of a Swin model here; a Hub id such as
    microsoft/swin-tiny-patch4-window7-224 in the recipes) loads into Mask2Former's backbone."""
    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from seg_accel.models import build_model

    swin = {k: v for k, v in SWIN.items() if k not in ("model_type", "out_features")}
    torch.manual_seed(7)
    source = transformers.SwinModel(transformers.SwinConfig(**swin))
    source.save_pretrained(tmp_path / "swin")
    cfg = copy.deepcopy(TINY_MASK2FORMER)
    cfg["backbone_pretrained"] = str(tmp_path / "swin")
    model = build_model(parse_section(cfg, ModelConfig, "model"), CLASSES)
    encoder = model.model.pixel_level_module.encoder.state_dict()
    loaded = {f"swin.{k}": v for k, v in source.state_dict().items() if f"swin.{k}" in encoder}  # SwinBackbone's names
    assert len(loaded) > 20 and all(torch.equal(encoder[k], v) for k, v in loaded.items())
