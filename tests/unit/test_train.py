"""End to end: training, evaluation and export, on one process and on two (gloo)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from seg_accel.engine import EVAL_RESULTS, FINAL_DIR
from seg_accel.models import segmentation_logits
from tests.conftest import (
    SCHEDULED,
    json_log,
    make_trainer,
    tiny_config,
)


def test_single_process_train_evaluate_export(tmp_path, fresh_accelerate):
    from transformers import AutoModelForSemanticSegmentation

    trainer, cfg = make_trainer(tmp_path, tiny_config())
    before = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    results = trainer.train()
    work = tmp_path / "work"
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert trainer.iter == 4 and trainer.optimizer_steps == 4
    assert trainer.schedulers[0].last_iter == 3  # set before each of the 4 steps: indices 0..3
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained

    # the export is an ordinary transformers model with the data's class names
    final = work / FINAL_DIR
    assert (final / "model.safetensors").is_file()
    config = json.loads((final / "config.json").read_text())
    assert config["id2label"] == {"0": "background", "1": "circle", "2": "square", "3": "triangle"}
    loaded = AutoModelForSemanticSegmentation.from_pretrained(final).eval()
    model.eval()
    x = torch.stack([trainer.val_set[i]["pixel_values"] for i in range(3)])
    with torch.no_grad():
        assert torch.equal(segmentation_logits(loaded, x), segmentation_logits(model, x))

    # the reported numbers are the ones written to disk, and the resolved config is saved
    saved = json.loads((work / EVAL_RESULTS).read_text())
    assert saved["metrics"]["mIoU"] == pytest.approx(results["mIoU"])
    assert set(saved["per_class"]["IoU"]) == {"background", "circle", "square", "triangle"}
    assert yaml.safe_load((work / "config.yaml").read_text()) == cfg.dict
    log = next(work.glob("*.log")).read_text()
    assert "Iter [2/4]" in log and "Iter [4/4]" in log and "decode.loss_ce" in log and "mIoU" in log


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, fresh_accelerate):
    data = tiny_config()["data"]
    data.update(val=None, workers_per_gpu=1)  # also covers loading in a worker process
    trainer, _ = make_trainer(tmp_path, tiny_config(gradient_accumulation_steps=3, data=data))
    seen = []
    original = trainer._batch

    def counting(data_iter):
        batch, waited = original(data_iter)
        seen.append(batch["indices"].tolist())
        return batch, waited

    trainer._batch = counting
    lrs = []
    step = trainer.train_iter

    def recording(data_iter):
        step(data_iter)
        lrs.append(trainer.scheduled["lr"])

    trainer.train_iter = recording
    trainer.train()
    assert len(seen) == 4 * 3  # 3 micro-batches per optimizer step
    base = trainer.cfg.optimizer["lr"]
    assert lrs == pytest.approx([base * (1 - i / 4) for i in range(4)])  # poly steps once per optimizer step


def test_bf16_mixed_precision_from_the_config(tmp_path, fresh_accelerate):
    cfg = tiny_config(mixed_precision="bf16")
    cfg["runner"]["max_iters"] = 2
    trainer, _ = make_trainer(tmp_path, cfg)
    assert trainer.accelerator.mixed_precision == "bf16"
    inner = []
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.decode_head.classifier.register_forward_hook(lambda m, i, out: inner.append(out.dtype))
    segmentation_logits(trainer.model, trainer.val_set[0]["pixel_values"][None])
    assert inner == [torch.bfloat16]  # the prepared forward runs under autocast
    results = trainer.train()
    assert 0.0 <= results["mIoU"] <= 100.0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())  # fp32 weights


@pytest.mark.slow  # a training and a `seg-accel evaluate` subprocess: CI's slow step runs it
def test_bf16_on_the_cpu_keeps_normalisation_in_fp32(tmp_path, fresh_accelerate):
    """CPU autocast runs layer/batch norm in the dtype it gets (bf16 after a linear layer);
    CUDA's runs them in fp32. seg-accel makes the CPU do as CUDA does: norms get fp32 inputs
    and give fp32 outputs, the linear layers after them still compute in bf16; `seg-accel
    evaluate` does the same."""
    from seg_accel.models.builder import keep_norms_fp32

    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    seen = []
    for layer in block:
        layer.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(torch.randn(2, 8))
    assert seen == [torch.bfloat16] * 3  # left alone, the norm computes in bf16
    assert "1 normalisation layer(s)" in keep_norms_fp32(block)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        block(torch.randn(2, 8))
    assert seen == [torch.bfloat16, torch.float32, torch.bfloat16]
    seen.clear()
    block(torch.randn(2, 8))  # without autocast nothing changes
    assert seen == [torch.float32] * 3

    cfg = tiny_config(mixed_precision="bf16")
    cfg["runner"]["max_iters"] = 1
    trainer, _ = make_trainer(tmp_path, cfg)
    model = trainer.accelerator.unwrap_model(trainer.model)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d))]
    dtypes = []
    handles = [norm.register_forward_hook(lambda m, i, out: dtypes.append((i[0].dtype, out.dtype))) for norm in norms]
    segmentation_logits(trainer.model, trainer.val_set[0]["pixel_values"][None])
    assert len(dtypes) == len(norms) > 0 and set(dtypes) == {(torch.float32, torch.float32)}
    assert f"{len(norms)} normalisation layer(s) compute in fp32" in next((tmp_path / "work").glob("*.log")).read_text()
    for handle in handles:
        handle.remove()
    # `seg-accel evaluate` of the run computes as its training's evaluation did: the same confusion matrix
    from tests.conftest import run_script

    trainer.train()
    work = tmp_path / "work"
    proc = run_script(["-m", "seg_accel", "evaluate", str(work), "--out", str(tmp_path / "again.json")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "normalisation layer(s) compute in fp32" in proc.stdout + proc.stderr
    again = json.loads((tmp_path / "again.json").read_text())["confusion_matrix"]
    assert again == json.loads((work / "eval_results.json").read_text())["confusion_matrix"]


def test_fp16_on_cpu_is_announced(tmp_path, fresh_accelerate):
    cfg = tiny_config(mixed_precision="fp16")
    cfg["runner"]["max_iters"] = 1
    make_trainer(tmp_path, cfg)  # Accelerate silently trains in fp32 on the CPU: we say so
    assert "fp16 mixed precision needs a GPU" in next((tmp_path / "work").glob("*.log")).read_text()


def test_grad_norm_is_the_preclip_total_norm_once_per_optimizer_step(tmp_path, fresh_accelerate):
    cfg = tiny_config(gradient_accumulation_steps=2, optimizer_config={"grad_clip": {"max_norm": 0.05}},
                      log_config={"interval": 1})
    cfg["runner"]["max_iters"] = 3
    cfg["data"]["val"] = None
    trainer, _ = make_trainer(tmp_path, cfg)
    acc = trainer.accelerator
    original = acc.clip_grad_norm_
    calls = []

    def recording(parameters, max_norm, norm_type=2):
        parameters = list(parameters)
        copies = []
        for p in parameters:  # the same gradients, on tensors of our own
            if p.grad is not None:
                copies.append(p.detach().clone().requires_grad_(True))
                copies[-1].grad = p.grad.detach().clone()
        reference = torch.nn.utils.clip_grad_norm_(copies, max_norm, norm_type)
        norm = original(parameters, max_norm, norm_type)
        clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        calls.append((acc.sync_gradients, float(reference), float(norm), float(clipped)))
        return norm

    acc.clip_grad_norm_ = recording
    trainer.train()
    assert len(calls) == 3  # once per optimizer step, not per micro-batch
    assert all(synced for synced, *_ in calls)
    logged = [r["grad_norm"] for r in json_log(tmp_path / "work") if r["mode"] == "train"]
    for (_, reference, norm, clipped), value in zip(calls, logged):
        assert norm == pytest.approx(reference, rel=1e-6) and value == pytest.approx(norm, rel=1e-6)
        assert norm > 0.05 and clipped == pytest.approx(0.05, rel=1e-4)  # it really clipped


def test_a_step_skipped_by_the_loss_scaler_does_not_advance_the_schedules(tmp_path, fresh_accelerate):
    """fp16 needs a GPU, so the scaler's overflow report is simulated on step 2 (of 0..4)."""
    cfg = tiny_config(**SCHEDULED)
    cfg["runner"]["max_iters"] = 5
    cfg["data"]["val"] = None
    trainer, _ = make_trainer(tmp_path, cfg)
    optimizer = trainer.optimizer
    original = optimizer.step
    steps = []

    def step(*args, **kwargs):
        original(*args, **kwargs)
        optimizer._is_overflow = len(steps) == 2  # what Accelerate sets when the GradScaler skips a step
        steps.append(optimizer.step_was_skipped)

    optimizer.step = step
    trainer.train()
    assert steps == [False, False, True, False, False]
    lrs = [r["lr"] for r in json_log(tmp_path / "work") if r["mode"] == "train"]
    assert lrs[2] == lrs[3]  # the schedule waited one step
    assert trainer.optimizer_steps == 4 and trainer.iter == 5
    assert all(scheduler.last_iter == 3 for scheduler in trainer.schedulers)  # set before the 5th iteration




