"""``seg-accel convert-checkpoint SRC --config CONFIG --out OUT``: an MMSegmentation ``.pth``
checkpoint to a seg-accel export folder, or a seg-accel checkpoint or export back to an
MMSegmentation ``.pth`` (``OUT`` ending in ``.pth``)."""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from seg_accel.cli.common import add_option_arguments, run_cli
from seg_accel.errors import ConfigError

logger = logging.getLogger("seg_accel")


def convert_checkpoint_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Convert model weights between MMSegmentation and seg-accel. SRC an MMSegmentation "
                               ".pth (read as data: tensors only) -> OUT a seg-accel export folder (weights, config.json, "
                               "image processor; every tensor must fit CONFIG's model). SRC a seg-accel checkpoint or "
                               "export folder -> OUT.pth an MMSegmentation 0.30 checkpoint ({meta, state_dict}).")
    parser.add_argument("source", metavar="SRC", help="an MMSegmentation .pth, or a seg-accel checkpoint/export folder")
    parser.add_argument("--config", required=True, help="the seg-accel config of the model (YAML file or packaged "
                                                         "config name, e.g. pspnet_r50-d8_512x1024_40k_cityscapes)")
    parser.add_argument("--out", required=True, help="the export folder to write, or a .pth file")
    add_option_arguments(parser)
    return parser


def _convert(args: argparse.Namespace) -> int:
    from seg_accel.config import load_config
    from seg_accel.models import export_model, family_of_model, load_model
    from seg_accel.models.processor import build_image_processor
    from seg_accel.runtime.console import setup_logging
    from seg_accel.validate import validate_train_config

    setup_logging(None, True)
    source, out = Path(args.source), Path(args.out)
    if not source.exists():
        raise ConfigError(f"no such file or folder: {source}", key="SRC")
    cfg = load_config(args.config, args.cfg_options)
    train_cfg = validate_train_config(cfg)
    with cfg.errors_located():  # the weights come from SRC: no ImageNet backbone is downloaded
        model = load_model(str(source), model_cfg=train_cfg.model, classes=list(train_cfg.classes), key="SRC")
    if out.suffix == ".pth":
        if family_of_model(model).name != "mmseg":
            raise ConfigError(f"an MMSegmentation checkpoint holds an EncoderDecoder; {train_cfg.model.type} is not "
                              "one (write a seg-accel export: --out FOLDER)", key="--out")
        from seg_accel.models.mmseg import write_mmseg_checkpoint

        out.parent.mkdir(parents=True, exist_ok=True)
        write_mmseg_checkpoint(model.state_dict(), list(train_cfg.classes), out)
        print(f"wrote the MMSegmentation checkpoint {out} ({len(model.state_dict())} tensors) from {source}")
        return 0
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: choose a new folder (nothing was written)", key="--out")
    export_model(model, out, list(train_cfg.classes), build_image_processor(train_cfg.data))
    print(f"wrote the seg-accel export {out} from {source}: seg-accel evaluate/predict/push take it")
    return 0


def convert_checkpoint_cli(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_cli(_convert, convert_checkpoint_parser(prog), argv)
