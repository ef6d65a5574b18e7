"""Scale-out correctness: 1 vs 2 processes, two "machines" on loopback, a failing or hanging
process, sync_bn. Every run here is a real ``accelerate launch`` (gloo on CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import (
    tiny_config,
)

ITERS = 10
# Why not bitwise: float32 sums in another order (one backward over 4 images vs two over 2
# images, then gloo's all-reduce) differ in the last bits (~1e-7 relative). AdamW's step is
# lr * m / (sqrt(v) + eps): for almost every weight that is a ~1e-7 relative change of a step
# of ~lr = 1e-3 (measured: ~1e-7 after 10 iterations). A weight whose gradient nearly cancels
# to the size of eps = 1e-8 is the exception: there the step depends on g / eps, and rounding
# noise of ~1e-10 on such a gradient moves it by up to lr * 1e-10 / eps = 1e-5. Measured here:
# 1.3e-6 on one weight (stage 4's patch embedding, at the first steps), 1.2e-7 on every other;
# the weights move by ~1.5e-3 between iterations 5 and 10, and per-process BatchNorm moves
# them apart by far more than ATOL (the control run below).
ATOL = 1e-5


def equivalence_config(samples_per_gpu: int, norm_eval: bool = True) -> dict:
    """Tiny SegFormer, dropout and stochastic depth off (their masks come from each process's
    own RNG), BatchNorm (the decode head's) in eval mode, class-weighted CE, grad clipping,
    random flips (seeded by the sample's global position, so the same on any process count)."""
    cfg = tiny_config(checkpoint_config={"interval": 5})
    cfg["model"]["config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  classifier_dropout_prob=0.0, drop_path_rate=0.0)
    cfg["model"]["norm_eval"] = norm_eval
    cfg["model"]["decode_head"] = {"loss_decode": {"type": "CrossEntropyLoss", "class_weight": [0.5, 1.0, 2.0, 1.5]}}
    cfg["optimizer_config"] = {"grad_clip": {"max_norm": 0.5, "norm_type": 2}}
    cfg["data"]["samples_per_gpu"] = samples_per_gpu
    cfg["runner"]["max_iters"] = ITERS
    cfg["log_config"] = {"interval": 5}
    del cfg["data"]["val"]
    return cfg


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


FAULT_HOOKS = '''
import os
import time

from seg_accel.engine.hooks import Hook
from seg_accel.registry import HOOKS


@HOOKS.register()
class FailOnRank(Hook):
    """Raises (or, with hang, sleeps) on one process at one iteration; notes each process's pid."""

    def __init__(self, rank=1, at=5, hang=0.0, pid_dir="."):
        self.rank, self.at, self.hang, self.pid_dir = rank, at, hang, pid_dir

    def before_run(self, runner):
        with open(os.path.join(self.pid_dir, f"pid_{runner.accelerator.process_index}"), "w") as f:
            f.write(str(os.getpid()))

    def after_train_iter(self, runner):
        if runner.iter == self.at and runner.accelerator.process_index == self.rank:
            if self.hang:
                time.sleep(self.hang)
            raise RuntimeError(f"planted failure on rank {self.rank} at iteration {self.at}")
'''


def test_sync_bn_conversion_and_its_notices():
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from seg_accel.models.builder import batch_norm_layers, convert_sync_bn

    model = SegformerForSemanticSegmentation(SegformerConfig(**tiny_config()["model"]["config"], num_labels=4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    same, note = convert_sync_bn(model, 1, "cuda")
    assert same is model and "one process" in note
    same, note = convert_sync_bn(model, 2, "cpu")
    assert same is model and "GPUs only" in note and not any(
        isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    converted, note = convert_sync_bn(model, 8, "cuda")  # the GPU path (conversion runs anywhere)
    layers = batch_norm_layers(converted)
    assert layers and all(isinstance(m, torch.nn.SyncBatchNorm) for m in layers)
    assert "1 BatchNorm layer(s) converted to SyncBatchNorm across 8 processes" in note
    after = converted.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    _, note = convert_sync_bn(torch.nn.Linear(2, 2), 2, "cuda")
    assert "no BatchNorm" in note


@pytest.mark.parametrize(("message", "peer"), [
    # what gloo raised in a process whose peer died or hung, seen in these tests' runs
    ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
     "[127.0.0.1]:24747. This is typically caused by a remote worker crashing.", True),
    ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 5000ms "
     "for send operation to complete", True),
    ("Application timeout caused pair closure", True),
    ("planted failure on rank 1 at iteration 5", False),
    ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
])
def test_errors_caused_by_another_process_are_told_apart(message, peer):
    from seg_accel.cli import _is_peer_failure

    assert _is_peer_failure(RuntimeError(message)) is peer
    assert _is_peer_failure(ValueError(message)) is False  # only what collectives raise
