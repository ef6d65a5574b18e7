"""Hub publishing (push_to_hub, scripts/push_to_hub.py, model cards) and Hub datasets, against the
local Hub server of tests/hub_server.py (the real huggingface_hub, transformers and datasets clients)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, accelerate_launch, run_script, tiny_config, write_yaml
from tests.hub_server import HF_TEST_TOKEN
from tests.unit.test_hub import REPO_ID, push_config


def safetensors_tensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def export_weights(model_file: bytes, config_dir: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """The model state dict of a pushed ``model.safetensors`` (transformers may store some weights
    under their legacy names; loading maps them back)."""
    import shutil

    from transformers import AutoModelForSemanticSegmentation

    scratch.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_dir / "config.json", scratch / "config.json")
    (scratch / "model.safetensors").write_bytes(model_file)
    return AutoModelForSemanticSegmentation.from_pretrained(scratch).state_dict()


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------- export, card, token
def train_with_push(tmp_path: Path, cfg: dict, **env: str):
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = run_script([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "work")],
                      cwd=tmp_path, HF_HUB_OFFLINE="0", **env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow  # about 50 s: trains and pushes several checkpoints; CI's slow step runs it
def test_training_pushes_every_checkpoint_and_the_repo_model_predicts_as_the_local_export(tmp_path, hub_server):
    from PIL import Image
    from transformers import AutoModelForSemanticSegmentation, pipeline

    proc = train_with_push(tmp_path, push_config("checkpoint"))
    work = tmp_path / "work"
    assert ("POST", "/api/repos/create") in hub_server.requests_log
    history = hub_server.commit_history(REPO_ID)
    titles = [title for title, _ in history]
    assert titles == ["seg-accel: checkpoint iter_2", "seg-accel: checkpoint iter_4", "seg-accel: checkpoint iter_6",
                      "seg-accel: final model (iteration 6)"], titles
    # the first commit uploads the whole export; each checkpoint's commit holds its weights
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "training_config.yaml",
            "run_info.json"} <= set(history[0][1])
    assert "eval_results.json" not in history[0][1] and "model-index" not in history[0][1]["README.md"].decode()
    for (title, files), name in zip(history, ["iter_2", "iter_4", "iter_6"]):
        pushed = export_weights(files["model.safetensors"], work / "final", tmp_path / "scratch" / name)
        assert same_weights(pushed, safetensors_tensors((work / name / "model.safetensors").read_bytes())), name
        assert json.loads(files["run_info.json"])["iterations"] == int(name[5:])
    assert json.loads(history[1][1]["eval_results.json"])["iter"] == 4  # evaluated at 4, pushed with iter_4
    assert json.loads(history[-1][1]["eval_results.json"])["iter"] == 6  # the final evaluation
    assert sorted(p for p in hub_server.files(REPO_ID) if p.startswith("logs/")) == \
        sorted(f"logs/{p.name}" for p in work.glob("*.log.json"))
    assert "hub: 4 push(es) to tester/tiny-segformer done" in proc.stdout

    # the repo's model is the local export: same weights, same logits, same pipeline masks
    remote = AutoModelForSemanticSegmentation.from_pretrained(REPO_ID).eval()
    local = AutoModelForSemanticSegmentation.from_pretrained(work / "final").eval()
    assert remote.config.id2label == {0: "background", 1: "circle", 2: "square", 3: "triangle"}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(remote(pixel_values=x).logits, local(pixel_values=x).logits)
    from seg_accel.data.synthetic import SyntheticShapes

    image = Image.fromarray(SyntheticShapes(num_samples=1, img_size=[32, 32], seed=5).read(0)[0])
    remote_masks = pipeline("image-segmentation", model=REPO_ID)(image)
    local_masks = pipeline("image-segmentation", model=str(work / "final"))(image)
    assert [m["label"] for m in remote_masks] == [m["label"] for m in local_masks] and remote_masks
    assert all(np.array_equal(np.array(a["mask"]), np.array(b["mask"])) for a, b in zip(remote_masks, local_masks))


def test_pushed_model_card_holds_the_final_metrics(tmp_path, hub_server):
    from huggingface_hub import ModelCard

    train_with_push(tmp_path, push_config("end"))
    final = json.loads((tmp_path / "work" / "eval_results.json").read_text())
    assert final["iter"] == 6
    card = ModelCard.load(REPO_ID)
    metrics = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert metrics == {k: round(v, 4) for k, v in final["metrics"].items()}
    assert card.data.model_name == "tiny-segformer" and card.data.library_name == "transformers"
    iou = final["per_class"]["IoU"]
    for name in ("background", "circle", "square", "triangle"):  # the per-class table, measured values
        assert f"| {name} | {iou[name]:.2f} |" in card.text, name
    assert "## How to use" in card.text and f'pipeline("image-segmentation", model="{REPO_ID}")' in card.text
    recipe = card.text.split("## Training", 1)[1]
    for row in ("| optimizer | AdamW(", "| learning-rate schedule |", "| losses (decode_head) |",
                "| training length | 6 iterations", "| batch | 2 per process x 1 process(es)", "| hardware | 1 x CPU"):
        assert row in recipe, (row, recipe)
    assert [title for title, _ in hub_server.commit_history(REPO_ID)] == ["seg-accel: final model (iteration 6)"]


def test_best_strategy_pushes_each_new_best(tmp_path, hub_server):
    cfg = push_config("best", commit_message="{name} at iteration {iter}")
    cfg["evaluation"]["interval"] = 2
    train_with_push(tmp_path, cfg)
    work = tmp_path / "work"
    best = [p.name for p in work.glob("best_mIoU_iter_*")]
    assert len(best) == 1
    titles = [title for title, _ in hub_server.commit_history(REPO_ID)]
    assert titles[-1] == "final at iteration 6" and f"{best[0]} at iteration {best[0].rsplit('_', 1)[1]}" in titles
    pushed = safetensors_tensors(hub_server.files(REPO_ID)["model.safetensors"])
    exported = safetensors_tensors((work / best[0] / "pretrained" / "model.safetensors").read_bytes())
    assert all(torch.equal(pushed[k], exported[k]) for k in pushed)  # the repo ends with the best model


def test_server_stopped_mid_training_costs_nothing(tmp_path, hub_server, fresh_accelerate, capsys):
    """The server goes away after the first push: training finishes, every checkpoint is on disk,
    the failed pushes are named in warnings; the finished run is pushed later with the script."""
    from seg_accel.engine.hooks import Hook
    from seg_accel.hub.hook import PushToHubHook
    from tests.conftest import make_trainer

    class StopServer(Hook):
        def after_train_iter(self, runner):
            if runner.iter == 3:
                push = next(h for h in runner.hooks if isinstance(h, PushToHubHook))
                push.pusher.wait()  # iter_2 is on the Hub; then the network goes
                hub_server.stop()

    trainer, _ = make_trainer(tmp_path, push_config("checkpoint", retries=2, retry_wait=0.1))
    trainer.register_hook(StopServer(), 60)
    results = trainer.train()
    out = capsys.readouterr()
    work = tmp_path / "work"
    assert results is not None and (work / "final" / "model.safetensors").is_file()
    assert all((work / f"iter_{i}" / "meta.json").is_file() for i in (2, 4, 6))
    assert "hub: push of iter_4 to tester/tiny-segformer failed (attempt 1 of 2" in out.out
    assert "hub: push of final to tester/tiny-segformer failed after 2 attempt(s)" in out.out
    assert [title for title, _ in hub_server.commit_history(REPO_ID)] == ["seg-accel: checkpoint iter_2"]
    assert not (work / ".hub_staging").exists()

    hub_server.start()  # the network is back: publish the finished run
    proc = run_script([str(REPO / "scripts/push_to_hub.py"), str(work), REPO_ID], cwd=tmp_path, HF_HUB_OFFLINE="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert hub_server.commit_history(REPO_ID)[-1][0] == "seg-accel: final"
    pushed = safetensors_tensors(hub_server.files(REPO_ID)["model.safetensors"])
    assert all(torch.equal(pushed[k], v) for k, v in
               safetensors_tensors((work / "final" / "model.safetensors").read_bytes()).items())


def test_planted_token_is_in_no_written_or_uploaded_file(tmp_path, hub_server, monkeypatch):
    token = "hf_PLANTEDsecretTOKEN0123456789abcdef"
    monkeypatch.setenv("HF_TOKEN", token)
    cfg = push_config("checkpoint")
    cfg["log_config"]["hooks"] = [{"type": "TextLoggerHook"}]
    proc = train_with_push(tmp_path, cfg)
    assert proc.stdout.count("hub: pushed") == 4  # the planted token was used: the pushes went through
    written = all_files(tmp_path / "work")
    uploaded = all_files(hub_server.root)  # repos and LFS objects as the server stored them
    assert len(written) > 20 and len(uploaded) > 10
    for file in written + uploaded:
        assert token.encode() not in file.read_bytes(), file
    assert token not in proc.stdout + proc.stderr
    assert HF_TEST_TOKEN not in proc.stdout + proc.stderr


def test_push_script_checkpoint_without_export(tmp_path, hub_server):
    cfg = push_config("end")
    del cfg["push_to_hub"]
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = run_script([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "work")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_script([str(REPO / "scripts/push_to_hub.py"), str(tmp_path / "work" / "iter_4"), "tester/iter4",
                       "--private"], cwd=tmp_path, HF_HUB_OFFLINE="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "eval_results.json is from iteration 6, the weights from iteration 4" in proc.stdout
    files = hub_server.files("tester/iter4")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "config.json").write_bytes(files["config.json"])
    pushed = export_weights(files["model.safetensors"], scratch, tmp_path / "loaded")
    checkpoint = safetensors_tensors((tmp_path / "work" / "iter_4" / "model.safetensors").read_bytes())
    assert same_weights(pushed, checkpoint)
    assert "model-index" not in files["README.md"].decode()  # not evaluated at iteration 4: no metrics claimed
    assert json.loads(files["preprocessor_config.json"])["image_processor_type"] == "SegformerImageProcessor"

    bad = run_script([str(REPO / "scripts/push_to_hub.py"), str(tmp_path), "tester/x"], cwd=tmp_path)
    assert bad.returncode == 2 and "WORK_DIR_OR_CHECKPOINT" in bad.stderr


# --------------------------------------------------------------------------- datasets from the Hub
def upload_dataset(hub_server, tmp_path: Path, repo_id: str, shards: list[int]) -> None:
    from huggingface_hub import HfApi

    from tests.parquet_data import CLASSES, write_parquet_dataset

    folder = tmp_path / "dataset"
    write_parquet_dataset(folder, shards)
    (folder / "id2label.json").write_text(json.dumps(dict(enumerate(CLASSES))))
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset")
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=folder)


@pytest.mark.multiprocess
def test_dataset_on_the_server_streams_into_two_processes(tmp_path, hub_server):
    from tests.conftest import NORMALIZE

    upload_dataset(hub_server, tmp_path, "tester/shapes", [13, 12, 12])
    cfg = tiny_config(log_config={"interval": 1})
    cfg["runner"]["max_iters"] = 6
    cfg["data"].update(train={"type": "HubDataset", "path": "tester/shapes", "streaming": True,
                              "pipeline": [{"type": "RandomFlip", "prob": 0.5}, NORMALIZE]}, val=None)
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    hub_server.requests_log.clear()
    proc = accelerate_launch([str(REPO / "scripts/train.py"), str(path), "--work-dir", str(tmp_path / "work")],
                             cwd=tmp_path, timeout=300, HF_HUB_OFFLINE="0")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "streaming 3 parquet file(s), 3 shard(s) (row groups), 37 samples, 2 process(es)" in proc.stdout
    assert "Iter [6/6]" in proc.stdout
    fetched = {path for method, path in hub_server.requests_log if "/resolve/" in path and path.endswith(".parquet")}
    assert len(fetched) == 3, fetched  # every shard was read from the server
    assert (tmp_path / "work" / "final" / "model.safetensors").is_file()


def test_missing_hub_dataset_offline_fails_at_once(tmp_path, hub_server):
    """What "at once" means: not one request to the Hub (the server counts them), so no retries."""
    cfg = tiny_config()
    cfg["data"]["train"] = {"type": "HubDataset", "path": "tester/no-such-dataset", "streaming": True}
    path = write_yaml(tmp_path / "exp.yaml", cfg)
    proc = run_script([str(REPO / "scripts/train.py"), str(path)], cwd=tmp_path, HF_HUB_OFFLINE="1")
    assert proc.returncode == 2
    assert hub_server.requests_log == []
    assert "data.train.classes" in proc.stderr and "HF_HUB_OFFLINE is set" in proc.stderr, proc.stderr
