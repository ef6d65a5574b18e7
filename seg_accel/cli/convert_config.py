"""``seg-accel convert-config X.py [--out X.yaml]``: an MMSegmentation config (``.py``, 0.x or 1.x;
read without running it) as one seg-accel YAML, its bases resolved, with a comment on each key
mapped from MMSegmentation's vocabulary and a header listing what was ignored. The YAML trains
as the ``.py`` does (tests/integration/test_pyconfig_train.py compares the weights)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from seg_accel.cli.common import config_parser, run_cli
from seg_accel.errors import ConfigError


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def converted_yaml(cfg, source: str) -> str:
    """The resolved config as YAML: per top-level key, the notes of the keys under it as comments."""
    mapped = cfg.mapped
    lines = [f"# converted from {source} by `seg-accel convert-config` (the bases resolved into this file)"]
    for notice in cfg.notices:
        lines.append(f"# notice: {notice}")
    notes = dict(mapped.notes) if mapped is not None else {}
    for key, value in cfg.dict.items():
        for note_key in [k for k in notes if k == key or k.startswith(key + ".")]:
            lines.append(f"# {note_key}: {notes.pop(note_key)}")
        if isinstance(value, (dict, list, tuple)) and value:
            lines.append(yaml.safe_dump({key: _plain(value)}, sort_keys=False, default_flow_style=None,
                                        width=100).rstrip())
        else:
            scalar = yaml.safe_dump(_plain(value), default_flow_style=True).strip()
            lines.append(f"{key}: {scalar.removesuffix('...').strip()}")
    for note_key, note in notes.items():  # keys that were dropped (no value left to stand beside)
        lines.append(f"# {note_key}: {note}")
    if mapped is not None and mapped.ignored:
        lines.append("# ignored (MMSegmentation's own machinery):")
        lines += [f"#   {item}" for item in mapped.ignored]
    return "\n".join(lines) + "\n"


def _convert_config(args: argparse.Namespace) -> int:
    from seg_accel.config import load_config
    from seg_accel.runtime.storage import write_text_atomic
    from seg_accel.validate import validate_train_config

    cfg = load_config(args.config, args.cfg_options)
    if not args.no_validate:
        validate_train_config(cfg)
    text = converted_yaml(cfg, getattr(args, "config_arg", args.config))
    if args.out is None:
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    if out.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"the output is a YAML file (.yaml), got '{out.name}'", key="--out")
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists (nothing was written): choose another name or pass --force", key="--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, text)
    for notice in cfg.notices:
        print(f"notice: {notice}", file=sys.stderr)
    print(f"wrote {out} ({len(cfg.mapped.notes) if cfg.mapped else 0} keys mapped from MMSegmentation's vocabulary)")
    return 0


def convert_config_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = config_parser("Write an MMSegmentation config (.py, 0.x or 1.x, read without running it) as one "
                           "seg-accel YAML (bases resolved), with a comment on each key mapped from MMSegmentation's "
                           "vocabulary. Without --out it prints the YAML.", prog)
    parser.add_argument("--out", help="the YAML file to write (default: print it)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-validate", action="store_true", help="convert only; do not check the config")
    return run_cli(_convert_config, parser, argv)
