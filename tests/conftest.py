"""Shared fixtures: tiny configs, script runners, the optional ../shared data."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.hub_server import hub_server  # noqa: F401  (the local Hub server fixture)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEG_ACCEL_SHARED", REPO.parent / "shared"))
CAMVID = SHARED / "data" / "camvid"

# The Hub is unreachable here: make any Hub look-up fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NORMALIZE = {"type": "Normalize", "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}

TINY_SEGFORMER = {
    "type": "SegformerForSemanticSegmentation",
    "config": {
        "hidden_sizes": [8, 16, 32, 64],
        "depths": [1, 1, 1, 1],
        "num_attention_heads": [1, 1, 2, 2],
        "sr_ratios": [4, 2, 1, 1],
        "decoder_hidden_size": 32,
    },
}


def tiny_config(**overrides: Any) -> dict:
    """A complete, small training config (SegFormer on 32x32 SyntheticShapes, a few iterations)."""
    cfg = {
        "model": copy.deepcopy(TINY_SEGFORMER),
        "data": {
            "samples_per_gpu": 2,
            "workers_per_gpu": 0,
            "train": {"type": "SyntheticShapes", "num_samples": 64, "img_size": [32, 32], "seed": 0,
                      "pipeline": [{"type": "RandomFlip", "prob": 0.5}, NORMALIZE]},
            "val": {"type": "SyntheticShapes", "num_samples": 9, "img_size": [32, 32], "seed": 1,
                    "pipeline": [NORMALIZE]},
        },
        "optimizer": {"type": "AdamW", "lr": 0.001, "weight_decay": 0.01},
        "lr_config": {"policy": "poly", "power": 1.0, "min_lr": 0.0, "by_epoch": False},
        "runner": {"type": "IterBasedRunner", "max_iters": 4},
        "log_config": {"interval": 2},
        "seed": 0,
    }
    cfg.update(overrides)
    return copy.deepcopy(cfg)


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def run_script(args: list[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run ``python <args>`` (a script of this repo) and capture its output."""
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=script_env(**env), capture_output=True, text=True, timeout=timeout
    )


def launch_command(args: list[str], num_processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_config.yaml"),
            "--num_processes", str(num_processes), "--main_process_port", str(_free_port()), *args]


def accelerate_launch(args: list[str], cwd: Path, num_processes: int = 2, timeout: float = 600,
                      **env: str) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file accelerate_config.yaml --num_processes N <args>``, in a
    session of its own (a hook may kill the whole process group)."""
    return subprocess.run(launch_command(args, num_processes), cwd=cwd, env=script_env(**env), capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def camvid() -> Path:
    if not CAMVID.is_dir():
        pytest.skip(f"CamVid data not found at {CAMVID} (../shared is absent)")
    return CAMVID


@pytest.fixture
def fresh_accelerate():
    """Reset Accelerate's process-wide singletons around an in-process Trainer."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_trainer(tmp_path: Path, cfg_dict: dict, options: tuple = ()) -> tuple[Any, Any]:
    """A Trainer (in this process) for ``cfg_dict`` written to ``tmp_path/exp.yaml``, work dir ``tmp_path/work``."""
    from seg_accel.config import load_config
    from seg_accel.engine import Trainer
    from seg_accel.validate import validate_train_config

    path = write_yaml(tmp_path / "exp.yaml", cfg_dict)
    cfg = load_config(path, list(options))
    work_dir = tmp_path / "work"
    cfg.dict["work_dir"] = str(work_dir)
    return Trainer(validate_train_config(cfg), cfg, work_dir), cfg


def json_log(work_dir: Path) -> list[dict]:
    """The records of a run's (first) JSON log."""
    import json

    path = next(iter(sorted(work_dir.glob("*.log.json"))))
    return [json.loads(line) for line in path.read_text().splitlines()]


SCHEDULED = dict(
    optimizer={"type": "AdamW", "lr": 0.002, "betas": [0.9, 0.999], "weight_decay": 0.01},
    lr_config={"policy": "poly", "power": 1.0, "min_lr": 1e-5, "warmup": "linear", "warmup_iters": 3,
               "warmup_ratio": 0.1},
    momentum_config={"policy": "cyclic", "cyclic_times": 2},
    log_config={"interval": 1},
)


def binary_shape_folders(root: Path, num_samples: int, img_size: int, pipelines: dict[str, list]) -> dict[str, dict]:
    """SyntheticShapes written as a binary (background/shape) CustomDataset per split (train
    seed 0, val seed 1): ``{split: data section}``."""
    import numpy as np
    from PIL import Image

    from seg_accel.data.synthetic import SyntheticShapes

    sections = {}
    for seed, split in enumerate(("train", "val")):
        (root / split / "img").mkdir(parents=True)
        (root / split / "ann").mkdir()
        shapes = SyntheticShapes(num_samples=num_samples, img_size=img_size, seed=seed)
        for i in range(num_samples):
            img, label = shapes.load(i)
            Image.fromarray(img).save(root / split / "img" / f"{i}.png")
            Image.fromarray((label > 0).astype(np.uint8)).save(root / split / "ann" / f"{i}.png")
        sections[split] = {"type": "CustomDataset", "data_root": str(root / split), "img_dir": "img", "ann_dir": "ann",
                           "img_suffix": ".png", "classes": ["background", "shape"], "pipeline": pipelines[split]}
    return sections
