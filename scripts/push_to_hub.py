#!/usr/bin/env python
"""Publish a run: ``python scripts/push_to_hub.py WORK_DIR_OR_CHECKPOINT REPO_ID [--private] [--revision BRANCH]
[--commit-message MSG] [--config CONFIG.yaml]`` (token from HF_TOKEN or `hf auth login`)."""
import sys

from seg_accel.cli import push_to_hub_cli

if __name__ == "__main__":
    sys.exit(push_to_hub_cli())
