"""smp models end to end: two processes, exact resume after SIGKILL, evaluate (whole, slide,
aug-test), export and reload, the Hub with a card, and an unreachable encoder_weights."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, accelerate_launch, run_script, script_env, write_yaml
from tests.integration.test_resume_e2e import json_records, killed_and_resumed
from tests.unit.test_smp import SIDE, TINY, smp_config

smp = pytest.importorskip("segmentation_models_pytorch")
TRAIN = str(REPO / "scripts/train.py")


@pytest.mark.slow  # 12 two-process runs, about 15 s each
@pytest.mark.multiprocess
@pytest.mark.parametrize("arch", sorted(TINY))
def test_each_architecture_trains_on_two_processes(arch, tmp_path):
    cfg = smp_config(arch, iters=2)
    cfg["model"]["auxiliary_head"] = {"loss_decode": {"type": "CrossEntropyLoss", "loss_weight": 0.4}, "channels": 16}
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    run = accelerate_launch([TRAIN, str(path), "--work-dir", str(tmp_path / "w")], cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = [r for r in json_records(tmp_path / "w")]
    assert [r["iter"] for r in records] == [2] and records[0]["aux.loss_ce"] > 0
    smp.from_pretrained(str(tmp_path / "w" / "final"))


def resume_config(arch: str) -> dict:
    cfg = smp_config(arch, iters=12)
    cfg.update(custom_imports={"imports": ["killers"]}, checkpoint_config={"interval": 6}, log_config={"interval": 1},
               lr_config={"policy": "poly", "power": 1.0, "min_lr": 1e-5, "warmup": "linear", "warmup_iters": 3,
                          "warmup_ratio": 0.1})
    cfg["data"]["train"]["num_samples"] = 10  # several epochs, reshuffled
    cfg["data"]["train"]["pipeline"].insert(0, {"type": "PhotoMetricDistortion"})
    cfg["model"]["auxiliary_head"] = {"loss_decode": {"type": "CrossEntropyLoss", "loss_weight": 0.4}, "channels": 16}
    return cfg


@pytest.mark.slow  # per architecture: three two-process runs and three evaluations, about 70 s
@pytest.mark.multiprocess
@pytest.mark.parametrize("arch", ["Unet", "DeepLabV3Plus", "FPN"])
def test_resume_after_sigkill_is_bitwise_then_evaluate_export_and_reload(arch, tmp_path):
    cfg = resume_config(arch)
    path_a = killed_and_resumed(tmp_path, cfg, at=6, last=12, keys=("loss", "decode.loss_ce", "aux.loss_ce", "lr"))

    # evaluate the final model whole, in slide windows (not multiples of the stride) and with aug-test
    final = tmp_path / "A" / "final"
    results = {}
    for mode, options in (("whole", []), ("slide", ["model.test_cfg.mode=slide", "model.test_cfg.crop_size=[40,40]",
                                                    "model.test_cfg.stride=[24,24]"]),
                          ("aug", ["--aug-test"])):
        args = ["-m", "seg_accel", "evaluate", str(path_a), str(final), "--out", str(tmp_path / f"eval_{mode}.json")]
        if options and options[0] != "--aug-test":
            args += ["--cfg-options", *options]
        elif options:
            args += options
        proc = run_script(args, cwd=tmp_path, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        results[mode] = json.loads((tmp_path / f"eval_{mode}.json").read_text())["metrics"]
    assert all(0 <= r["mIoU"] <= 100 for r in results.values())
    whole_in_training = json.loads((tmp_path / "A" / "eval_results.json").read_text())["metrics"]["mIoU"]
    assert results["whole"]["mIoU"] == pytest.approx(whole_in_training, abs=1e-6)

    # the export reloads in both ways with the same logits
    from seg_accel.models import load_model

    side = SIDE.get(arch, 64)
    x = torch.randn(1, 3, side, side)
    with torch.no_grad():
        assert torch.equal(smp.from_pretrained(str(final)).eval()(x), load_model(final).eval()(x))


@pytest.mark.multiprocess
def test_unreachable_encoder_weights_under_two_processes_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    cfg = smp_config()
    cfg["model"]["encoder_weights"] = "imagenet"
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = subprocess.run([sys.executable, "-m", "seg_accel", "train", str(path), "--num-processes", "2",
                           "--work-dir", str(tmp_path / "w")], cwd=tmp_path, env=script_env(HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("20", "train"))]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: model.encoder_weights: cannot download "
                                                   "encoder_weights 'imagenet' for resnet18 (HF_HUB_OFFLINE is set)"), lines


@pytest.mark.parametrize("arch", ["Unet", pytest.param("DeepLabV3Plus", marks=pytest.mark.slow),
                                  pytest.param("FPN", marks=pytest.mark.slow)])
def test_an_smp_model_pushed_to_the_hub_loads_in_both_ways_with_a_card(arch, tmp_path, hub_server):
    from huggingface_hub import ModelCard

    repo_id = f"tester/tiny-{arch.lower()}"
    cfg = smp_config(arch, iters=2)
    cfg["push_to_hub"] = {"repo_id": repo_id, "strategy": "end", "retries": 2, "retry_wait": 0.1}
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = run_script([TRAIN, str(path), "--work-dir", str(tmp_path / "work")], cwd=tmp_path, HF_HUB_OFFLINE="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = hub_server.files(repo_id)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    card = ModelCard.load(repo_id)
    assert card.data.library_name == "segmentation-models-pytorch"
    assert f'smp.from_pretrained("{repo_id}")' in card.text and f'seg_accel.load_model("{repo_id}")' in card.text
    assert f"smp.{arch} (resnet18)" in card.text

    from seg_accel.models import load_model

    by_smp = smp.from_pretrained(repo_id).eval()
    by_us = load_model(repo_id).eval()
    local = load_model(tmp_path / "work" / "final").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(by_smp(x), local(x)) and torch.equal(by_us(x), local(x))
