"""``seg-accel train``: check the config, then train here or on several processes.

``seg-accel train CONFIG`` trains in this process; with ``--num-processes N`` or
``--config-file ACCEL.yaml`` the config is checked here first (a mistake is one line and
exit code 2, before any process starts), then Accelerate's launcher starts the processes
(``python -m seg_accel.train``). ``accelerate launch scripts/train.py CONFIG`` and
``accelerate launch -m seg_accel.train CONFIG`` run the same code in each process.
"""
from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seg_accel.cli.common import add_config_arguments, run_cli, world_size
from seg_accel.errors import ConfigError

def train_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Train a segmentation model from a YAML config.")
    add_config_arguments(parser)
    # MMSegmentation's tools/train.py flags, each the same as the config key it names
    parser.add_argument("--work-dir", help="where logs, checkpoints and the final model go "
                                           "(default: the config's work_dir, else work_dirs/<config name>)")
    parser.add_argument("--load-from", help="weights to start from (checkpoint or export folder, .safetensors, or an "
                                            "MMSegmentation .pth): load_from")
    parser.add_argument("--resume-from", help="a checkpoint to continue exactly: resume_from")
    parser.add_argument("--auto-resume", action="store_true", help="continue from the newest checkpoint in the work dir")
    parser.add_argument("--no-validate", action="store_true", help="no evaluation at all (evaluation: null)")
    parser.add_argument("--seed", type=int, help="random seed (seed)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (deterministic: true)")
    launch = parser.add_argument_group("several processes (started through `accelerate launch`)")
    launch.add_argument("--num-processes", type=int, help="processes on this machine (one per GPU; CPU processes "
                                                          "without GPUs)")
    launch.add_argument("--config-file", help="an Accelerate launch config (multi-GPU, multi-node, FSDP, DeepSpeed: "
                                              "configs/accelerate/)")
    launch.add_argument("--main-process-port", type=int, help="port of the main process (default: a free one)")
    return parser


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the MMSegmentation-style flags set (they win over the file and --cfg-options)."""
    overrides: dict[str, Any] = {}
    if args.load_from is not None:
        overrides["load_from"] = args.load_from
    if args.resume_from is not None:
        overrides["resume_from"] = args.resume_from
    if args.auto_resume:
        overrides["auto_resume"] = True
    if args.no_validate:
        overrides["evaluation"] = None
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.deterministic:
        overrides["deterministic"] = True
    return overrides


def load_train_config(args: argparse.Namespace) -> tuple[Any, Any]:
    """(resolved config, validated TrainConfig)."""
    from seg_accel.config import load_config
    from seg_accel.validate import validate_train_config

    cfg = load_config(args.config, args.cfg_options, overrides=config_overrides(args))
    return cfg, validate_train_config(cfg, args.work_dir)


def interrupted_message(args: argparse.Namespace, why: str = "interrupted") -> str:
    """One line starting with ``why``: where the last checkpoint is and how to continue from it."""
    from seg_accel.runtime.checkpoints import latest_checkpoint

    try:
        _, train_cfg = load_train_config(args)
    except ConfigError:
        return why
    checkpoints = train_cfg.checkpoint_config
    folder = Path(checkpoints.out_dir) if checkpoints is not None and checkpoints.out_dir else Path(train_cfg.work_dir)
    latest = latest_checkpoint(folder)
    again = ["seg-accel", "train", getattr(args, "config_arg", args.config)]
    if args.work_dir:
        again += ["--work-dir", args.work_dir]
    if latest is None:
        return (f"{why}: every process stopped; no checkpoint was saved in {folder} "
                f"(start again: {shlex.join(again)})")
    return (f"{why}: every process stopped; the last checkpoint is {latest}. Resume with: "
            f"{shlex.join([*again, '--resume-from', str(latest)])} (or --auto-resume)")


def _train(args: argparse.Namespace) -> int:
    if args.num_processes is not None or args.config_file is not None:
        if args.num_processes is not None and args.num_processes < 1:
            raise ConfigError(f"must be >= 1, got {args.num_processes}", key="--num-processes")
        if world_size() > 1:
            raise ConfigError("already running under a launcher: leave out --num-processes/--config-file",
                              key="--num-processes")
        if args.config_file is not None or args.num_processes > 1:
            return _launch(args)  # the config is checked while the launcher starts
    cfg, train_cfg = load_train_config(args)  # everything is checked before anything heavy starts
    from seg_accel.engine import Trainer

    with cfg.errors_located():
        Trainer(train_cfg, cfg).train()
    return 0


def _launch(args: argparse.Namespace) -> int:
    from seg_accel.cli.launch import launch, launch_arguments

    return launch("seg_accel.train", child_arguments(args),
                  launch_arguments(args.num_processes, args.config_file, args.main_process_port),
                  lambda why: interrupted_message(args, why), args.num_processes, check=lambda: load_train_config(args))


def child_arguments(args: argparse.Namespace) -> list[str]:
    """The command line each launched process gets: the same config and flags (no launch flags)."""
    argv = [str(Path(args.config).resolve())]
    for flag, value in (("--work-dir", args.work_dir), ("--load-from", args.load_from),
                        ("--resume-from", args.resume_from), ("--seed", args.seed)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (("--auto-resume", args.auto_resume), ("--no-validate", args.no_validate),
                     ("--deterministic", args.deterministic), ("--debug", args.debug)):
        if on:
            argv.append(flag)
    if args.cfg_options:
        argv += ["--cfg-options", *args.cfg_options]
    return argv


def train_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_cli(_train, train_parser(prog), argv, on_interrupt=interrupted_message)
