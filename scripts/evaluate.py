#!/usr/bin/env python
"""Evaluate: ``[accelerate launch] scripts/evaluate.py CONFIG.yaml CHECKPOINT [--metrics mIoU mDice mFscore]
[--aug-test] [--out results.json] [--show-dir DIR] [--opacity 0.5] [--cfg-options k=v ...]``."""
import os
import sys

# This file is called evaluate.py: keep its folder off the import path, so that `import evaluate`
# (Hugging Face's library) finds the library and not this script.
_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from seg_accel.cli import evaluate_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(evaluate_cli())
