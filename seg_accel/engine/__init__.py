"""Training and evaluation engine: the loop, its hooks and the components they call."""
from seg_accel.engine.trainer import Trainer
from seg_accel.engine.workdir import CONFIG_FILE, EVAL_RESULTS, FINAL_DIR, RUN_INFO

__all__ = ["CONFIG_FILE", "EVAL_RESULTS", "FINAL_DIR", "RUN_INFO", "Trainer"]
