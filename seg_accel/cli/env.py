"""``seg-accel env``: the versions of the libraries seg-accel runs on, the devices, and whether
torch and torchvision belong together (PyPI's torchvision does not load beside another torch
build: every command then fails while transformers imports)."""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from collections.abc import Sequence

from seg_accel.cli.common import run_cli

LIBRARIES = ("torch", "torchvision", "accelerate", "transformers", "segmentation_models_pytorch", "timm",
             "onnxruntime", "safetensors", "datasets", "huggingface_hub")
DISTRIBUTIONS = {"segmentation_models_pytorch": "segmentation-models-pytorch"}


def library_state(module: str) -> tuple[str, str]:
    """(version or "not installed", "ok" or why it does not import)."""
    try:
        version = importlib.metadata.version(DISTRIBUTIONS.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        if importlib.util.find_spec(module) is None:
            return "not installed", "-"
        version = "unknown"  # on the path without package metadata
    try:
        importlib.import_module(module)
    except Exception as exc:  # any failure to import is what this command is for
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return version, f"does not import: {type(exc).__name__}: {first[:200]}"
    return version, "ok"


def torchvision_matches(torch_version: str, torchvision_version: str) -> bool | None:
    """torchvision 0.(m + 15) goes with torch 2.m (0.29 with 2.14); None when either is unknown."""
    try:
        torch_minor = int(torch_version.split(".")[1])
        vision_minor = int(torchvision_version.split(".")[1])
        major = int(torch_version.split(".")[0])
    except (IndexError, ValueError):
        return None
    return major == 2 and vision_minor == torch_minor + 15


def environment_lines() -> list[str]:
    from seg_accel.version import __version__

    lines = [f"seg-accel {__version__}, Python {sys.version.split()[0]} ({sys.executable})"]
    states = {name: library_state(name) for name in LIBRARIES}
    width = max(len(name) for name in LIBRARIES)
    for name, (version, state) in states.items():
        lines.append(f"  {name.ljust(width)}  {version:<14} {state}")
    torch_version, vision_version = states["torch"][0], states["torchvision"][0]
    if "not installed" not in (torch_version, vision_version):
        match = torchvision_matches(torch_version, vision_version)
        if match is False:
            lines.append(f"torch {torch_version} and torchvision {vision_version} do not belong together: install the "
                         f"pair (e.g. pip install torch==2.14.1 torchvision==0.29.1)")
        elif match:
            lines.append(f"torch {torch_version} and torchvision {vision_version} belong together")
    if states["torch"][1] == "ok":
        import torch

        devices = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())] \
            if torch.cuda.is_available() else []
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            devices.append("mps")
        lines.append("devices: " + ", ".join(["cpu", *devices]) + f" (torch built with CUDA {torch.version.cuda})"
                     if torch.version.cuda else "devices: " + ", ".join(["cpu", *devices]))
    return lines


def _env(args: argparse.Namespace) -> int:
    print("\n".join(environment_lines()))
    return 0


def env_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Show the versions of the libraries seg-accel uses, the "
                                     "devices, and whether torch and torchvision belong together.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return run_cli(_env, parser, argv)
