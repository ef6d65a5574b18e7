#!/usr/bin/env python
"""Train: ``accelerate launch scripts/train.py CONFIG.yaml [--cfg-options k=v ...] [--work-dir DIR]``."""
from seg_accel.cli import train_cli
from seg_accel.cli.common import exit_process

if __name__ == "__main__":
    exit_process(train_cli())  # several processes: without the teardown that can abort under gloo
