"""The ``seg-accel`` command in this process: subcommands, MMSegmentation's train flags, packaged
configs, the loss interface checked at validation."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from seg_accel.cli import main
from tests.conftest import REPO, json_log, make_trainer, tiny_config, write_yaml


def short_config(**overrides) -> dict:
    cfg = tiny_config(**overrides)
    cfg["log_config"] = {"interval": 1}
    return cfg


def train(tmp_path, cfg: dict, *flags: str, name: str = "work") -> int:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    path = write_yaml(tmp_path / f"{name}.yaml", cfg)
    return main(["train", str(path), "--work-dir", str(tmp_path / name), *flags])


def final_weights(work) -> dict[str, torch.Tensor]:
    return load_file(str(work / "final" / "model.safetensors"))


def test_usage_version_and_unknown_command(capsys):
    assert main([]) == 2 and "commands:" in capsys.readouterr().out
    assert main(["--version"]) == 0 and "seg-accel 0.1.0" in capsys.readouterr().out
    assert main(["trian"]) == 2 and "Did you mean: train?" in capsys.readouterr().err


def test_list_configs_and_train_by_packaged_name(capsys):
    assert main(["list-configs", "demo"]) == 0
    assert capsys.readouterr().out.split() == ["demo/mask2former_synthetic", "demo/segformer_synthetic",
                                              "demo/segformer_thin_curves"]
    from seg_accel.cli.common import resolve_config

    packaged = REPO / "seg_accel" / "configs" / "demo" / "segformer_synthetic.yaml"
    for name in ("demo/segformer_synthetic", "demo/segformer_synthetic.yaml", "configs/demo/segformer_synthetic.yaml"):
        assert resolve_config(name) in (str(packaged), name)  # from the repo root the path itself exists
    assert main(["print-config", "demo/segformer_synthetic", "--cfg-options", "seed=3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 3


def test_cfg_options_take_a_list_of_mappings(tmp_path, fresh_accelerate):
    option = "model.decode_head.loss_decode=[{type: CrossEntropyLoss}, {type: DiceLoss, loss_weight: 3.0}]"
    cfg = short_config()
    cfg["runner"]["max_iters"] = 2
    assert train(tmp_path, cfg, "--cfg-options", option) == 0
    saved = yaml.safe_load((tmp_path / "work" / "config.yaml").read_text())
    assert saved["model"]["decode_head"]["loss_decode"] == [{"type": "CrossEntropyLoss"},
                                                            {"type": "DiceLoss", "loss_weight": 3.0}]
    record = next(r for r in json_log(tmp_path / "work") if r["mode"] == "train")
    assert record["loss"] == pytest.approx(record["decode.loss_ce"] + record["decode.loss_dice"], rel=1e-6)


def test_resume_from_continues_a_run_exactly(tmp_path, fresh_accelerate, capsys):
    cfg = short_config(checkpoint_config={"interval": 2})
    cfg["data"]["val"] = None
    assert train(tmp_path, cfg, name="whole") == 0
    assert train(tmp_path, cfg, "--resume-from", str(tmp_path / "whole" / "iter_2"), name="resumed") == 0
    assert "continuing at iteration 3" in capsys.readouterr().out
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = {r["iter"]: r["loss"] for r in json_log(tmp_path / "whole") if r["mode"] == "train"}
    resumed = [r for r in json_log(tmp_path / "resumed") if r["mode"] == "train"]
    assert [r["iter"] for r in resumed] == [3, 4] and all(r["loss"] == losses[r["iter"]] for r in resumed)


def test_load_from_takes_weights_only(tmp_path, fresh_accelerate):
    cfg = short_config()
    cfg["data"]["val"] = None
    assert train(tmp_path, cfg, name="first") == 0
    frozen = short_config(optimizer={"type": "AdamW", "lr": 0.0, "weight_decay": 0.01})
    frozen["data"]["val"] = None
    frozen["model"]["norm_eval"] = True  # BatchNorm statistics stay as loaded too
    assert train(tmp_path, frozen, "--load-from", str(tmp_path / "first" / "final"), name="second") == 0
    a, b = final_weights(tmp_path / "first"), final_weights(tmp_path / "second")
    assert all(torch.equal(a[k], b[k]) for k in a)  # lr 0: the loaded weights, unchanged
    info = json.loads((tmp_path / "second" / "run_info.json").read_text())
    assert info["iterations"] == 4  # a new run from iteration 0, not a continuation


def test_no_validate_means_no_evaluation(tmp_path, fresh_accelerate):
    cfg = short_config(evaluation={"interval": 2})
    assert train(tmp_path, cfg, "--no-validate") == 0
    work = tmp_path / "work"
    assert not (work / "eval_results.json").exists()
    assert all(r["mode"] == "train" for r in json_log(work))
    assert yaml.safe_load((work / "config.yaml").read_text())["evaluation"] is None
    assert (work / "final" / "model.safetensors").is_file()


def test_evaluation_null_in_the_config_means_no_evaluation(tmp_path, fresh_accelerate):
    """``evaluation: null`` in the YAML: no evaluation at all, not even at the end (data.val is set)."""
    cfg = short_config(evaluation=None)
    assert cfg["data"]["val"] is not None
    assert train(tmp_path, cfg) == 0
    work = tmp_path / "work"
    assert not (work / "eval_results.json").exists()
    assert all(r["mode"] == "train" for r in json_log(work))
    assert (work / "final" / "model.safetensors").is_file()


def test_seed_sets_the_seed(tmp_path, fresh_accelerate):
    cfg = short_config()
    cfg["runner"]["max_iters"] = 2
    cfg["data"]["val"] = None
    for name, flags in (("s3a", ["--seed", "3"]), ("s3b", ["--seed", "3"]), ("s0", [])):
        assert train(tmp_path, cfg, *flags, name=name) == 0
    a, b, c = (final_weights(tmp_path / n) for n in ("s3a", "s3b", "s0"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert yaml.safe_load((tmp_path / "s3a" / "config.yaml").read_text())["seed"] == 3


BAD_LOSSES = textwrap.dedent("""
    import torch
    from seg_accel.registry import LOSSES


    @LOSSES.register()
    class NoIgnore(torch.nn.Module):
        loss_name = "loss_x"

        def forward(self, logits, labels):
            return torch.nn.functional.cross_entropy(logits, labels)


    @LOSSES.register()
    class OneArgument(torch.nn.Module):
        loss_name = "loss_x"

        def forward(self, logits):
            return logits.mean()


    @LOSSES.register()
    class NotAScalar(torch.nn.Module):
        loss_name = "loss_x"

        def forward(self, logits, labels, ignore_index=255):
            return logits.mean(1)


    @LOSSES.register()
    class Unnamed(torch.nn.Module):
        def forward(self, logits, labels, ignore_index=255):
            return logits.mean()


    @LOSSES.register()
    class NoPixelWeight(torch.nn.Module):
        loss_name = "loss_x"

        def forward(self, logits, labels, ignore_index=255):
            return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index)
