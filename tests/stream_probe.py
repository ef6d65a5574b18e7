"""Run as one of several processes (RANK, WORLD_SIZE in the environment): stream a local
parquet dataset for a number of epochs through seg-accel's stream loader and write what this
process consumed, batch by batch, to OUT/rank<R>.json.

    python tests/stream_probe.py DATA_DIR OUT_DIR EPOCHS BATCH WORKERS
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seg_accel.data import build_dataset, collate  # noqa: E402
from seg_accel.data.streaming import ShardStream, StreamBatches, usable_workers  # noqa: E402
from tests.parquet_data import CLASSES, sample_id  # noqa: E402


def main() -> None:
    data_dir, out_dir, epochs, batch_size, workers = sys.argv[1], Path(sys.argv[2]), *map(int, sys.argv[3:6])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dataset = build_dataset({"type": "HubDataset", "path": data_dir, "streaming": True, "classes": CLASSES},
                            "data.train")
    stream = ShardStream(dataset, rank, world, seed=3, shuffle=True, buffer_size=5, batch_size=batch_size,
                         epochs=epochs)
    loader = StreamBatches(stream, batch_size, usable_workers(len(dataset.shards), world, workers), collate)
    batches = []
    for batch in loader:
        batches.append({
            "ids": [sample_id(x) for x in batch["pixel_values"]],
            "epochs": batch["epochs"].tolist(),
            "repeated": batch["repeated"].tolist(),
        })
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "batches": batches,
        "workers": loader.loader.num_workers,
        "modes": [stream.plan(e).mode for e in range(epochs)],
        "counts": [stream.plan(e).counts for e in range(epochs)],
    }))


if __name__ == "__main__":
    main()
