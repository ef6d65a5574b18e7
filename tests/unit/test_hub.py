"""Hub publishing (push_to_hub, scripts/push_to_hub.py, model cards) and Hub datasets, against the
local Hub server of tests/hub_server.py (the real huggingface_hub, transformers and datasets clients)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config, write_yaml

REPO_ID = "tester/tiny-segformer"


def push_config(strategy: str = "checkpoint", **push) -> dict:
    """The tiny SegFormer on SyntheticShapes: 6 iterations, a checkpoint every 2, evaluation every 4
    (and at the end)."""
    cfg = tiny_config(checkpoint_config={"interval": 2}, evaluation={"interval": 4, "save_best": "mIoU"},
                      push_to_hub={"repo_id": REPO_ID, "strategy": strategy, "retries": 2, "retry_wait": 0.1, **push})
    cfg["runner"]["max_iters"] = 6
    return cfg


def test_image_processor_follows_the_test_pipeline():
    from seg_accel.config.schema import DataConfig
    from seg_accel.models.processor import processor_settings

    norm = {"type": "Normalize", "mean": [127.5, 127.5, 127.5], "std": [51.0, 25.5, 12.75]}
    data = DataConfig(train={"type": "SyntheticShapes", "pipeline": [norm]},
                      test={"type": "SyntheticShapes", "pipeline": [
                          {"type": "Resize", "scale": [64, 48], "keep_ratio": False}, norm]})
    settings = processor_settings(data)
    assert settings["image_mean"] == [0.5, 0.5, 0.5] and settings["image_std"] == [0.2, 0.1, 0.05]
    assert settings["rescale_factor"] == 1 / 255 and settings["do_reduce_labels"] is False
    assert settings["do_resize"] and settings["size"] == {"height": 48, "width": 64}  # scale is [w, h]
    data.test["pipeline"][0]["keep_ratio"] = True  # no processor option resizes keeping the ratio
    assert processor_settings(data)["do_resize"] is False


def test_exported_processor_prepares_images_as_the_pipeline_does(tmp_path):
    from transformers import AutoImageProcessor

    from seg_accel.config.schema import DataConfig
    from seg_accel.data import build_dataset
    from seg_accel.models.processor import build_image_processor
    from tests.conftest import NORMALIZE

    data = DataConfig(train={"type": "SyntheticShapes", "num_samples": 2, "img_size": [20, 30],
                             "pipeline": [NORMALIZE]})
    build_image_processor(data).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    dataset = build_dataset(data.train, "data.train")
    dataset.test_mode = True
    img, _ = dataset.load(1)
    theirs = processor(img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(theirs, dataset[1]["pixel_values"], atol=1e-5, rtol=1e-5)


def test_model_card_model_index_holds_the_metrics(tmp_path):
    from huggingface_hub import ModelCard

    from seg_accel.hub.card import build_model_card

    cfg = push_config()
    cfg["data"]["train"] = {"type": "HubDataset", "path": "tester/shapes", "classes": ["a", "b"]}
    cfg["data"]["val"] = {"type": "HubDataset", "path": "tester/shapes", "split": "validation", "classes": ["a", "b"]}
    evaluation = {"iter": 6, "metrics": {"aAcc": 91.234567, "mIoU": 55.5, "mAcc": 66.0},
                  "per_class": {"IoU": {"a": 40.0, "b": 71.0}, "Acc": {"a": 50.0, "b": 82.0}}, "classes": ["a", "b"]}
    model_config = {"architectures": ["SegformerForSemanticSegmentation"], "model_type": "segformer",
                    "id2label": {"0": "a", "1": "b"}}
    card = build_model_card(REPO_ID, cfg, model_config, evaluation,
                            {"num_processes": 2, "device_name": "NVIDIA H100", "train_seconds": 7200})
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    results = {r.metric_name: r for r in loaded.data.eval_results}
    assert {k: r.metric_value for k, r in results.items()} == {"aAcc": 91.2346, "mIoU": 55.5, "mAcc": 66.0}
    assert {r.metric_type for r in results.values()} == {"overall_accuracy", "mean_iou", "mean_accuracy"}
    assert all(r.dataset_type == "tester/shapes" and r.dataset_split == "validation"
               and r.task_type == "image-segmentation" for r in results.values())
    assert loaded.data.datasets == ["tester/shapes"] and loaded.data.pipeline_tag == "image-segmentation"
    assert "| b | 71.00 | 82.00 |" in loaded.text  # the per-class table
    assert "| batch | 2 per process x 2 process(es) x 1 accumulation = 4 images per iteration |" in loaded.text
    assert "| hardware | 2 x NVIDIA H100 |" in loaded.text and "| training time | 2.00 h |" in loaded.text
    assert f'pipeline("image-segmentation", model="{REPO_ID}")' in loaded.text


def test_scrub_token_redacts_text_and_drops_binary_files(tmp_path, capsys):
    from seg_accel.runtime.console import setup_logging
    from seg_accel.hub.push import REDACTED, scrub_token

    setup_logging(None, True)
    token = "hf_PLANTEDtoken1234567890"
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.log.json").write_text(f'{{"note": "{token}"}}\n')
    (tmp_path / "weights.bin").write_bytes(b"\x00\xff" + token.encode() + b"\x80")
    (tmp_path / "clean.txt").write_text("nothing here")
    found = scrub_token(tmp_path, token)
    assert sorted(found) == ["logs/a.log.json", "weights.bin"]
    assert (tmp_path / "logs" / "a.log.json").read_text() == f'{{"note": "{REDACTED}"}}\n'
    assert not (tmp_path / "weights.bin").exists() and (tmp_path / "clean.txt").is_file()
    assert "the access token was found in logs/a.log.json, weights.bin: redacted in logs/a.log.json; left out: " \
        "weights.bin before the upload" in capsys.readouterr().out


@pytest.mark.parametrize(("push", "extra", "key", "message"), [
    ({"token": "hf_secret_value_123"}, {}, "push_to_hub.token", "never read from the config"),
    ({"repo_id": "not a repo"}, {}, "push_to_hub.repo_id", "not a Hub repo id"),
    ({"retries": 0}, {}, "push_to_hub.retries", ">= 1"),
    ({"commit_message": "step {step}"}, {}, "push_to_hub.commit_message", "{name}, {iter}, {epoch}"),
    ({"strategy": "checkpoint"}, {"checkpoint_config": None}, "push_to_hub.strategy", "needs checkpoint_config"),
    ({"strategy": "best"}, {"evaluation": {"interval": 4}}, "push_to_hub.strategy", "needs evaluation.save_best"),
])
def test_push_to_hub_config_errors(tmp_path, push, extra, key, message):
    from seg_accel.config import load_config
    from seg_accel.validate import validate_train_config
    from seg_accel.errors import ConfigError

    cfg = push_config(**{k: v for k, v in push.items() if k != "strategy"})
    cfg["push_to_hub"]["strategy"] = push.get("strategy", "end")
    cfg.update(extra)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        validate_train_config(load_config(str(write_yaml(tmp_path / "exp.yaml", cfg))))
    assert info.value.key == key and message in str(info.value)
    assert "hf_secret_value_123" not in str(info.value)  # a token in the config is never echoed


# --------------------------------------------------------------------------- training with push_to_hub
