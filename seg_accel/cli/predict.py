"""``seg-accel predict``: run a trained model on images without labels.

``seg-accel predict CONFIG CHECKPOINT INPUTS... --out DIR`` (a config with a checkpoint or
export), ``seg-accel predict WORK_DIR INPUTS... --out DIR`` or ``seg-accel predict EXPORT
INPUTS... --out DIR`` (an export folder or Hub id alone). INPUTS are image files, folders
(searched recursively) or globs; ``--hub-dataset PATH --split S`` takes the images of a
dataset split instead.
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from seg_accel.cli.common import TRUST_HELP, add_launch_arguments, add_option_arguments, resolve_config, run_cli
from seg_accel.errors import ConfigError


def predict_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Predict class maps (and probabilities) for images: label PNGs with the palette, "
                               "overlays and probability maps named after each source image. Several processes: "
                               "--num-processes N (each image is predicted once).")
    parser.add_argument("sources", nargs="+", metavar="SOURCE [CHECKPOINT] INPUTS",
                        help="a config (then a checkpoint, export folder or Hub id), a work dir, or an export "
                             "folder / Hub id; then image files, folders or globs")
    add_option_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (labels/, overlays/, probs/)")
    parser.add_argument("--probs", choices=["png", "npy", "safetensors"],
                        help="also write per-class probabilities: png (one 8-bit map per class, round(p * 255)), "
                             "npy or safetensors ((C, H, W) arrays)")
    parser.add_argument("--probs-dtype", choices=["float16", "float32"], default="float16",
                        help="dtype of npy/safetensors probabilities (default float16)")
    parser.add_argument("--no-overlays", action="store_true", help="write no overlay images")
    parser.add_argument("--opacity", type=float, default=0.5, help="overlay opacity in [0, 1]")
    parser.add_argument("--aug-test", action="store_true",
                        help="multi-scale and flip test-time augmentation (with a config)")
    parser.add_argument("--batch-size", default="auto",
                        help="images per batch and process (default auto: same-size images within a pixel budget)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    hub = parser.add_argument_group("images of a Hugging Face dataset split instead of INPUTS")
    hub.add_argument("--hub-dataset", metavar="PATH", help="a Hub dataset id or a local folder in Hub layout")
    hub.add_argument("--split", default="test", help="its split (default test)")
    hub.add_argument("--hub-config", help="its config name, if it has several")
    hub.add_argument("--image-column", default="image", help="the column holding the images (default image)")
    add_launch_arguments(parser)
    return parser


def split_sources(sources: list[str], hub: bool = False) -> tuple[str, str | None, list[str]]:
    """``(source, weights, inputs)``: a config takes the next argument as its weights; inputs
    are needed unless the images come from a dataset (``hub``)."""
    from seg_accel.inference.predict import is_config_source

    source = resolve_config(sources[0])
    least = 0 if hub else 1
    if is_config_source(source):
        if len(sources) < 2 + least:
            raise ConfigError("a config needs a checkpoint (or export) and at least one input: "
                              "seg-accel predict CONFIG CHECKPOINT INPUTS... --out DIR", key="INPUTS")
        source, weights, inputs = source, sources[1], sources[2:]
    else:
        if len(sources) < 1 + least:
            raise ConfigError("no inputs: seg-accel predict SOURCE INPUTS... --out DIR (or --hub-dataset)",
                              key="INPUTS")
        source, weights, inputs = source, None, sources[1:]
    if hub and inputs:
        raise ConfigError("give INPUTS or --hub-dataset, not both", key="INPUTS")
    return source, weights, inputs


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"must be a positive integer or auto, got {text!r}", key="--batch-size")
    return value


def _predict(args: argparse.Namespace) -> int:
    if not 0.0 <= args.opacity <= 1.0:
        raise ConfigError(f"must be in [0, 1], got {args.opacity}", key="--opacity")
    if args.workers < 0:
        raise ConfigError(f"must be >= 0, got {args.workers}", key="--workers")
    batch = _batch_size(args.batch_size)
    hub = args.hub_dataset is not None
    source, weights, inputs = split_sources(args.sources, hub)
    if not hub:
        from seg_accel.inference.predict import collect_inputs

        collect_inputs(inputs)  # a missing input is an error before anything starts
    if args.num_processes is not None and args.num_processes > 1 or args.config_file is not None:
        return _launch(args)
    import logging

    import torch
    from accelerate import Accelerator

    from seg_accel import threads
    from seg_accel.runtime.console import setup_logging
    from seg_accel.inference.predict import Predictor
    from seg_accel.runtime.accelerator import multi_process_without_accelerator

    accelerator = Accelerator(cpu=multi_process_without_accelerator())
    setup_logging(None, accelerator.is_main_process)
    threads.apply(threads.decide(None, args.workers))
    predictor = Predictor.load(source, weights, args.cfg_options or (), args.aug_test, accelerator.device,
                               trust_remote_code=args.trust_remote_code)
    written = predictor.run(inputs, args.out, probs=args.probs, probs_dtype=args.probs_dtype,
                            overlays=not args.no_overlays, opacity=args.opacity, accelerator=accelerator,
                            samples_per_gpu=batch, workers=args.workers,
                            hub_dataset={"path": args.hub_dataset, "split": args.split, "name": args.hub_config,
                                         "image_column": args.image_column} if hub else None)
    total = accelerator.reduce(torch.tensor([len(written)], device=accelerator.device), "sum")
    if accelerator.is_main_process:
        logging.getLogger("seg_accel").info("wrote %d prediction(s) into %s", int(total.item()), Path(args.out))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _launch(args: argparse.Namespace) -> int:
    from seg_accel.cli.launch import relaunch

    argv = [*args.sources, "--out", args.out, "--probs-dtype", args.probs_dtype, "--opacity", str(args.opacity),
            "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    if args.probs:
        argv += ["--probs", args.probs]
    if args.hub_dataset is not None:
        argv += ["--hub-dataset", args.hub_dataset, "--split", args.split, "--image-column", args.image_column]
        if args.hub_config:
            argv += ["--hub-config", args.hub_config]
    for flag, on in (("--no-overlays", args.no_overlays), ("--aug-test", args.aug_test),
                     ("--trust-remote-code", args.trust_remote_code)):
        if on:
            argv.append(flag)
    if args.cfg_options:
        argv += ["--cfg-options", *args.cfg_options]
    return relaunch("seg_accel.predict", argv, args)


def predict_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_cli(_predict, predict_parser(prog), argv)
