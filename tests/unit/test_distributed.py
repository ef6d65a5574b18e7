"""Scale-out correctness: 1 vs 2 processes, two "machines" on loopback, a failing or hanging
process, sync_bn. Every run here is a real ``accelerate launch`` (gloo on CPU)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import (
    tiny_config,
)


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


@pytest.mark.parametrize("before, lead", [(b"\rtrain:  41%|####      | 5/12", True), (b"done\n", False),
                                          (b"\rtrain:  41%|####      | 5/12\r", False)])
def test_the_killed_process_line_starts_a_line_of_its_own_after_a_progress_bar(before, lead, capsys):
    """A process killed mid-run: the launcher's one line comes after the others' progress bars,
    which leave their line open; it must still start a line (`error: ...`)."""
    import io
    import signal

    from seg_accel.cli.launch import _outcome, _StderrFilter

    errors = _StderrFilter(io.BytesIO(), io.BytesIO())
    errors.feed(before)
    errors.root = (1, -signal.SIGKILL)
    assert _outcome(1, errors, lambda why: why, 2) == 1
    err = capsys.readouterr().err
    assert err == ("\n" if lead else "") + "error: process 1 of 2 was killed (SIGKILL)\n"
