"""A plain ``nn.Module`` (not transformers) from a user's module, through the model interface:
trained on 2 processes, killed with SIGKILL and resumed bitwise-equal, evaluated with sliding
windows and multi-scale + flip, exported, reloaded with one call, published with a model card."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (
    REPO,
    accelerate_launch,
    json_log,
    run_script,
    tiny_config,
    write_yaml,
)
from tests.integration.test_resume_e2e import KILLER

USER_MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    from seg_accel.registry import MODELS


    @MODELS.register()
    class UserNet(nn.Module):
        """Convolutions at half resolution, a decode head and an auxiliary head (training only)."""

        def __init__(self, num_classes: int, width: int = 8, aux: bool = True):
            super().__init__()
            self.num_classes = num_classes
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
            self.decode_head = nn.Conv2d(width, num_classes, 1)
            self.auxiliary_head = nn.Conv2d(width, num_classes, 1) if aux else None

        def forward(self, pixel_values):
            stem = self.stem(pixel_values)
            logits = self.decode_head(self.body(stem))
            if self.training and self.auxiliary_head is not None:
                return {"logits": logits, "aux_logits": self.auxiliary_head(stem)}
            return logits
''')
REPO_ID = "tester/user-net"


def user_config() -> dict:
    cfg = tiny_config(custom_imports={"imports": ["user_models", "killers"]}, checkpoint_config={"interval": 5},
                      log_config={"interval": 1},
                      push_to_hub={"repo_id": REPO_ID, "strategy": "end", "retries": 2, "retry_wait": 0.1},
                      optimizer={"type": "AdamW", "lr": 0.01, "weight_decay": 0.01,
                                 "paramwise_cfg": {"custom_keys": {"head": {"lr_mult": 2.0}}}})
    cfg["model"] = {"type": "UserNet", "width": 8, "aux": True,
                    "decode_head": {"loss_decode": {"type": "CrossEntropyLoss"},
                                    "sampler": {"type": "OHEMPixelSampler", "thresh": 0.9, "min_kept": 100}},
                    "auxiliary_head": {"loss_decode": {"type": "CrossEntropyLoss", "loss_weight": 0.4}},
                    "test_cfg": {"mode": "slide", "crop_size": [24, 24], "stride": [16, 16]}}
    cfg["runner"]["max_iters"] = 12
    return cfg


def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.slow  # CI runs it in its slow step (keeps the README test command under 10 min)
@pytest.mark.multiprocess
def test_a_registered_plain_module_trains_resumes_evaluates_exports_and_publishes(tmp_path, hub_server, monkeypatch):
    from huggingface_hub import ModelCard

    import seg_accel
    from seg_accel.runtime.checkpoints import latest_checkpoint
    from seg_accel.models import build_model

    (tmp_path / "user_models.py").write_text(USER_MODELS)
    (tmp_path / "killers.py").write_text(KILLER)
    train = str(REPO / "scripts/train.py")
    cfg = user_config()
    path_a = write_yaml(tmp_path / "a.yaml", cfg)
    run_a = accelerate_launch([train, str(path_a), "--work-dir", str(tmp_path / "A")], cwd=tmp_path,
                              HF_HUB_OFFLINE="0")
    assert run_a.returncode == 0, run_a.stdout[-3000:] + run_a.stderr[-3000:]
    assert "2 process(es)" in run_a.stdout and "model UserNet" in run_a.stdout
    assert "custom_keys['head']" in run_a.stdout  # paramwise_cfg matched the module's parameter names

    # killed after its iteration-5 checkpoint, resumed: bitwise the uninterrupted run
    cfg_b = {**cfg, "custom_hooks": [{"type": "KillAfterCheckpoint", "at": 5, "priority": 55}]}
    cfg_b.pop("push_to_hub")
    path_b = write_yaml(tmp_path / "b.yaml", cfg_b)
    killed = accelerate_launch([train, str(path_b), "--work-dir", str(tmp_path / "B")], cwd=tmp_path)
    assert killed.returncode != 0 and latest_checkpoint(tmp_path / "B").name == "iter_5"
    resumed = accelerate_launch([train, str(path_b), "--work-dir", str(tmp_path / "B"), "--cfg-options",
                                 "custom_hooks=[]", "auto_resume=true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    weights_a = load_file(str(tmp_path / "A" / "final" / "model.safetensors"))
    weights_b = load_file(str(tmp_path / "B" / "final" / "model.safetensors"))
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    logged_a = {r["iter"]: r for r in json_log(tmp_path / "A") if r["mode"] == "train"}
    logged_b = {r["iter"]: r for r in json_log_all(tmp_path / "B") if r["mode"] == "train"}
    for i in range(6, 13):
        for key in ("loss", "decode.loss_ce", "aux.loss_ce", "decode.ohem_kept"):
            assert logged_b[i][key] == logged_a[i][key], (i, key)

    # the export: one documented call, identical logits to the trained weights (once the module that
    # registers the class is imported: an export names a class, never code to run; issue 23)
    monkeypatch.syspath_prepend(str(tmp_path))
    import user_models  # noqa: F401

    model = seg_accel.load_model(tmp_path / "A" / "final")
    assert type(model).__name__ == "UserNet" and model.auxiliary_head is not None
    reference = build_model(seg_accel_model_config(cfg), ["background", "circle", "square", "triangle"])
    reference.load_state_dict(weights_a)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits_of(model, x), logits_of(reference, x))
    export_config = json.loads((tmp_path / "A" / "final" / "config.json").read_text())
    assert export_config["seg_accel_model"]["options"] == {"width": 8, "aux": True}
    assert export_config["id2label"] == {"0": "background", "1": "circle", "2": "square", "3": "triangle"}

    # evaluated with sliding windows, and with multi-scale + flip on top: the work dir's export
    for extra, name in (([], "slide"), (["--aug-test"], "aug")):
        out = tmp_path / f"{name}.json"
        proc = run_script(["-m", "seg_accel", "evaluate", str(tmp_path / "A"), "--out", str(out), *extra],
                          cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(out.read_text())
        assert results["test_cfg"]["mode"] == "slide" and results["checkpoint"].endswith("final")
        assert (results["test_cfg"]["flip"] is True) == (name == "aug")
        assert results["metrics"]["mIoU"] == pytest.approx(expected_miou(model, cfg, name == "aug"), abs=1e-9)

    # published at the end of run A: the card says how to load it, and the repo loads
    files = hub_server.files(REPO_ID)
    assert {"model.safetensors", "config.json", "README.md", "training_config.yaml"} <= set(files)
    card = ModelCard.load(REPO_ID)
    assert "seg_accel.load_model" in card.text and "UserNet" in card.text
    assert "mean_iou" in {result.metric_type for result in card.data.eval_results or []}
    pulled = seg_accel.load_model(REPO_ID)
    assert torch.equal(logits_of(pulled, x), logits_of(reference, x))


def json_log_all(work_dir) -> list[dict]:
    """Every JSON log of a work dir (a resumed run writes a second one)."""
    records = []
    for path in sorted(work_dir.glob("*.log.json")):
        records += [json.loads(line) for line in path.read_text().splitlines()]
    return records


def seg_accel_model_config(cfg: dict):
    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section

    return parse_section(cfg["model"], ModelConfig, "model")


def expected_miou(model: torch.nn.Module, cfg: dict, aug: bool) -> float:
    """The val set's mIoU with the same test settings, computed here on one process."""
    import dataclasses

    from seg_accel.data import build_dataset
    from seg_accel.inference.inferencer import DEFAULT_AUG_RATIOS, Inferencer
    from seg_accel.metrics import confusion_matrix, metrics_from_confusion

    test_cfg = seg_accel_model_config(cfg).test_cfg
    if aug:
        test_cfg = dataclasses.replace(test_cfg, img_ratios=list(DEFAULT_AUG_RATIOS), flip=True)
    inferencer = Inferencer(test_cfg)
    dataset = build_dataset(cfg["data"]["val"], "data.val")
    dataset.test_mode = True
    cm = torch.zeros(4, 4, dtype=torch.long)
    for i in range(len(dataset)):
        sample = dataset[i]
        labels = sample["labels"][None]
        scores = inferencer.scores(model.eval(), sample["pixel_values"][None], labels.shape[-2:])
        cm += confusion_matrix(inferencer.predict(scores), labels, 4, 255)
    return metrics_from_confusion(cm, ["mIoU"])["mIoU"]