""")


@pytest.mark.parametrize(("loss", "sampler", "words"), [
    ("NoIgnore", None, "does not take ignore_index"),
    ("OneArgument", None, "must take the logits and the labels"),
    ("NotAScalar", None, "returned Tensor(2, 8, 8); a loss returns a scalar tensor"),
    ("Unnamed", None, "has no loss_name"),
    ("NoPixelWeight", {"type": "OHEMPixelSampler", "thresh": 0.7}, "does not take pixel_weight_nhw"),
])
def test_a_loss_that_does_not_fit_the_interface_is_a_config_error(tmp_path, monkeypatch, capsys, loss, sampler,
                                                                  words):
    (tmp_path / "bad_losses.py").write_text(BAD_LOSSES)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(custom_imports={"imports": ["bad_losses"]})
    cfg["model"]["decode_head"] = {"loss_decode": [{"type": "CrossEntropyLoss"}, {"type": loss}], "sampler": sampler}
    assert main(["train", str(write_yaml(tmp_path / "exp.yaml", cfg))]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert ": model.decode_head.loss_decode.1" in err and words in err, err
    assert not (tmp_path / "work_dirs").exists()  # nothing started


def test_the_readme_loss_example_trains(tmp_path, monkeypatch, fresh_accelerate):
    """The loss of docs/components.md (no pixel_weight_nhw) trains; the old engine passed it one."""
    (tmp_path / "my_losses.py").write_text(textwrap.dedent("""
        import torch
        from seg_accel.registry import LOSSES


        @LOSSES.register()
        class ScaledCEForTest(torch.nn.Module):
            def __init__(self, scale: float = 1.0, loss_name: str = "loss_scaled"):
                super().__init__()
                self.scale, self.loss_name = scale, loss_name

            def forward(self, logits, labels, ignore_index=255):
                return self.scale * torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index)
    """))
    monkeypatch.chdir(tmp_path)
    cfg = short_config(custom_imports={"imports": ["my_losses"]})
    cfg["model"]["decode_head"] = {"loss_decode": {"type": "ScaledCEForTest", "scale": 2.0}}
    cfg["data"]["val"] = None
    assert train(tmp_path, cfg) == 0
    records = [r for r in json_log(tmp_path / "work") if r["mode"] == "train"]
    assert len(records) == 4 and all(r["loss"] == r["decode.loss_scaled"] > 0 for r in records)


def test_the_thread_budget(monkeypatch):
    """2 processes on 2 cores: 1 torch thread each; the user's OMP_NUM_THREADS (marked by the
    launcher) and torch_threads win; workers count toward the oversubscription warning."""
    import os

    from seg_accel import threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    for name in ("OMP_NUM_THREADS", threads.USER_THREADS, threads.BUDGETED, "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert threads.decide(None, 0).threads == 2  # one process: every core
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    two = threads.decide(None, 0)
    assert (two.threads, two.processes, two.cores, two.oversubscribed) == (1, 2, 2, False)
    assert "2 process(es) x 1 torch thread(s) (2 core(s) / 2 process(es))" in two.describe()
    assert threads.decide(None, 2).oversubscribed  # 2 x (1 + 2 workers) = 6 threads on 2 cores
    monkeypatch.setenv(threads.USER_THREADS, "3")
    assert threads.decide(None, 0).threads == 3 and threads.decide(None, 0).oversubscribed
    assert threads.decide(1, 0).threads == 1  # torch_threads in the config comes first
    # what `seg-accel train --num-processes 2` hands its processes
    monkeypatch.delenv(threads.USER_THREADS)
    assert threads.launcher_environment(2) == {"OMP_NUM_THREADS": "1", threads.BUDGETED: "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.launcher_environment(2) == {threads.USER_THREADS: "2"}  # the user's value is kept


def test_dataloader_workers_run_one_thread(tmp_path):
    from seg_accel.data import build_train_loader

    class ThreadProbe(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, key):
            return {"pixel_values": torch.zeros(3, 2, 2) + torch.get_num_threads(),
                    "labels": torch.zeros(2, 2, dtype=torch.long), "index": key[0] if isinstance(key, tuple) else key}

    torch.set_num_threads(2)
    loader = build_train_loader(ThreadProbe(), 2, 1, 0, 1, 0)
    batch = next(iter(loader))
    assert batch["pixel_values"].flatten().unique().tolist() == [1.0]  # in the worker: 1 thread


def test_channels_last_and_compile_train(tmp_path, fresh_accelerate):
    """`channels_last: true` keeps the 4-D weights channels-last and gives the losses of the default
    layout (to float rounding); `compile` (the eager backend here, for speed) compiles the training
    forward, and the export and checkpoints carry the plain parameter names."""
    from accelerate.utils import is_compiled_module

    from seg_accel.models import load_weights

    losses = {}
    for name, keys in (("plain", {}), ("channels_last", {"channels_last": True}),
                       ("compiled", {"compile": {"backend": "eager"}, "checkpoint_config": {"interval": 2}})):
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        cfg = short_config(**keys)
        cfg["runner"]["max_iters"] = 2
        cfg["data"]["val"] = None
        trainer, _ = make_trainer(tmp_path / name, cfg)
        trainer.train()
        losses[name] = [r["loss"] for r in json_log(tmp_path / name / "work") if r["mode"] == "train"]
        model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        if name == "channels_last":
            convs = [p for p in model.parameters() if p.ndim == 4 and p.shape[-1] > 1]
            assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        if name == "compiled":
            assert is_compiled_module(trainer.model)
            exported = final_weights(tmp_path / name / "work")
            assert not any("_orig_mod" in k for k in exported)
            load_weights(model, tmp_path / name / "work" / "iter_2", strict=True)  # plain names in checkpoints
    assert losses["channels_last"] == pytest.approx(losses["plain"], rel=1e-4)
    assert losses["compiled"] == pytest.approx(losses["plain"], rel=1e-4)


def test_evaluation_batches_images_of_one_size():
    from seg_accel.data.loader import SizeGroupedBatches

    class Sizes:
        sizes = [(100, 100)] * 5 + [(200, 100)] * 3 + [None] + [(100, 100)] * 2

        def image_size(self, index):
            return self.sizes[index]

    batches = list(SizeGroupedBatches(Sizes(), list(range(11)), pixels=30_000, most=16))
    assert batches == [[0, 1, 2], [3, 4], [5], [6], [7], [8], [9, 10]]  # 3 of 100x100 fit 30,000 pixels
    assert list(SizeGroupedBatches(Sizes(), list(range(5)), pixels=10**9, most=4)) == [[0, 1, 2, 3], [4]]
