#!/usr/bin/env python
"""Print the parameter groups a config gives: ``python scripts/print_param_groups.py CONFIG.yaml [--cfg-options k=v ...]``."""
import sys

from seg_accel.cli import print_param_groups_cli

if __name__ == "__main__":
    sys.exit(print_param_groups_cli())
