"""Training and evaluation engine."""
from seg_accel.engine.trainer import EVAL_RESULTS, FINAL_DIR, Trainer

__all__ = ["EVAL_RESULTS", "FINAL_DIR", "Trainer"]
