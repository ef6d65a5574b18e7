"""Streaming parquet data over processes and workers (docs/behaviour.md section 10)."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import REPO, script_env
from tests.parquet_data import write_parquet_dataset
from tests.unit.test_streaming import hub_config


def run_probe(data_dir, out_dir, epochs, batch_size, workers, world=2):
    procs = [
        subprocess.Popen([sys.executable, str(REPO / "tests/stream_probe.py"), str(data_dir), str(out_dir),
                          str(epochs), str(batch_size), str(workers)],
                         env=script_env(RANK=str(rank), WORLD_SIZE=str(world)), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(world)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)  # a hang fails the test
        assert proc.returncode == 0, err[-3000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("shards, batch_size", [([10, 10, 10, 10], 2), ([13, 12, 12], 2)],
                         ids=["4 shards, 40 samples", "3 shards, 37 samples"])
def test_two_processes_two_workers_see_every_sample_once_per_epoch(tmp_path, shards, batch_size):
    ids = write_parquet_dataset(tmp_path / "ds", shards)
    epochs = 2
    ranks = run_probe(tmp_path / "ds", tmp_path / "out", epochs, batch_size, workers=2)
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"])  # the same number of steps
    for r in ranks:
        assert r["workers"] == 2  # both workers of both processes read
    expected_mode = "shards" if len(shards) % 2 == 0 else "examples"
    assert ranks[0]["modes"] == [expected_mode] * epochs
    for epoch in range(epochs):
        fresh, repeats = Counter(), []
        for r in ranks:
            seen = [(i, rep) for b in r["batches"] for i, e, rep in zip(b["ids"], b["epochs"], b["repeated"])
                    if e == epoch]
            fresh.update(i for i, rep in seen if not rep)
            repeats.append(sum(rep for _, rep in seen))
            assert len(seen) == max(ranks[0]["counts"][epoch])  # every process delivers the same count
        assert sorted(fresh) == ids  # every sample exactly once: none missed, none twice
        assert all(n <= batch_size for n in repeats)  # repeats: at most one batch per process
        assert sum(repeats) == sum(shards) % 2 * (1 if expected_mode == "examples" else 0)




@pytest.mark.multiprocess
def test_streamed_training_on_two_processes_logs_the_repeats(tmp_path):
    from tests.conftest import accelerate_launch, write_yaml

    write_parquet_dataset(tmp_path / "ds", [13, 12, 12])  # 37 samples: one process gets 19, the other 18
    cfg = hub_config(tmp_path / "ds", True, workers_per_gpu=2)
    cfg["runner"]["max_iters"] = 12  # 12 x 2 = 24 samples per process: past the first epoch (19)
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = accelerate_launch([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "work")],
                             cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "streaming 3 parquet file(s), 3 shard(s) (row groups), 37 samples, 2 process(es) x 2 worker(s): " \
           "examples mode" in proc.stdout
    # every process's count comes from the shared plan: the main process reports them all
    assert "epoch 0: samples per process 19, 18; repeated 0, 1 so that every process runs the same steps" \
        in proc.stdout
    log = next((tmp_path / "work").glob("*.log")).read_text()
    assert "Iter [12/12]" in log


