#!/usr/bin/env python
"""Class weights from pixel counts: ``python scripts/class_weights.py CONFIG.yaml --method median_freq --out w.json``."""
import sys

from seg_accel.cli import class_weights_cli

if __name__ == "__main__":
    sys.exit(class_weights_cli())
