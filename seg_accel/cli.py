"""Command-line entry points behind ``scripts/*.py`` (the scripts stay thin).

Config mistakes print one ``error: <file>: <key>: <message>`` line on stderr and
exit with code 2 (a traceback only with ``--debug``); data errors exit with 1.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from seg_accel.errors import ConfigError, DataError, TrainingError


def _is_main_process() -> bool:
    """Before any process group exists: rank from the launcher's environment."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def config_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help="YAML config file")
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. optimizer.lr=0.01 data.train.pipeline.1.prob=0.5 a=[1,2]",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def run_cli(main: Callable[[argparse.Namespace], int | None], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None = None) -> int:
    args = parser.parse_args(argv)
    try:
        return main(args) or 0
    except ConfigError as exc:
        if args.debug:
            raise
        if _is_main_process():
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except (DataError, TrainingError) as exc:
        if args.debug:
            raise
        print(f"error: {_where()}{exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug or _world_size() <= 1:
            raise
        return _process_failed(exc)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _where() -> str:
    """``process R of N: `` in a multi-process run (which process an error comes from)."""
    return f"process {os.environ.get('RANK', '0')} of {_world_size()}: " if _world_size() > 1 else ""


# What a collective operation raises when another process died or stopped answering
# (gloo, NCCL, the TCP store): a consequence, not the cause.
_PEER_FAILURE_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                         "communicator was aborted", "watchdog caught collective operation timeout",
                         "timed out", "socket closed", "pair closure", "gloo/transport", "ncclremoteerror")


def _is_peer_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = f"{type(exc).__name__}: {exc}".lower()
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(marker in text for marker in _PEER_FAILURE_MARKERS)


def _process_failed(exc: BaseException) -> int:
    """A multi-process run where this process raised: its own error is shown with its
    traceback; an error that only says another process went away (the launcher stops the
    others once one exits) is one line, so the failing process's error is the one to read."""
    import traceback

    if _is_peer_failure(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "timed out" in first.lower() or "timeout" in first.lower():
            why = ("a collective operation timed out: another process stopped answering (it hangs, or is far "
                   "slower; `dist_timeout` in the config sets how long to wait)")
        else:
            why = "another process failed (its error is shown separately)"
        print(f"error: {_where()}stopped: {why}. {type(exc).__name__}: {first[:300]}", file=sys.stderr)
        return 1
    print(f"error: {_where()}failed; the other processes are stopped.\n" + "".join(traceback.format_exception(exc)),
          file=sys.stderr, end="")
    return 1


# --------------------------------------------------------------------------- train
def _train(args: argparse.Namespace) -> int:
    from seg_accel.config import load_config
    from seg_accel.engine.validate import validate_train_config

    cfg = load_config(args.config, args.cfg_options)
    train_cfg = validate_train_config(cfg, args.work_dir)  # everything is checked before anything heavy starts

    from seg_accel.engine import Trainer

    with cfg.errors_located():
        Trainer(train_cfg, cfg).train()
    return 0


def train_cli(argv: Sequence[str] | None = None) -> int:
    parser = config_parser("Train a segmentation model from a YAML config (run under `accelerate launch`).")
    parser.add_argument("--work-dir", help="where logs, checkpoints and the final model go "
                                           "(default: the config's work_dir, else work_dirs/<config name>)")
    return run_cli(_train, parser, argv)


# --------------------------------------------------------------------------- print_config
def _print_config(args: argparse.Namespace) -> int:
    from seg_accel.config import load_config
    from seg_accel.engine.validate import validate_train_config

    cfg = load_config(args.config, args.cfg_options)
    sys.stdout.write(cfg.dump())
    sys.stdout.flush()
    if not args.no_validate:
        validate_train_config(cfg)
    return 0


def print_config_cli(argv: Sequence[str] | None = None) -> int:
    parser = config_parser("Print the resolved config (after _base_, _delete_ and --cfg-options) as YAML.")
    parser.add_argument("--no-validate", action="store_true", help="print only; do not check the config")
    return run_cli(_print_config, parser, argv)


# --------------------------------------------------------------------------- print_param_groups
def _print_param_groups(args: argparse.Namespace) -> int:
    from seg_accel.config import load_config
    from seg_accel.engine.validate import validate_train_config
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


def print_param_groups_cli(argv: Sequence[str] | None = None) -> int:
    parser = config_parser("Print the optimizer's parameter groups (rule, tensors, parameters, lr, weight decay).")
    return run_cli(_print_param_groups, parser, argv)


# --------------------------------------------------------------------------- class_weights
def _class_weights(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from seg_accel.config import load_config
    from seg_accel.engine.validate import validate_train_config
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


def class_weights_cli(argv: Sequence[str] | None = None) -> int:
    from seg_accel.data.statistics import METHODS

    parser = config_parser("Count pixels per class over data.train (one pass) and write class weights.")
    parser.add_argument("--method", choices=METHODS, default="median_freq", help="how weights follow from counts")
    parser.add_argument("--out", required=True, help="JSON file for the weights (class_weight accepts it)")
    return run_cli(_class_weights, parser, argv)


# --------------------------------------------------------------------------- evaluate
def _evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seg_accel.config import load_config
    from seg_accel.engine.validate import validate_train_config

    if not 0.0 <= args.opacity <= 1.0:
        raise ConfigError(f"must be in [0, 1], got {args.opacity}", key="--opacity")
    cfg = load_config(args.config, args.cfg_options)
    train_cfg = validate_train_config(cfg)
    out = Path(args.out) if args.out else Path(train_cfg.work_dir) / "eval" / "results.json"

    from seg_accel.engine.tester import evaluate_checkpoint

    with cfg.errors_located():
        evaluate_checkpoint(train_cfg, cfg, args.checkpoint, args.metrics, args.aug_test, out,
                            Path(args.show_dir) if args.show_dir else None, args.opacity)
    return 0


def evaluate_cli(argv: Sequence[str] | None = None) -> int:
    from seg_accel.metrics import METRIC_COLUMNS

    parser = config_parser("Evaluate a checkpoint on data.test (else data.val); run under `accelerate launch` "
                           "for several processes.")
    parser.add_argument("checkpoint", help="a training checkpoint folder, a save_pretrained folder or a Hub id")
    parser.add_argument("--metrics", nargs="+", default=["mIoU"], choices=sorted(METRIC_COLUMNS),
                        help="mIoU (IoU, Acc), mDice (Dice, Acc), mFscore (Fscore, Precision, Recall)")
    parser.add_argument("--aug-test", action="store_true",
                        help="multi-scale (model.test_cfg.img_ratios, default 0.5-1.75) and flip test-time augmentation")
    parser.add_argument("--out", help="results JSON (default: <work_dir>/eval/results.json); the confusion-matrix and "
                                      "IoU charts go beside it")
    parser.add_argument("--show-dir", help="write an overlay (prediction | ground truth) per image here")
    parser.add_argument("--opacity", type=float, default=0.5, help="overlay opacity in [0, 1]")
    return run_cli(_evaluate, parser, argv)


# --------------------------------------------------------------------------- push_to_hub
def _push_to_hub(args: argparse.Namespace) -> int:
    from pathlib import Path

    from seg_accel.engine.log import setup_logging
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


def push_to_hub_cli(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
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
