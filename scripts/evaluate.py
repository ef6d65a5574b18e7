#!/usr/bin/env python
"""Evaluate: ``[accelerate launch] scripts/evaluate.py [CONFIG.yaml] CHECKPOINT_OR_WORK_DIR [--metrics mIoU mDice
mFscore] [--aug-test] [--out results.json] [--show-dir DIR] [--opacity 0.5] [--cfg-options k=v ...]``
(the same as ``seg-accel evaluate``)."""
import sys

from seg_accel.cli import evaluate_cli

if __name__ == "__main__":
    sys.exit(evaluate_cli())
