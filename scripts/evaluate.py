#!/usr/bin/env python
"""Evaluate: ``[accelerate launch] scripts/evaluate.py [CONFIG.yaml] CHECKPOINT_OR_WORK_DIR [--metrics mIoU mDice
mFscore] [--aug-test] [--out results.json] [--show-dir DIR] [--opacity 0.5] [--cfg-options k=v ...]``
(the same as ``seg-accel evaluate``)."""
from seg_accel.cli import evaluate_cli
from seg_accel.cli.common import exit_process

if __name__ == "__main__":
    exit_process(evaluate_cli())  # several processes: without the teardown that can abort under gloo
