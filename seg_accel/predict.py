"""``accelerate launch -m seg_accel.predict SOURCE [CHECKPOINT] INPUTS... --out DIR``: what each
prediction process runs (``seg-accel predict --num-processes N`` launches it too)."""
from seg_accel.cli.common import exit_process
from seg_accel.cli.predict import predict_cli

if __name__ == "__main__":
    exit_process(predict_cli())
