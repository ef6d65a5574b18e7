"""``accelerate launch -m seg_accel.train CONFIG [options]``: what each training process runs
(``seg-accel train --num-processes N`` launches it too)."""
from seg_accel.cli.common import exit_process
from seg_accel.cli.train import train_cli

if __name__ == "__main__":
    exit_process(train_cli())  # several processes: without the teardown that can abort under gloo
