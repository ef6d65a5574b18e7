"""What a run leaves in its work dir; the Hub code and the commands read the same names."""
from __future__ import annotations

import platform
from typing import Any

import torch

CONFIG_FILE = "config.yaml"  # the resolved config the run was started with
EVAL_RESULTS = "eval_results.json"  # the latest evaluation on data.val
FINAL_DIR = "final"  # the export at the end of training
RUN_INFO = "run_info.json"  # how the run was made (for the model card)
STAGING = ".hub_staging"  # pushes being uploaded


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU ({platform.processor() or platform.machine()})"
    return device.type


def library_versions() -> dict[str, Any]:
    import accelerate
    import transformers

    from seg_accel import __version__

    return {"seg_accel": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a reader
    (or a crash) never sees half a file."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
