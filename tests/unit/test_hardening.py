"""Hardening in this process: hostile YAML, weights that do not fit, user modules that fail,
foreign temporary folders, damaged checkpoints, 16-bit images, batches of mixed sizes, OHEM's
ranking, paths and tokens that must not leave the machine, run_info counts."""
from __future__ import annotations

import json
import logging
import textwrap
import time
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image

from seg_accel.config import load_config
from seg_accel.errors import ConfigError, DataError
from tests.conftest import json_log, make_trainer, tiny_config, write_yaml


class Captured(logging.Handler):
    """The records of the seg_accel logger while in use (whether or not it propagates)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Captured:
        self.logger = logging.getLogger("seg_accel")
        self.level, self.logger.level = self.logger.level, logging.INFO
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.level = self.level

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


def alias_bomb(levels: int = 9, width: int = 10) -> str:
    """A few hundred bytes that expand to width**levels values."""
    lines = ["a0: &a0 [" + ",".join(["x"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_fast_and_small(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 1024
    tracemalloc.start()
    started = time.process_time()  # CPU time: what a busy machine does not inflate
    with pytest.raises(ConfigError) as info:
        load_config(path)
    cpu = time.process_time() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "MAX_CONFIG_VALUES" in str(info.value) and info.value.file == str(path)
    assert cpu < 2 and peak < 200 * 2**20, (cpu, peak)


def test_recursive_aliases_deep_nesting_and_huge_files_are_refused(tmp_path):
    recursive = write_yaml(tmp_path / "recursive.yaml", "a: &a [1, *a]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(recursive)
    deep = write_yaml(tmp_path / "deep.yaml", "a: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(ConfigError, match="MAX_CONFIG_DEPTH"):
        load_config(deep)
    big = tmp_path / "big.yaml"
    big.write_text("values:\n" + "".join(f"  - {i}\n" for i in range(2_500_000)))  # about 20 MB
    assert big.stat().st_size > 20 * 10**6
    started = time.process_time()
    with pytest.raises(ConfigError, match="MAX_CONFIG_BYTES"):
        load_config(big)
    assert time.process_time() - started < 10


def test_a_legit_config_with_aliases_still_loads(tmp_path):
    text = textwrap.dedent("""
        norm: &norm {type: Normalize, mean: [123.675, 116.28, 103.53], std: [58.395, 57.12, 57.375]}
        data:
          train: {type: SyntheticShapes, pipeline: [*norm]}
          val: {type: SyntheticShapes, pipeline: [*norm]}
    """)
    cfg = load_config(write_yaml(tmp_path / "c.yaml", text))
    assert cfg.dict["data"]["val"]["pipeline"][0]["type"] == "Normalize"


FAILING_MODULES = {
    "broken_syntax": "def oops(:\n    pass\n",
    "raises_on_import": "import os\n\nraise RuntimeError('no GPU here')\n",
}


@pytest.mark.parametrize(("module", "words"), [
    ("broken_syntax", "SyntaxError in"),
    ("raises_on_import", "it raised RuntimeError: no GPU here"),
])
def test_a_custom_import_that_fails_is_one_config_error(tmp_path, monkeypatch, module, words):
    (tmp_path / f"{module}.py").write_text(FAILING_MODULES[module])
    monkeypatch.chdir(tmp_path)
    path = write_yaml(tmp_path / "c.yaml", tiny_config(custom_imports={"imports": [module]}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert info.value.key == "custom_imports.imports.0" and words in message and f"{module}.py" in message
    assert "\n" not in message


def tiny_model():
    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from seg_accel.models import build_model

    return build_model(parse_section(tiny_config()["model"], ModelConfig, "model"), ["a", "b", "c", "d"])


def test_load_from_weights_that_match_nothing_is_an_error(tmp_path):
    from safetensors.torch import save_file

    from seg_accel.models import load_weights

    save_file({"backbone.weight": torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError) as info:
        load_weights(tiny_model(), tmp_path)
    assert info.value.key == "load_from" and "none of the" in str(info.value) and "\n" not in str(info.value)


def test_load_from_a_safetensors_file_and_another_class_count(tmp_path):
    from safetensors.torch import save_file

    from seg_accel.models import load_weights

    source = tiny_model()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["decode_head.classifier.weight"] = torch.zeros(7, *state["decode_head.classifier.weight"].shape[1:])
    state["decode_head.classifier.bias"] = torch.zeros(7)
    save_file(state, str(tmp_path / "other.safetensors"))
    target = tiny_model()
    with Captured() as logs:
        load_weights(target, tmp_path / "other.safetensors")  # the file itself, not its folder
    loaded = target.state_dict()
    kept = [k for k in state if not k.startswith("decode_head.classifier")]
    assert all(torch.equal(loaded[k], state[k]) for k in kept)
    warnings = logs.messages(logging.WARNING)
    assert len(warnings) == 1 and "2 of" in warnings[0] and "decode_head.classifier.weight (7," in warnings[0]
    with pytest.raises(ConfigError) as info:  # evaluating a checkpoint: nothing may differ
        load_weights(tiny_model(), tmp_path / "other.safetensors", key="CHECKPOINT", strict=True)
    assert "another class count" in str(info.value).lower() and "\n" not in str(info.value)


def test_only_seg_accels_own_partial_folders_are_cleaned(tmp_path):
    from seg_accel.engine.checkpoint import remove_unfinished
    from seg_accel.runtime.checkpoints import PARTIAL

    ours = tmp_path / ".iter_10.tmp"
    ours.mkdir()
    (ours / PARTIAL).touch()
    theirs = tmp_path / ".other-app.tmp"
    theirs.mkdir()
    (theirs / "precious.txt").write_text("user data")
    remove_unfinished(tmp_path)
    assert not ours.exists() and (theirs / "precious.txt").read_text() == "user data"


def test_the_manifest_names_what_is_wrong(tmp_path):
    from seg_accel.runtime.manifest import verify, write_manifest

    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.json").write_text("{}")
    write_manifest(tmp_path)
    assert verify(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"x" * 50)
    assert "model.safetensors has 50 bytes" in verify(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"y" * 100)
    assert "does not match its sha256" in verify(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    assert "model.safetensors is missing" in verify(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    assert "not a readable manifest" in verify(tmp_path)


def test_ohem_without_thresh_ranks_by_the_weighted_loss_sum():
    """MMSegmentation ranks by the sum of each loss's reduction='none' output, loss_weight included:
    CE (weight 1) and a 5x focal loss rank pixels otherwise than their unweighted sum."""
    from seg_accel.losses import HeadLosses

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 40, 40, generator=gen) * 3
    labels = torch.randint(0, 4, (2, 40, 40), generator=gen)
    head = HeadLosses([{"type": "CrossEntropyLoss", "loss_weight": 1.0},
                       {"type": "FocalLoss", "loss_weight": 5.0, "loss_name": "loss_focal"}], 4,
                      sampler={"type": "OHEMPixelSampler", "min_kept": 300}, many=True)
    weight = head.sampler.sample(logits, labels, 255, head.pixel_losses)
    ce, focal = (m.pixel_loss(logits, labels, 255) for m in head.losses)

    def top(scores: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(scores.numel())
        mask[scores.flatten().argsort(descending=True, stable=True)[:600]] = 1
        return mask.view_as(scores)

    assert torch.equal(weight, top(ce + 5.0 * focal))
    assert not torch.equal(weight, top(ce + focal))  # the ranking the old code used differs here


def test_16_bit_grayscale_images_are_scaled_not_saturated(tmp_path):
    from seg_accel.data import build_dataset

    (tmp_path / "img").mkdir()
    (tmp_path / "ann").mkdir()
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    Image.fromarray(ramp).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "ann" / "a.png")
    dataset = build_dataset({"type": "CustomDataset", "data_root": str(tmp_path), "img_dir": "img", "ann_dir": "ann",
                             "img_suffix": ".png", "classes": ["x", "y"]}, "data.train")
    with Captured() as logs:
        img, _ = dataset.load(0)
        dataset.load(0)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert (img == 255).mean() < 0.01 and abs(int(img[-1, -1, 0]) - round(65520 / 257)) <= 1
    said = [m for m in logs.messages() if "16-bit" in m]
    assert len(said) == 1 and "data.train" in said[0]  # once per dataset


def test_mixed_sizes_in_a_batch_name_the_dataset():
    from seg_accel.data import collate

    a = {"pixel_values": torch.zeros(3, 4, 4), "labels": torch.zeros(4, 4, dtype=torch.long), "index": 0}
    b = {"pixel_values": torch.zeros(3, 5, 4), "labels": torch.zeros(5, 4, dtype=torch.long), "index": 1}
    with pytest.raises(DataError) as info:
        collate([a, b], key="data.train")
    assert str(info.value).startswith("data.train: the samples of one batch have different sizes (h x w: 4x4, 5x4")


def test_a_crop_larger_than_the_images_is_one_line(tmp_path, monkeypatch, capsys, fresh_accelerate):
    from seg_accel.cli import main

    cfg = tiny_config()
    cfg["data"]["train"]["img_size"] = [24, 24]
    cfg["data"]["train"]["pipeline"].insert(0, {"type": "RandomResize", "scale": [24, 24], "ratio_range": [0.5, 1.0]})
    cfg["data"]["workers_per_gpu"] = 1  # the error comes back from a DataLoader worker
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(write_yaml(tmp_path / "c.yaml", cfg))]) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "error: data.train: the samples of one batch have different sizes" in err
    log = next((tmp_path / "work_dirs" / "c").glob("*.log")).read_text()
    assert "the samples of one batch have different sizes" in log  # why the run ended, in its log


def test_uploaded_configs_carry_no_local_paths(tmp_path):
    from seg_accel.hub.push import without_local_paths

    work = tmp_path / "runs" / "exp"
    cfg = {"work_dir": str(work), "load_from": str(work / "iter_4"), "data": {"train": {
        "data_root": "/home/someone/data/camvid", "img_dir": "train", "split": "../splits/train.txt"}},
        "model": {"pretrained": "nvidia/mit-b0"}}
    clean = without_local_paths(cfg, work)
    assert clean == {"work_dir": ".", "load_from": "iter_4", "data": {"train": {
        "data_root": "camvid", "img_dir": "train", "split": "../splits/train.txt"}},
        "model": {"pretrained": "nvidia/mit-b0"}}


def test_commit_messages_lose_the_token():
    from seg_accel.hub.push import REDACTED, redact

    assert redact("saved with hf_secret123456 inside", "hf_secret123456") == f"saved with {REDACTED} inside"
    assert redact("nothing here", "hf_secret123456") == "nothing here"


def test_run_info_counts_the_samples_of_every_process(tmp_path, fresh_accelerate):
    cfg = tiny_config()
    cfg["data"]["val"] = None
    cfg["data"]["train"]["num_samples"] = 4  # 4 iterations of 2 images: 2 passes over the data
    trainer, _ = make_trainer(tmp_path, cfg)
    trainer.train()
    info = json.loads((tmp_path / "work" / "run_info.json").read_text())
    assert info["samples"] == 8 and info["epochs"] == 2.0 and info["iterations"] == 4


def test_a_skipped_val_sample_is_reported_and_not_counted(tmp_path, fresh_accelerate):
    from seg_accel.data.synthetic import SyntheticShapes

    cfg = tiny_config(evaluation={"interval": 4})
    cfg["data"]["skip_bad_samples"] = True
    trainer, _ = make_trainer(tmp_path, cfg)
    original = SyntheticShapes.read

    def read(self, index):
        if self.test_mode and index == 3:
            raise OSError("planted: cannot read val sample 3")
        return original(self, index)

    try:
        SyntheticShapes.read = read
        with Captured() as logs:
            trainer.train()
    finally:
        SyntheticShapes.read = original
    said = [m for m in logs.messages() if "skipped" in m and "evaluation" in m]
    assert said and "planted: cannot read val sample 3" in said[0]
    results = json.loads((tmp_path / "work" / "eval_results.json").read_text())
    assert results["skipped_samples"] == 1
    assert np.asarray(results["confusion_matrix"]).sum() == 8 * 32 * 32  # 9 val images, one not counted
    assert any(r["mode"] == "val" for r in json_log(tmp_path / "work"))


def test_all_ignore_labels_warn_and_the_results_stay_valid_json(tmp_path, fresh_accelerate):
    """Issue 23, finding 7: labels that are all ignore_index trained at loss 0 without a word and
    wrote NaN tokens into eval_results.json (invalid JSON)."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    data = tmp_path / "data"
    for sub in ("img", "ann"):
        (data / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / "img" / f"s{i}.png")
        Image.fromarray(np.full((32, 32), 255, np.uint8)).save(data / "ann" / f"s{i}.png")
    split = {"type": "CustomDataset", "data_root": str(data), "img_dir": "img", "ann_dir": "ann", "img_suffix": ".png",
             "classes": ["background", "thing"], "pipeline": [{"type": "Normalize", "mean": [0, 0, 0],
                                                                "std": [255, 255, 255]}]}
    cfg = tiny_config()
    cfg["data"].update(train=split, val=split)
    trainer, _ = make_trainer(tmp_path, cfg)
    trainer.train()
    log = next((tmp_path / "work").glob("*.log")).read_text()
    assert "WARNING data.train (CustomDataset" in log and "no labelled pixel (every pixel is ignore_index 255)" in log
    results = json.loads((tmp_path / "work" / "eval_results.json").read_text(), parse_constant=refuse)
    assert results["metrics"]["mIoU"] is None and results["per_class"]["IoU"]["thing"] is None
    for path in (tmp_path / "work").glob("*.log.json"):
        for line in path.read_text().splitlines():
            json.loads(line, parse_constant=refuse)


