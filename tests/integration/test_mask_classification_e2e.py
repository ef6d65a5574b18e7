"""Mask2Former and MaskFormer end to end: two processes, exact resume after SIGKILL (the
matching and its random points included), evaluate (whole, slide, aug-test), export and reload
with transformers' from_pretrained, the Hub with a card."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, run_script, write_yaml
from tests.integration.test_resume_e2e import killed_and_resumed
from tests.unit.test_mask_classification import mask_config

transformers = pytest.importorskip("transformers")
TRAIN = str(REPO / "scripts/train.py")
TERMS = ("loss", "loss_cross_entropy", "loss_mask", "loss_dice", "loss_final", "loss_aux", "lr")


def resume_config(kind: str) -> dict:
    cfg = mask_config(kind, iters=8)
    cfg.update(custom_imports={"imports": ["killers"]}, checkpoint_config={"interval": 4}, log_config={"interval": 1},
               optimizer_config={"grad_clip": {"max_norm": 0.01, "norm_type": 2}},
               lr_config={"policy": "poly", "power": 1.0, "min_lr": 1e-5, "warmup": "linear", "warmup_iters": 2,
                          "warmup_ratio": 0.1})
    cfg["data"]["train"]["num_samples"] = 6  # several epochs, reshuffled
    return cfg


@pytest.mark.slow  # per model: three two-process runs, three evaluations, about 90 s
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["mask2former", "maskformer"])
def test_resume_after_sigkill_is_bitwise_then_evaluate_export_and_reload(kind, tmp_path):
    cfg = resume_config(kind)
    path_a = killed_and_resumed(tmp_path, cfg, at=4, last=8, keys=TERMS)  # the matching and its points included

    final = tmp_path / "A" / "final"
    results = {}
    for mode, options in (("whole", []), ("slide", ["--cfg-options", "model.test_cfg.mode=slide",
                                                    "model.test_cfg.crop_size=[48,48]", "model.test_cfg.stride=[32,32]"]),
                          ("aug", ["--aug-test"])):
        out = tmp_path / f"eval_{mode}.json"
        proc = run_script(["-m", "seg_accel", "evaluate", str(path_a), str(final), "--out", str(out), *options],
                          cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        results[mode] = json.loads(out.read_text())["metrics"]
    assert all(0 <= r["mIoU"] <= 100 for r in results.values())
    # the three ways of inferring give different scores (the metrics of a model this short-trained may agree)
    from types import SimpleNamespace

    from seg_accel.inference.inferencer import Inferencer
    from seg_accel.models import load_model

    model, x = load_model(final).eval(), torch.randn(1, 3, 64, 64)
    whole = Inferencer(SimpleNamespace(mode="whole")).scores(model, x, (64, 64))
    slide = Inferencer(SimpleNamespace(mode="slide", crop_size=[48, 48], stride=[32, 32])).scores(model, x, (64, 64))
    aug = Inferencer(SimpleNamespace(mode="whole", img_ratios=[0.75, 1.0], flip=True)).scores(model, x, (64, 64))
    assert whole.shape == slide.shape == aug.shape == (1, 4, 64, 64)
    assert not torch.allclose(whole, slide) and torch.allclose(aug.sum(1), torch.ones(1, 64, 64))
    whole_in_training = json.loads((tmp_path / "A" / "eval_results.json").read_text())["metrics"]["mIoU"]
    assert results["whole"]["mIoU"] == pytest.approx(whole_in_training, abs=1e-6)

    # transformers' from_pretrained and post-processing read the export: the same labels as seg-accel's
    from seg_accel.models.mask_classification import semantic_scores

    architecture = cfg["model"]["type"]
    reloaded = getattr(transformers, architecture).from_pretrained(final).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(final)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        raw = reloaded(x)
        ours = load_model(final).eval()(x).logits
    assert torch.equal(ours.argmax(1), semantic_scores(raw.class_queries_logits, raw.masks_queries_logits,
                                                       (64, 64)).argmax(1))
    assert processor.post_process_semantic_segmentation(raw, target_sizes=[(64, 64)])[0].shape == (64, 64)


@pytest.mark.slow  # one training run and the Hub server, about 20 s
@pytest.mark.parametrize("kind", ["mask2former", "maskformer"])
def test_a_mask_classification_model_pushed_to_the_hub_loads_with_a_card(kind, tmp_path, hub_server):
    from huggingface_hub import ModelCard

    repo_id = f"tester/tiny-{kind}"
    cfg = mask_config(kind, iters=2)
    cfg["push_to_hub"] = {"repo_id": repo_id, "strategy": "end", "retries": 2, "retry_wait": 0.1}
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = run_script([TRAIN, str(path), "--work-dir", str(tmp_path / "work")], cwd=tmp_path, HF_HUB_OFFLINE="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(hub_server.files(repo_id))
    card = ModelCard.load(repo_id)
    assert card.data.library_name == "transformers"
    assert "post_process_semantic_segmentation" in card.text and f'from_pretrained("{repo_id}")' in card.text
    model = getattr(transformers, cfg["model"]["type"]).from_pretrained(repo_id)
    assert model.config.id2label[1] == "circle"


@pytest.mark.parametrize("kind", ["mask2former", "maskformer"])
def test_the_export_works_in_transformers_pipeline_and_seg_accel_predict(kind, tmp_path, fresh_accelerate):
    import numpy as np
    from PIL import Image

    from tests.conftest import make_trainer

    trainer, _ = make_trainer(tmp_path, mask_config(kind, iters=1))
    trainer.train()
    segmenter = transformers.pipeline("image-segmentation", model=str(tmp_path / "work" / "final"), subtask="semantic")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    found = segmenter(image)
    assert found and all(f["label"] in ("background", "circle", "square", "triangle") for f in found)
    assert all(f["mask"].size == (80, 64) for f in found)

    # seg-accel predict: labels, overlays and probability maps that sum to 1 with the labels as argmax
    (tmp_path / "images").mkdir()
    for i, size in enumerate([(64, 80), (72, 64)]):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"im{i}.png")
    out = tmp_path / "out"
    proc = run_script(["-m", "seg_accel", "predict", str(tmp_path / "work" / "final"), str(tmp_path / "images"),
                       "--out", str(out), "--probs", "npy", "--probs-dtype", "float32"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, size in enumerate([(64, 80), (72, 64)]):
        labels = np.asarray(Image.open(out / "labels" / f"im{i}.png"))
        probs = np.load(out / "probs" / f"im{i}.npy")
        assert labels.shape == size and probs.shape == (4, *size) and (out / "overlays" / f"im{i}.png").is_file()
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        assert (probs.argmax(0) == labels).all()