def test_a_fused_step_skipped_inside_its_kernel_is_seen_by_the_lowered_scale(tmp_path, fresh_accelerate):
    """A fused optimizer under the fp16 GradScaler is always called (it skips inside its kernel), so
    Accelerate's step_was_skipped stays False; the scaler halving its scale is what tells. Simulated
    (fp16 needs a GPU; bench/gpu_check.sh checks it for real): the scale halves on step 2 (of 0..4)."""
    cfg = tiny_config(**SCHEDULED)
    cfg["runner"]["max_iters"] = 5
    cfg["data"]["val"] = None
    trainer, _ = make_trainer(tmp_path, cfg)

    class Scaler:  # the parts of GradScaler the loop touches outside the optimizer
        value = 65536.0

        def scale(self, loss):
            return loss

        def unscale_(self, optimizer):
            pass

        def get_scale(self):
            return self.value

    scaler = Scaler()
    trainer.accelerator.scaler = scaler
    optimizer = trainer.optimizer
    original = optimizer.step
    calls = []

    def step(*args, **kwargs):
        original(*args, **kwargs)
        if len(calls) == 2:
            scaler.value /= 2  # what GradScaler.update does after an overflow
        calls.append(optimizer.step_was_skipped)

    optimizer.step = step
    trainer.train()
    assert calls == [False] * 5  # Accelerate saw nothing
    lrs = [r["lr"] for r in json_log(tmp_path / "work") if r["mode"] == "train"]
    assert lrs[2] == lrs[3] and lrs[1] != lrs[2]  # the schedule waited one step
    assert trainer.optimizer_steps == 4 and trainer.iter == 5
