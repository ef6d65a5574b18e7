"""Streaming parquet data over processes and workers (docs/behaviour.md section 10)."""
from __future__ import annotations

import json

import pytest
import torch

from seg_accel.data.streaming import plan_epoch, usable_workers
from tests.parquet_data import write_parquet_dataset


def test_plan_falls_back_to_examples_when_shards_are_unbalanced():
    rows = [5, 5, 15, 15]
    modes = {plan_epoch(rows, e, 0, 2, seed=0, shuffle=True, batch_size=2).mode for e in range(20)}
    assert modes == {"shards", "examples"}  # {5,15}+{5,15} is balanced; {5,5}+{15,15} is not
    for e in range(20):
        plans = [plan_epoch(rows, e, r, 2, seed=0, shuffle=True, batch_size=2) for r in range(2)]
        assert plans[0].counts == plans[1].counts and max(plans[0].counts) - min(plans[0].counts) <= 2
        if plans[0].mode == "shards":
            assert sorted(plans[0].rank_shards + plans[1].rank_shards) == [0, 1, 2, 3]


def test_usable_workers():
    assert usable_workers(4, 2, 2) == 2 and usable_workers(4, 2, 8) == 2
    assert usable_workers(3, 2, 2) == 2 and usable_workers(1, 2, 4) == 1
    assert usable_workers(8, 1, 0) == 0


def hub_config(data_dir, streaming, **data):
    from tests.conftest import NORMALIZE, tiny_config
    from tests.parquet_data import CLASSES

    cfg = tiny_config(log_config={"interval": 1})
    cfg["runner"]["max_iters"] = 3
    cfg["data"].update(
        train={"type": "HubDataset", "path": str(data_dir), "streaming": streaming, "classes": CLASSES,
               "pipeline": [{"type": "RandomFlip", "prob": 0.5}, NORMALIZE]},
        val=None, **data,
    )
    return cfg


def first_losses(work_dir):
    path = next(work_dir.glob("*.log.json"))
    return [json.loads(line)["loss"] for line in path.read_text().splitlines() if '"train"' in line]


def test_streamed_and_map_style_parquet_train_alike(tmp_path, fresh_accelerate):
    from accelerate.state import AcceleratorState, GradientState

    from tests.conftest import make_trainer

    write_parquet_dataset(tmp_path / "ds", [7, 6, 6])
    losses = {}
    for streaming in (False, True):
        trainer, _ = make_trainer(tmp_path / str(streaming), hub_config(tmp_path / "ds", streaming, shuffle=False))
        assert getattr(trainer.train_loader, "stream", None) is not None or not streaming
        trainer.train()
        losses[streaming] = first_losses(tmp_path / str(streaming) / "work")
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert losses[True][0] == losses[False][0]  # same samples, same augmentation, same first step


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shards", [[10, 10, 10, 10], [13, 12, 12]])
def test_stream_resumes_exactly_where_it_stopped(tmp_path, workers, shards):
    from seg_accel.data import build_dataset, collate
    from seg_accel.data.streaming import ShardStream, StreamBatches
    from tests.parquet_data import CLASSES

    write_parquet_dataset(tmp_path / "ds", shards)
    dataset = build_dataset({"type": "HubDataset", "path": str(tmp_path / "ds"), "streaming": True,
                             "classes": CLASSES, "pipeline": [{"type": "RandomFlip", "prob": 0.5}]}, "data.train")

    def batches(start, n):
        stream = ShardStream(dataset, 1, 2, seed=5, buffer_size=4, batch_size=3, start_samples=start)
        it = iter(StreamBatches(stream, 3, workers, collate))
        return [next(it) for _ in range(n)]

    straight = batches(0, 30)  # 90 samples: several epochs of 18-20 per process
    for stop in (4, 7, 13):
        resumed = batches(stop * 3, 30 - stop)
        for a, b in zip(straight[stop:], resumed):
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["indices"].tolist() == b["indices"].tolist()
            assert a["epochs"].tolist() == b["epochs"].tolist()
