"""What a run leaves in its work dir (the Hub code and the commands read the same names), and
what a run records of where it ran (library versions, the device)."""
from __future__ import annotations

import platform
from typing import Any

CONFIG_FILE = "config.yaml"  # the resolved config the run was started with
EVAL_RESULTS = "eval_results.json"  # the latest evaluation on data.val
FINAL_DIR = "final"  # the export at the end of training
RUN_INFO = "run_info.json"  # how the run was made (for the model card)
STAGING = ".hub_staging"  # pushes being uploaded


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU ({platform.processor() or platform.machine()})"
    return device.type


def library_versions() -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    from seg_accel.version import __version__

    return {"seg_accel": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}