def test_negative_or_all_zero_class_weights_are_config_errors(tmp_path, capsys):
    from seg_accel.cli import train_cli

    for weights, words in (([1.0, -1.0, 1.0, 1.0], "class 1 has -1.0"), ([0.0] * 4, "at least one class weight"),
                           ([1.0, float("nan"), 1.0, 1.0], "class 1 has nan")):
        cfg = tiny_config()
        cfg["model"]["decode_head"] = {"loss_decode": {"type": "CrossEntropyLoss", "class_weight": weights}}
        assert train_cli([str(write_yaml(tmp_path / "exp.yaml", cfg))]) == 2
        err = capsys.readouterr().err
        assert "model.decode_head.loss_decode.class_weight" in err and words in err, err


def test_images_smaller_than_the_model_takes_are_one_line(tmp_path, capsys, fresh_accelerate):
    """Issue 23, finding 7: 1x1 and 8x8 images gave torch's traceback ("Kernel size can't be
    greater than actual input size") in predict and in training."""
    from seg_accel.cli import predict_cli, train_cli
    from tests.unit.test_evaluate import save_tiny_model

    save_tiny_model(tmp_path / "export")
    for side in (1, 8):
        image = tmp_path / f"tiny{side}.png"
        Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(image)
        assert predict_cli([str(tmp_path / "export"), str(image), "--out", str(tmp_path / f"out{side}")]) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
        assert len(err) == 1 and err[0].startswith(f"error: tiny{side}: the model cannot take an input of ")
    cfg = tiny_config()
    cfg["data"]["train"]["img_size"] = [8, 8]
    cfg["data"]["val"] = None
    assert train_cli([str(write_yaml(tmp_path / "exp.yaml", cfg)), "--work-dir", str(tmp_path / "work")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    assert len(err) == 1 and "the model cannot take an input of 8x8 pixels" in err[0], err


def test_a_decompression_bomb_image_is_one_line(tmp_path, capsys):
    """Issue 23, finding 7: a 48 KB PNG of 20000 x 20000 pixels gave PIL's DecompressionBombError
    traceback; now one line naming the file (PIL refuses it before decoding)."""
    from seg_accel.cli import predict_cli
    from tests.unit.test_evaluate import save_tiny_model

    save_tiny_model(tmp_path / "export")
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    assert predict_cli([str(tmp_path / "export"), str(tmp_path / "bomb.png"), "--out", str(tmp_path / "out")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
    assert len(err) == 1 and "bomb.png" in err[0] and "DecompressionBombError" in err[0], err


def test_a_pixel_value_means_the_same_in_every_16_bit_or_float_image():
    """Issue 23, finding 8: 16-bit and float images were scaled by their content (a 16-bit 255
    stayed 255 unless some pixel of the image exceeded 255): one value, two results."""
    from seg_accel.data.base import image_to_rgb8

    dark = np.full((4, 4), 255, np.uint16)  # no pixel above 255
    bright = dark.copy()
    bright[0, 0] = 65535
    assert image_to_rgb8(dark)[0][1, 1, 0] == image_to_rgb8(bright)[0][1, 1, 0] == 1  # round(255 / 257)
    assert image_to_rgb8(Image.fromarray(dark))[0][1, 1, 0] == 1  # PIL's 16-bit modes alike
    low = np.full((4, 4), 0.5, np.float32)
    high = low.copy()
    high[0, 0] = 2.0
    assert image_to_rgb8(low)[0][1, 1, 0] == image_to_rgb8(high)[0][1, 1, 0] == 128  # round(0.5 * 255)
    assert image_to_rgb8(high)[0][0, 0, 0] == 255  # outside 0..1: clipped


def test_the_shipped_camvid_config_reads_data_camvid_and_a_missing_root_names_the_key(tmp_path, monkeypatch, capsys,
                                                                                      fresh_accelerate):
    """Issue 23, finding 11: the shipped CamVid config read ../shared/data/camvid (this repository's
    test layout) and "directory not found" did not say which key to set."""
    from seg_accel.cli import train_cli
    from tests.conftest import REPO

    base = (REPO / "configs/_base_/datasets/camvid.yaml").read_text()
    assert "shared" not in base and base.count("data_root: data/camvid") == 2
    monkeypatch.chdir(tmp_path)
    assert train_cli(["camvid/segformer_tiny_camvid_2k", "--work-dir", str(tmp_path / "work")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "data.train.data_root: data_root not found: data/camvid" in err[0], err
    assert "--cfg-options data.train.data_root=/path/to/data data.val.data_root=/path/to/data" in err[0]


def test_mmcv_fp16_spellings_point_at_mixed_precision_and_the_runtime_does_not_auto_resume(tmp_path, capsys):
    """Issue 23, finding 11: `fp16 = dict(...)` and `Fp16OptimizerHook` errors did not point at
    mixed_precision; the shipped runtime set auto_resume: true (MMSegmentation's default is off)."""
    import yaml

    from seg_accel.cli import train_cli
    from tests.conftest import REPO

    for extra, key in (({"fp16": {"loss_scale": 512.0}}, "fp16"),
                       ({"optimizer_config": {"type": "Fp16OptimizerHook", "loss_scale": 512.0}}, "optimizer_config.type")):
        assert train_cli([str(write_yaml(tmp_path / "exp.yaml", tiny_config(**extra)))]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert len(err) == 1 and f": {key}: " in err[0] and "mixed_precision: fp16" in err[0], err
    kept = tiny_config(optimizer_config={"type": "OptimizerHook", "grad_clip": None})
    kept["runner"]["max_iters"] = 1
    kept["data"]["val"] = None
    assert train_cli([str(write_yaml(tmp_path / "ok.yaml", kept)), "--work-dir", str(tmp_path / "w")]) == 0
    runtime = yaml.safe_load((REPO / "configs/_base_/default_runtime.yaml").read_text())
    assert runtime["auto_resume"] is False
