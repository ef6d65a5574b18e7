#!/usr/bin/env python
"""Print the resolved config: ``python scripts/print_config.py CONFIG.yaml [--cfg-options k=v ...]``."""
import sys

from seg_accel.cli import print_config_cli

if __name__ == "__main__":
    sys.exit(print_config_cli())
