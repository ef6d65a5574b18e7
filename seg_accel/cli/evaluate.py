"""``seg-accel evaluate``: score a checkpoint, an export or a whole work dir.

``seg-accel evaluate WORK_DIR`` takes the run's ``config.yaml`` and its ``final/`` export
(else its best, else its newest checkpoint); ``seg-accel evaluate CONFIG CHECKPOINT``
scores any checkpoint, export or Hub id with that config. Results go beside what was
scored (``<work_dir>/eval/<name>/results.json``) unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from seg_accel.cli.common import TRUST_HELP, add_launch_arguments, add_option_arguments, resolve_config, run_cli
from seg_accel.runtime.checkpoints import pick_weights
from seg_accel.errors import ConfigError


def evaluate_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from seg_accel.config.schema import METRICS

    parser = argparse.ArgumentParser(
        prog=prog, description="Evaluate a model on data.test (else data.val). Give a work dir (its config.yaml and "
                               "final/, else its best or newest checkpoint), or a config and a checkpoint, export "
                               "folder or Hub id. Several processes: --num-processes N.")
    parser.add_argument("sources", nargs="+", metavar="[CONFIG] CHECKPOINT_OR_WORK_DIR",
                        help="a work dir; or a config (or a work dir, for its config) then a checkpoint, export "
                             "folder, work dir or Hub id")
    add_option_arguments(parser)
    parser.add_argument("--metrics", nargs="+", default=["mIoU"], choices=sorted(METRICS),
                        help="mIoU (IoU, Acc), mDice (Dice, Acc), mFscore (Fscore, Precision, Recall), AUC (2-class "
                             "models: ROC and precision-recall areas from the foreground probability)")
    parser.add_argument("--threshold-sweep", action="store_true",
                        help="2-class models: the foreground-probability threshold with the best foreground Dice, "
                             "in one pass")
    parser.add_argument("--per-image", action="store_true",
                        help="also write each image's metrics to <out stem>_per_image.csv")
    parser.add_argument("--aug-test", action="store_true",
                        help="multi-scale (model.test_cfg.img_ratios, default 0.5-1.75) and flip test-time augmentation")
    parser.add_argument("--out", help="results JSON (default: <work_dir>/eval/<name>/results.json beside what is "
                                      "scored); the confusion-matrix and IoU charts go beside it")
    parser.add_argument("--show-dir", help="write an overlay (prediction | ground truth) per image here")
    parser.add_argument("--opacity", type=float, default=0.5, help="overlay opacity in [0, 1]")
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    parser.add_argument("--show-image", action="store_true",
                        help="--show-dir panels start with the image itself (image | prediction | ground truth)")
    parser.add_argument("--show-scale", type=int, default=1,
                        help="--show-dir panels enlarged this many times (nearest neighbour; for small images)")
    add_launch_arguments(parser)
    return parser


def _run_dir(path: Path) -> Path | None:
    """The work dir a checkpoint or export belongs to (the folder with config.yaml)."""
    from seg_accel.runtime.workdir import CONFIG_FILE

    for folder in (path, *list(path.parents)[:3]):
        if (folder / CONFIG_FILE).is_file():
            return folder
    return None


def resolve_sources(sources: list[str]) -> tuple[str, str, Path | None]:
    """(config, weights, the work dir results go into by default)."""
    from seg_accel.runtime.workdir import CONFIG_FILE

    if len(sources) > 2:
        raise ConfigError(f"expected [CONFIG] CHECKPOINT_OR_WORK_DIR, got {len(sources)} arguments",
                          key="CHECKPOINT")
    given = Path(sources[-1])
    weights = sources[-1]
    run_dir = _run_dir(given) if given.exists() else None
    if given.is_dir() and (given / CONFIG_FILE).is_file():  # a work dir
        weights = str(pick_weights(given))
    if len(sources) == 2:
        config = Path(sources[0])
        if config.is_dir() and (config / CONFIG_FILE).is_file():  # a work dir's config
            return str(config / CONFIG_FILE), weights, run_dir
        return resolve_config(sources[0]), weights, run_dir
    if run_dir is None:
        raise ConfigError(f"{sources[0]} is not a work dir (no {CONFIG_FILE} in or above it): give the config too "
                          "(seg-accel evaluate CONFIG CHECKPOINT)", key="CHECKPOINT")
    return str(run_dir / CONFIG_FILE), weights, run_dir


def default_out(weights: str, run_dir: Path | None, work_dir: str) -> Path:
    name = Path(weights).name if Path(weights).exists() else re.sub(r"[^0-9A-Za-z_.-]+", "_", weights)
    if name == "pretrained":  # a checkpoint's own export: name it after the checkpoint
        name = Path(weights).parent.name
    return (run_dir or Path(work_dir)) / "eval" / name / "results.json"


def _evaluate(args: argparse.Namespace) -> int:
    from seg_accel.config import load_config
    from seg_accel.validate import validate_train_config

    if not 0.0 <= args.opacity <= 1.0:
        raise ConfigError(f"must be in [0, 1], got {args.opacity}", key="--opacity")
    if not 1 <= args.show_scale <= 16:
        raise ConfigError(f"must be an integer from 1 to 16, got {args.show_scale}", key="--show-scale")
    config, weights, run_dir = resolve_sources(args.sources)
    if args.num_processes is not None and args.num_processes > 1 or args.config_file is not None:
        return _launch(args, config, weights)
    cfg = load_config(config, args.cfg_options)
    train_cfg = validate_train_config(cfg)
    if ("AUC" in args.metrics or args.threshold_sweep) and len(train_cfg.classes) != 2:
        raise ConfigError(f"needs a 2-class model (foreground vs background); the data has {len(train_cfg.classes)} "
                          "classes", key="--metrics AUC" if "AUC" in args.metrics else "--threshold-sweep")
    out = Path(args.out) if args.out else default_out(weights, run_dir, train_cfg.work_dir)

    from seg_accel.inference.evaluate import evaluate_checkpoint

    with cfg.errors_located():
        evaluate_checkpoint(train_cfg, cfg, weights, args.metrics, args.aug_test, out,
                            Path(args.show_dir) if args.show_dir else None, args.opacity, args.threshold_sweep,
                            args.per_image, args.show_image, args.show_scale, args.trust_remote_code)
    return 0


def _launch(args: argparse.Namespace, config: str, weights: str) -> int:
    from seg_accel.cli.launch import relaunch

    argv = [config, weights, "--metrics", *args.metrics, "--opacity", str(args.opacity), "--show-scale",
            str(args.show_scale)]
    for flag, value in (("--out", args.out), ("--show-dir", args.show_dir)):
        if value is not None:
            argv += [flag, value]
    for flag, on in (("--aug-test", args.aug_test), ("--threshold-sweep", args.threshold_sweep),
                     ("--per-image", args.per_image), ("--show-image", args.show_image),
                     ("--trust-remote-code", args.trust_remote_code)):
        if on:
            argv.append(flag)
    if args.cfg_options:
        argv += ["--cfg-options", *args.cfg_options]
    return relaunch("seg_accel.evaluate", argv, args)


def evaluate_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_cli(_evaluate, evaluate_parser(prog), argv)
