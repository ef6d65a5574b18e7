"""``accelerate launch -m seg_accel.train CONFIG [options]``: what each training process runs
(``seg-accel train --num-processes N`` launches it too)."""
import sys

from seg_accel.cli.train import train_cli

if __name__ == "__main__":
    sys.exit(train_cli())
