"""``python -m seg_accel COMMAND ...``: the same as the ``seg-accel`` command."""
import sys

from seg_accel.cli import main

if __name__ == "__main__":
    sys.exit(main())
