#!/usr/bin/env python
"""Train: ``accelerate launch scripts/train.py CONFIG.yaml [--cfg-options k=v ...] [--work-dir DIR]``."""
import sys

from seg_accel.cli import train_cli

if __name__ == "__main__":
    sys.exit(train_cli())
