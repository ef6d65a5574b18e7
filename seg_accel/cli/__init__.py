"""The ``seg-accel`` command (also ``python -m seg_accel``) and the functions behind ``scripts/*.py``."""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from seg_accel.cli.common import is_peer_failure as _is_peer_failure  # noqa: F401 (tests use it)
from seg_accel.cli.common import run_cli
from seg_accel.cli.checkpoint import convert_checkpoint_cli
from seg_accel.cli.convert import convert_cli
from seg_accel.cli.convert_config import convert_config_cli
from seg_accel.cli.env import env_cli
from seg_accel.cli.evaluate import evaluate_cli
from seg_accel.cli.export_onnx import export_onnx_cli
from seg_accel.cli.predict import predict_cli
from seg_accel.cli.tools import (
    class_weights_cli,
    list_configs_cli,
    print_config_cli,
    print_param_groups_cli,
    push_to_hub_cli,
)
from seg_accel.cli.train import train_cli

COMMANDS: dict[str, tuple[Callable[..., int], str]] = {
    "train": (train_cli, "train from a YAML or MMSegmentation .py config (here, or on several processes with --num-processes)"),
    "evaluate": (evaluate_cli, "score a work dir, checkpoint, export or Hub model on data.test/data.val"),
    "predict": (predict_cli, "predict class maps and probabilities for images without labels (files, folders, globs)"),
    "export-onnx": (export_onnx_cli, "export a model to ONNX and check it against PyTorch in onnxruntime"),
    "push": (push_to_hub_cli, "publish a work dir, checkpoint or export to the Hugging Face Hub"),
    "convert-checkpoint": (convert_checkpoint_cli, "an MMSegmentation .pth to a seg-accel export, or back to a .pth"),
    "convert-config": (convert_config_cli, "an MMSegmentation .py config (0.x or 1.x, never run) as a seg-accel YAML"),
    "convert-dataset": (convert_cli, "convert a standard dataset's official archives to its config's folder layout"),
    "print-config": (print_config_cli, "print the resolved config (after _base_, _delete_, --cfg-options)"),
    "param-groups": (print_param_groups_cli, "print the optimizer's parameter groups of a config"),
    "class-weights": (class_weights_cli, "count pixels per class and write class weights"),
    "list-configs": (list_configs_cli, "list the configs shipped with seg-accel"),
    "env": (env_cli, "the versions of torch, torchvision, transformers, ...; the devices; whether torch and "
                     "torchvision match"),
}


def usage() -> str:
    from seg_accel.version import __version__

    width = max(len(name) for name in COMMANDS)
    lines = [f"seg-accel {__version__}: semantic segmentation on Hugging Face Accelerate", "",
             "usage: seg-accel COMMAND [options]   (seg-accel COMMAND --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from seg_accel.version import __version__

        print(f"seg-accel {__version__}")
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        from seg_accel.errors import did_you_mean

        print(f"error: unknown command '{argv[0]}'." + did_you_mean(argv[0], COMMANDS), file=sys.stderr)
        return 2
    return command[0](argv[1:], prog=f"seg-accel {argv[0]}")


__all__ = ["class_weights_cli", "convert_checkpoint_cli", "convert_cli", "evaluate_cli", "export_onnx_cli",
           "list_configs_cli", "main",
           "predict_cli", "print_config_cli", "print_param_groups_cli", "push_to_hub_cli", "run_cli", "train_cli"]
