"""``seg-accel convert-dataset NAME SOURCE [--out DIR]``: a standard dataset's official archives
to the folder layout of its config in ``configs/_base_/datasets/``."""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

from seg_accel.cli.common import run_cli
from seg_accel.errors import ConfigError

IN_PLACE = ("cityscapes", "coco_stuff164k", "voc_aug")  # they add files beside the originals


def convert_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from seg_accel.data.converters import CONVERTERS

    parser = argparse.ArgumentParser(
        prog=prog, description="Convert a dataset's official archives (as downloaded) to the layout its config in "
                               "configs/_base_/datasets/ reads. Datasets:\n" + "\n".join(
                                   f"  {name}: {text}" for name, (_, text) in CONVERTERS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(CONVERTERS), metavar="DATASET", help=", ".join(sorted(CONVERTERS)))
    parser.add_argument("source", help="the folder holding the downloaded archives (cityscapes, coco_stuff164k: the "
                                       "dataset root; voc_aug: VOCdevkit/VOC2012)")
    parser.add_argument("--out", help="where to write (required except for cityscapes, coco_stuff164k and voc_aug, "
                                      "which write beside the originals unless --out is given)")
    parser.add_argument("--aug", help="voc_aug: the extracted SBD benchmark folder")
    parser.add_argument("--clip", type=int, default=512, help="potsdam: patch size (default 512)")
    parser.add_argument("--stride", type=int, default=256, help="potsdam: stride between patches (default 256)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def staged(out: Path, convert: Callable[[Path], dict[str, int]]) -> dict[str, int]:
    """Convert into a staging folder beside ``out`` and move what it wrote into ``out`` once the
    whole conversion has succeeded: a damaged archive (a bad CRC, a bomb) leaves no partial output
    (and what ``out`` already held stays)."""
    import os
    import shutil

    stage = out.parent / f".{out.name}.converting"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        counts = convert(stage)
        for file in sorted(p for p in stage.rglob("*") if p.is_file()):
            target = out / file.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return counts


def _convert(args: argparse.Namespace) -> int:
    from seg_accel.data.converters import CONVERTERS

    source = Path(args.source)
    if not source.exists():
        raise ConfigError(f"{source} does not exist", key="SOURCE")
    if args.out is None and args.dataset not in IN_PLACE:
        raise ConfigError(f"{args.dataset} writes a new folder: give it with --out (e.g. data/{args.dataset})",
                          key="--out")
    convert = CONVERTERS[args.dataset][0]
    if args.dataset == "voc_aug":
        if args.aug is None:
            raise ConfigError("voc_aug needs the extracted SBD benchmark folder: --aug DIR", key="--aug")
        counts = convert(source, Path(args.aug))
    elif args.dataset == "potsdam":
        if args.clip < 1 or not 0 < args.stride <= args.clip:
            raise ConfigError(f"need clip >= 1 and 0 < stride <= clip, got {args.clip} and {args.stride}",
                              key="--stride")
        counts = staged(Path(args.out), lambda out: convert(source, out, args.clip, args.stride))
    elif args.dataset in IN_PLACE:
        counts = convert(source, Path(args.out) if args.out else None)
    else:
        counts = staged(Path(args.out), lambda out: convert(source, out))
    where = args.out or source
    print(f"{args.dataset}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" -> {where}")
    return 0


def convert_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_cli(_convert, convert_parser(prog), argv)
