"""``accelerate launch -m seg_accel.evaluate [CONFIG] CHECKPOINT [options]``: what each evaluation
process runs (``seg-accel evaluate --num-processes N`` launches it too)."""
import sys

from seg_accel.cli.evaluate import evaluate_cli

if __name__ == "__main__":
    sys.exit(evaluate_cli())
