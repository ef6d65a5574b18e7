"""``seg-accel export-onnx EXPORT --out model.onnx``: an ONNX graph of a trained model, checked
against PyTorch in onnxruntime (max |logit difference| and argmax agreement printed)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from seg_accel.cli.common import TRUST_HELP, run_cli
from seg_accel.errors import ConfigError


def export_onnx_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from seg_accel.inference.onnx_export import DEFAULT_OPSET

    parser = argparse.ArgumentParser(
        prog=prog, description="Export a model to ONNX (pixel_values -> logits) and check it against PyTorch in "
                               "onnxruntime. Needs the onnx extra: pip install 'seg-accel[onnx]'.")
    parser.add_argument("source", help="an export folder (final/, a checkpoint's pretrained/), a work dir or a Hub id")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--dynamic", action="store_true", help="free batch, height and width")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                        help="input height and width (default: the image processor's fixed size, else 512 512)")
    parser.add_argument("--check", nargs="+", default=[], metavar="IMAGES",
                        help="images (files, folders, globs) for the parity check (default: 4 random images)")
    parser.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                        help="torch.onnx's exporter (default dynamo, torch.export based)")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def export_source(text: str) -> str:
    """An export folder for ``text``: a work dir gives its final/ (else best/newest checkpoint's
    pretrained/), a checkpoint its pretrained/."""
    from seg_accel.runtime.checkpoints import pick_weights
    from seg_accel.runtime.workdir import CONFIG_FILE

    path = Path(text)
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        path = pick_weights(path)
    if path.is_dir() and not (path / "config.json").is_file():
        if (path / "pretrained" / "config.json").is_file():
            return str(path / "pretrained")
        raise ConfigError(f"{path} is not an export (no config.json) and holds no pretrained/ export", key="SOURCE")
    return str(path) if path.exists() else text


def _export(args: argparse.Namespace) -> int:
    if args.size is not None and min(args.size) < 16:
        raise ConfigError(f"height and width must be >= 16, got {args.size}", key="--size")
    if args.opset < 13:
        raise ConfigError(f"must be >= 13, got {args.opset}", key="--opset")
    from seg_accel.runtime.console import setup_logging
    from seg_accel.inference.onnx_export import export_with_parity, require_onnxruntime

    require_onnxruntime()
    setup_logging(None, True)
    export_with_parity(export_source(args.source), args.out, args.opset, args.dynamic,
                       tuple(args.size) if args.size else None, args.check, exporter=args.exporter,
                       trust_remote_code=args.trust_remote_code)
    return 0


def export_onnx_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_cli(_export, export_onnx_parser(prog), argv)
