#!/usr/bin/env python
"""Predict: ``[accelerate launch] scripts/predict.py SOURCE [CHECKPOINT] INPUTS... --out DIR [--probs npy]
[--aug-test] [--no-overlays] [--cfg-options k=v ...]`` (the same as ``seg-accel predict``)."""
from seg_accel.cli import predict_cli
from seg_accel.cli.common import exit_process

if __name__ == "__main__":
    exit_process(predict_cli())
