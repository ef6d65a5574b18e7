"""MMSegmentation's networks end to end on two processes: PSPNet (ResNetV1c D8, SyncBN, OHEM, the
auxiliary head) and the UNet trained with `seg-accel train --num-processes 2`, resumed exactly
after SIGKILL, an MMSegmentation .pth of the result evaluated on two processes with the same
scores as the export, and a config mistake found in the processes as one line."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import NORMALIZE, binary_shape_folders, script_env, write_yaml
from tests.integration.test_resume_e2e import KILLER, json_records

PSPNET = {"type": "EncoderDecoder", "pretrained": None,
          "backbone": {"type": "ResNetV1c", "depth": 18, "dilations": [1, 1, 2, 4], "strides": [1, 2, 1, 1],
                       "contract_dilation": True, "norm_cfg": {"type": "SyncBN", "requires_grad": True}},
          "decode_head": {"type": "PSPHead", "in_channels": 512, "in_index": 3, "channels": 16,
                          "pool_scales": [1, 2, 3, 6], "norm_cfg": {"type": "SyncBN", "requires_grad": True},
                          "sampler": {"type": "OHEMPixelSampler", "thresh": 0.7, "min_kept": 200}},
          "auxiliary_head": {"type": "FCNHead", "in_channels": 256, "in_index": 2, "channels": 16, "num_convs": 1,
                             "concat_input": False, "norm_cfg": {"type": "SyncBN", "requires_grad": True},
                             "loss_decode": {"type": "CrossEntropyLoss", "loss_weight": 0.4}}}


def config(tmp_path, iters: int = 2, **extra) -> dict:
    data = binary_shape_folders(tmp_path / "data", 8, 32, {"train": [{"type": "RandomFlip", "prob": 0.5}, NORMALIZE],
                                                          "val": [NORMALIZE]})
    return {"model": copy.deepcopy(PSPNET), "data": {"samples_per_gpu": 2, "workers_per_gpu": 0, **data},
            "optimizer": {"type": "SGD", "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
                          "paramwise_cfg": {"custom_keys": {"head": {"lr_mult": 10.0}}}},
            "lr_config": {"policy": "poly", "power": 0.9, "min_lr": 1e-4, "by_epoch": False},
            "runner": {"type": "IterBasedRunner", "max_iters": iters}, "log_config": {"interval": 1},
            "checkpoint_config": {"interval": 4}, "evaluation": {"interval": iters, "metric": "mIoU"}, **extra}


def seg_accel(args: list[str], cwd, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seg_accel", *args], cwd=cwd, env=script_env(), capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


@pytest.mark.slow  # three two-process runs and two two-process evaluations, about 90 s
@pytest.mark.multiprocess
def test_pspnet_trains_resumes_exactly_and_its_pth_evaluates_on_two_processes(tmp_path):
    (tmp_path / "killers.py").write_text(KILLER)
    cfg = config(tmp_path, iters=8, custom_imports={"imports": ["killers"]})
    path_a = write_yaml(tmp_path / "a.yaml", cfg)
    run_a = seg_accel(["train", str(path_a), "--work-dir", str(tmp_path / "A"), "--num-processes", "2"], tmp_path)
    assert run_a.returncode == 0, run_a.stdout[-3000:] + run_a.stderr[-3000:]
    assert "SyncBatchNorm runs on GPUs only" in run_a.stdout + run_a.stderr  # SyncBN asked, CPU: said so
    path_b = write_yaml(tmp_path / "b.yaml", {**cfg, "custom_hooks": [{"type": "KillAfterCheckpoint", "at": 4,
                                                                      "priority": 55}]})
    killed = seg_accel(["train", str(path_b), "--work-dir", str(tmp_path / "B"), "--num-processes", "2"], tmp_path)
    assert killed.returncode != 0
    resumed = seg_accel(["train", str(path_b), "--work-dir", str(tmp_path / "B"), "--num-processes", "2",
                         "--auto-resume", "--cfg-options", "custom_hooks=[]"], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    a = load_file(str(tmp_path / "A" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "B" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    logged = {r["iter"]: r for r in json_records(tmp_path / "A")}
    assert logged[8]["aux.loss_ce"] > 0 and 0 < logged[8]["decode.ohem_kept"] <= 1

    # the final model as an MMSegmentation .pth, scored on two processes like the export
    pth = tmp_path / "final.pth"
    convert = seg_accel(["convert-checkpoint", str(tmp_path / "A" / "final"), "--config", str(path_a),
                         "--out", str(pth)], tmp_path)
    assert convert.returncode == 0, convert.stderr[-2000:]
    scores = {}
    for name, weights in (("export", tmp_path / "A" / "final"), ("pth", pth)):
        out = tmp_path / f"{name}.json"
        run = seg_accel(["evaluate", str(path_a), str(weights), "--out", str(out), "--num-processes", "2"], tmp_path)
        assert run.returncode == 0, run.stderr[-3000:]
        scores[name] = json.loads(out.read_text())
    assert scores["pth"]["metrics"] == scores["export"]["metrics"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_head_reading_the_wrong_feature_is_one_line_and_exit_2_on_two_processes(tmp_path):
    cfg = config(tmp_path)
    cfg["model"]["decode_head"]["in_channels"] = 2048  # a ResNet-50's, on a ResNet-18
    path = write_yaml(tmp_path / "bad.yaml", cfg)
    run = seg_accel(["train", str(path), "--work-dir", str(tmp_path / "w"), "--num-processes", "2"], tmp_path)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model.decode_head.in_channels" in lines[0] and "512 channels" in lines[0], run.stderr
