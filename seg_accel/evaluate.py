"""``accelerate launch -m seg_accel.evaluate [CONFIG] CHECKPOINT [options]``: what each evaluation
process runs (``seg-accel evaluate --num-processes N`` launches it too)."""
from seg_accel.cli.common import exit_process
from seg_accel.cli.evaluate import evaluate_cli

if __name__ == "__main__":
    exit_process(evaluate_cli())  # several processes: without the teardown that can abort under gloo
