"""The small commands: print-config, param-groups, class-weights, push, list-configs."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from seg_accel.cli.common import config_parser, packaged_configs, run_cli
from seg_accel.errors import ConfigError


# --------------------------------------------------------------------------- print_config
def _print_config(args: argparse.Namespace) -> int:
    from seg_accel.config import load_config
    from seg_accel.validate import validate_train_config

    cfg = load_config(args.config, args.cfg_options)
    sys.stdout.write(cfg.dump())
    sys.stdout.flush()
    if not args.no_validate:
        validate_train_config(cfg)
    return 0


def print_config_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = config_parser("Print the resolved config (after _base_, _delete_ and --cfg-options) as YAML.", prog)
    parser.add_argument("--no-validate", action="store_true", help="print only; do not check the config")
    return run_cli(_print_config, parser, argv)


# --------------------------------------------------------------------------- print_param_groups
def _print_param_groups(args: argparse.Namespace) -> int:
    from seg_accel.config import load_config
    from seg_accel.validate import validate_train_config
    from seg_accel.models.builder import build_empty_model, build_model
    from seg_accel.optim import build_constructor, param_group_table

    cfg = load_config(args.config, args.cfg_options)
    train_cfg = validate_train_config(cfg)
    with cfg.errors_located():
        # weights are not needed for the table: the architecture on the meta device is enough
        model = build_empty_model(train_cfg.model, train_cfg.classes)
        if model is None:  # a Hub model whose config is not available locally: load it
            model = build_model(train_cfg.model, train_cfg.classes)
        constructor = build_constructor(train_cfg.optimizer)
        optimizer = constructor(model)
    print(param_group_table(model, optimizer, getattr(constructor, "notes", None)))
    return 0


def print_param_groups_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = config_parser("Print the optimizer's parameter groups (rule, tensors, parameters, lr, weight decay).",
                           prog)
    return run_cli(_print_param_groups, parser, argv)


# --------------------------------------------------------------------------- class_weights
def _class_weights(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from seg_accel.config import load_config
    from seg_accel.validate import validate_train_config
    from seg_accel.data import build_dataset
    from seg_accel.data.statistics import class_weights, count_pixels, frequency_table

    cfg = load_config(args.config, args.cfg_options)
    train_cfg = validate_train_config(cfg)
    with cfg.errors_located():
        # the raw labels (label_map and reduce_zero_label applied), not the augmented crops
        dataset_cfg = {**train_cfg.data.train, "pipeline": []}
        dataset = build_dataset(dataset_cfg, "data.train")
    ignore_index = train_cfg.model.decode_head.ignore_index
    counts = count_pixels(dataset, ignore_index)
    weights = class_weights(counts, args.method)
    print(frequency_table(train_cfg.classes, counts, weights))
    result = {
        "method": args.method,
        "classes": train_cfg.classes,
        "class_weight": weights,
        "pixel_counts": counts.pixels.tolist(),
        "image_pixel_counts": counts.image_pixels.tolist(),
        "ignored_pixels": counts.ignored,
        "other_pixels": counts.other,
        "images": counts.images,
        "ignore_index": ignore_index,
        "config": str(args.config),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} (use it as class_weight: {out})")
    return 0


def class_weights_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    from seg_accel.data.statistics import METHODS

    parser = config_parser("Count pixels per class over data.train (one pass) and write class weights.", prog)
    parser.add_argument("--method", choices=METHODS, default="median_freq", help="how weights follow from counts")
    parser.add_argument("--out", required=True, help="JSON file for the weights (class_weight accepts it)")
    return run_cli(_class_weights, parser, argv)


# --------------------------------------------------------------------------- push_to_hub
def _push_to_hub(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seg_accel.runtime.console import setup_logging
    from seg_accel.hub.publish import publish

    setup_logging(None, True)
    if args.retries < 1:
        raise ConfigError(f"must be >= 1, got {args.retries}", key="--retries")
    ok = publish(Path(args.source), args.repo_id, private=True if args.private else None, revision=args.revision,
                 commit_message=args.commit_message, config=Path(args.config) if args.config else None,
                 retries=args.retries)
    if not ok:
        print(f"error: the push to {args.repo_id} failed (see the warnings above)", file=sys.stderr)
        return 1
    print(f"pushed {args.source} to {args.repo_id}")
    return 0


def push_to_hub_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Push a finished run (its work dir), a checkpoint or a save_pretrained folder to the Hub with "
                    "a model card. The token comes from HF_TOKEN or `hf auth login`.")
    parser.add_argument("source", metavar="WORK_DIR_OR_CHECKPOINT",
                        help="a work dir (pushes final/), a checkpoint (iter_4000, best_mIoU_iter_8000) or an export")
    parser.add_argument("repo_id", metavar="REPO_ID", help="user/name (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", help="a branch to push to (created if missing)")
    parser.add_argument("--commit-message", help="default: 'seg-accel: <source name>'")
    parser.add_argument("--config", help="the training config, for a checkpoint without an export whose work dir "
                                         "has no config.yaml")
    parser.add_argument("--retries", type=int, default=3, help="attempts before giving up")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return run_cli(_push_to_hub, parser, argv)


# --------------------------------------------------------------------------- list-configs
def list_configs_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="List the configs shipped with seg-accel (train them by "
                                                            "name: seg-accel train demo/segformer_synthetic).")
    parser.add_argument("pattern", nargs="?", default="", help="only names containing this text")
    args = parser.parse_args(argv)
    for name in packaged_configs():
        if args.pattern in name:
            print(name)
    return 0
