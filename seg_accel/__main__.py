"""``python -m seg_accel COMMAND ...``: the same as the ``seg-accel`` command."""
from seg_accel.cli import main
from seg_accel.cli.common import exit_process

if __name__ == "__main__":
    exit_process(main())  # under a launcher: without the teardown that can abort under gloo
