"""End to end: training, evaluation and export, on one process and on two (gloo)."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from seg_accel.data import build_dataset, build_val_loader
from seg_accel.engine import EVAL_RESULTS, FINAL_DIR
from seg_accel.inference.evaluation import collect_confusion
from seg_accel.metrics import metrics_from_confusion
from tests.conftest import (
    REPO,
    SCHEDULED,
    accelerate_launch,
    json_log,
    make_trainer,
    tiny_config,
    write_yaml,
)

RECORDING_MODULE = textwrap.dedent("""
    import os

    from seg_accel.data.synthetic import SyntheticShapes
    from seg_accel.registry import DATASETS


    @DATASETS.register()
    class RecordingShapes(SyntheticShapes):
        \"\"\"SyntheticShapes that notes which process loaded which sample.\"\"\"

        def __init__(self, record_dir: str, split: str, **kwargs):
            super().__init__(**kwargs)
            self.record_file = os.path.join(record_dir, f"{split}_rank{os.environ.get('RANK', '0')}.txt")

        def load(self, index):
            with open(self.record_file, "a") as f:
                f.write(f"{index}\\n")
            return super().load(index)
""")


@pytest.mark.multiprocess
def test_two_processes_shard_data_and_report_the_single_process_miou(tmp_path):
    from transformers import AutoModelForSemanticSegmentation

    (tmp_path / "recording_shapes.py").write_text(RECORDING_MODULE)
    records = tmp_path / "records"
    records.mkdir()
    cfg = tiny_config(custom_imports={"imports": ["recording_shapes"]}, optimizer={"type": "AdamW", "lr": 0.01})
    cfg["runner"]["max_iters"] = 20
    for split in ("train", "val"):
        cfg["data"][split].update(type="RecordingShapes", record_dir=str(records), split=split)
    cfg["data"]["train"]["num_samples"] = 128  # 20 steps x 2 samples x 2 processes: within the first epoch
    cfg["data"]["val"]["num_samples"] = 37  # odd: the shards differ in size, nothing may be padded
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = accelerate_launch([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "work")],
                             cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es), MULTI_CPU" in proc.stdout

    def seen(split, rank):
        return [int(x) for x in (records / f"{split}_rank{rank}.txt").read_text().split()]

    train0, train1 = seen("train", 0), seen("train", 1)
    assert len(train0) == len(train1) == 20 * 2  # same number of steps, 2 samples per step each
    assert not set(train0) & set(train1)  # different data on the two ranks (first epoch: no repeats)
    val0, val1 = seen("val", 0), seen("val", 1)
    assert sorted(val0 + val1) == list(range(37))  # every val sample exactly once overall

    # the mIoU the 2-process run reported equals a single-process evaluation of the same weights
    reported = json.loads((tmp_path / "work" / EVAL_RESULTS).read_text())
    assert reported["num_processes"] == 2
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "work" / FINAL_DIR)
    val_cfg = {**cfg["data"]["val"], "type": "SyntheticShapes"}
    for key in ("record_dir", "split"):
        val_cfg.pop(key)
    val_set = build_dataset(val_cfg, "data.val")
    val_set.test_mode = True
    cm = collect_confusion(model, build_val_loader(val_set, 1, 0, 0, 1), 4)
    assert cm.tolist() == reported["confusion_matrix"]
    assert metrics_from_confusion(cm)["mIoU"] == pytest.approx(reported["metrics"]["mIoU"], abs=1e-12)


@pytest.mark.multiprocess
def test_schedules_step_once_per_optimizer_step_on_any_processes_and_accumulation(tmp_path, fresh_accelerate):
    cfg = tiny_config(**SCHEDULED)
    cfg["runner"]["max_iters"] = 8
    cfg["data"]["val"] = None
    trainer, _ = make_trainer(tmp_path / "one", cfg)
    trainer.train()
    single = [(r["lr"], r["momentum"]) for r in json_log(tmp_path / "one" / "work") if r["mode"] == "train"]

    path = write_yaml(tmp_path / "two" / "exp.yaml", {**cfg, "gradient_accumulation_steps": 4})
    proc = accelerate_launch([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "two/work")],
                             cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes x 4 accumulation" in proc.stdout
    records = [r for r in json_log(tmp_path / "two" / "work") if r["mode"] == "train"]
    assert [r["iter"] for r in records] == list(range(1, 9))
    assert [(r["lr"], r["momentum"]) for r in records] == single  # identical, step for step
    warm = 1 - (1 - 0 / 3) * (1 - 0.1)
    assert single[0][0] == pytest.approx(warm * ((0.002 - 1e-5) * 1 + 1e-5), rel=1e-12)
    assert single[5][0] == pytest.approx((0.002 - 1e-5) * (1 - 5 / 8) + 1e-5, rel=1e-12)


def _broadcast_probe():
    from accelerate import Accelerator

    from seg_accel.inference.evaluation import broadcast_norm_buffers

    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    model[1].running_mean.fill_(float(acc.process_index + 1))  # differs per process, as after DDP training
    model[1].running_var.fill_(float(10 * (acc.process_index + 1)))
    broadcast_norm_buffers(acc, model)
    assert model[1].running_mean.tolist() == [1.0, 1.0] and model[1].running_var.tolist() == [10.0, 10.0]


@pytest.mark.multiprocess
def test_norm_statistics_come_from_process_zero_before_evaluation():
    from accelerate import debug_launcher

    debug_launcher(_broadcast_probe, num_processes=2)
