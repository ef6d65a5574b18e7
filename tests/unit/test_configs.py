"""Every file in configs/: training configs load, validate and build their model (the Hub
weights they name are swapped for a random init: the Hub is unreachable here), base files
are used by a config, launch configs are what `accelerate launch` reads, scripts parse."""
from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from seg_accel.config import load_config
from seg_accel.validate import validate_train_config
from seg_accel.models.builder import build_model
from tests.conftest import CAMVID, REPO

CONFIG_DIR = REPO / "configs"
FILES = sorted(p for p in CONFIG_DIR.rglob("*") if p.is_file())
TRAINING = [p for p in FILES if p.suffix == ".yaml" and not {"_base_", "accelerate"} & set(p.parts)]
BASES = [p for p in FILES if "_base_" in p.parts]
LAUNCH = [p for p in FILES if "accelerate" in p.parts and p.suffix == ".yaml"] + [REPO / "accelerate_config.yaml"]
OTHER = [p for p in FILES if p not in TRAINING + BASES + LAUNCH]

# Published parameter counts of the recipes' models (millions, from MMSegmentation's /
# the papers' tables), where our transformers model has the same architecture: a check that
# the recipe builds the model it names.
RECIPE_PARAMS = {
    "upernet_convnext-t_8xb2-amp-160k_ade20k-512x512.yaml": 60,
    "upernet_swin-t_8xb2-160k_ade20k-512x512.yaml": 60,
    # Mask2Former's and MaskFormer's papers: R50 44M, Swin-T 47M; MaskFormer R50 41M
    "mask2former_r50_8xb2-160k_ade20k-512x512.yaml": 44,
    "mask2former_swin-t_8xb2-160k_ade20k-512x512.yaml": 47,
    "mask2former_r50_8xb2-90k_cityscapes-512x1024.yaml": 44,
    "mask2former_swin-t_8xb2-90k_cityscapes-512x1024.yaml": 47,
    "maskformer_r50-d32_8xb2-160k_ade20k-512x512.yaml": 41,
}


# the table of the smp recipes in docs/models.md (parameter counts measured by the test below)
SMP_TABLE = (REPO / "docs" / "models.md").read_text().split("<!-- smp recipes -->", 2)[1]
MASK_TABLE = (REPO / "docs" / "models.md").read_text().split("<!-- mask classification recipes -->", 2)[1]


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in paths]


def base_chain(path: Path) -> list[Path]:
    """The config and every base file it includes, recursively."""
    chain, todo = [], [path.resolve()]
    while todo:
        current = todo.pop()
        chain.append(current)
        bases = (yaml.safe_load(current.read_text()) or {}).get("_base_", [])
        todo += [(current.parent / b).resolve() for b in ([bases] if isinstance(bases, str) else bases)]
    return chain


@pytest.mark.parametrize("path", TRAINING, ids=ids(TRAINING))
def test_training_config_loads_validates_and_builds_its_model(path, monkeypatch):
    if any("data/camvid" in p.read_text() for p in base_chain(path)) and not CAMVID.is_dir():
        pytest.skip(f"needs {CAMVID} (../shared is absent)")
    monkeypatch.chdir(REPO)  # data roots in the examples are relative to the repository root
    raw = load_config(path)
    options = [f"model.{key}=null" for key in ("pretrained", "backbone_pretrained", "encoder_weights")
               if raw.dict["model"].get(key)]
    cfg = validate_train_config(load_config(path, options))
    assert cfg.classes and (cfg.runner.max_iters or cfg.runner.max_epochs)
    model = build_model(cfg.model, cfg.classes)  # full size, random init
    from seg_accel.models import family_of_model, segmentation_logits

    assert family_of_model(model).output_channels(model) == len(cfg.classes)
    if hasattr(model, "config") and hasattr(model.config, "id2label"):  # transformers
        assert model.config.id2label[len(cfg.classes) - 1] == cfg.classes[-1]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if path.name in RECIPE_PARAMS:
        assert abs(params - RECIPE_PARAMS[path.name]) / RECIPE_PARAMS[path.name] < 0.05, params
    for folders, table in ((("smp",), SMP_TABLE), (("mask2former", "maskformer"), MASK_TABLE)):
        if path.parent.name in folders:  # the parameter counts docs/models.md gives, as measured here
            assert f"| `{path.relative_to(REPO)}` |" in table and f"| {params:.2f}M |" in \
                table.split(f"| `{path.relative_to(REPO)}` |", 1)[1].split("\n", 1)[0], (path, params)
    if params < 5:  # the small example models also run a forward pass
        with torch.no_grad():
            logits = segmentation_logits(model.eval(), torch.randn(1, 3, 64, 64))
        assert logits.shape[1] == len(cfg.classes)


def test_recipes_name_their_pretrained_weights_and_dataset():
    recipes = [p for p in TRAINING if p.parent.name in ("segformer", "upernet", "dpt", "beit", "mask2former",
                                                         "maskformer")]
    # SegFormer B0-B5 x ADE20K/Cityscapes, UperNet ConvNeXt + Swin, DPT, BEiT, Mask2Former R50/Swin-T x
    # ADE20K/Cityscapes, MaskFormer R50
    assert len(recipes) == 21
    for path in recipes:
        model = load_config(path).dict["model"]
        assert model.get("pretrained") or model.get("backbone_pretrained"), path
        comments = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
        assert "MMSegmentation reports mIoU" in comments and "Expects:" in comments, path


@pytest.mark.parametrize("path", BASES, ids=ids(BASES))
def test_base_file_loads_and_is_used(path):
    yaml.safe_load(path.read_text())
    users = [p for p in TRAINING if path.resolve() in base_chain(p)[1:]]
    assert users, f"{path} is not the base of any config"


@pytest.mark.parametrize("path", LAUNCH, ids=ids(LAUNCH))
def test_launch_config_is_what_accelerate_reads(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(path))  # refuses unknown keys
    options = {action.dest for action in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config"):
        for key in getattr(config, section) or {}:
            name = key if section == "deepspeed_config" or key.startswith("fsdp_") else f"fsdp_{key}"
            assert name in options, f"{path}: {section}.{key} is not an accelerate launch option"
    if config.num_machines > 1:
        assert config.main_process_ip and config.main_process_port and config.rdzv_backend in ("static", "c10d")
    fields = {f.name for f in dataclasses.fields(ClusterConfig)}
    assert set(yaml.safe_load(path.read_text())) <= fields


@pytest.mark.parametrize("path", OTHER, ids=ids(OTHER))
def test_other_files(path):
    if path.suffix == ".sh":
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
        assert "accelerate launch" in path.read_text()
    elif path.suffix == ".json":
        json.loads(path.read_text())
        assert any(path.name in p.read_text() for p in TRAINING + BASES), f"{path} is used by no config"
    else:
        pytest.fail(f"unexpected file in configs/: {path}")


def test_beit_recipe_keeps_the_checkpoint_tables_and_runs_at_640():
    """The BEiT recipe's relative position tables have the 224 px checkpoint's size (27 x 27 + 3
    rows), so microsoft/beit-base-patch16-224-pt22k-ft22k loads into them; a 640x640 crop runs
    (transformers interpolates the tables to 40 x 40 patches). Shrunk to 4 blocks for speed."""
    path = CONFIG_DIR / "beit/upernet_beit-b16_8xb2-160k_ade20k-640x640.yaml"
    cfg = validate_train_config(load_config(path, ["model.pretrained=null", "model.config.num_hidden_layers=4",
                                                   "model.config.out_indices=[0,1,2,3]",
                                                   "optimizer.paramwise_cfg.num_layers=4"]))
    model = build_model(cfg.model, cfg.classes).eval()
    tables = [v for k, v in model.state_dict().items() if k.endswith("relative_position_bias_table")]
    assert tables and all(t.shape == (27 * 27 + 3, 12) for t in tables)
    with torch.no_grad():
        logits = model(pixel_values=torch.randn(1, 3, 640, 640)).logits
    assert logits.shape == (1, 150, 160, 160)


def test_mmsegmentation_configs_give_the_reported_score_batch_and_their_1x_name():
    """configs/mmseg: MMSegmentation's tutorial configs by their 0.x names (each header gives the
    score MMSegmentation reports and how it was trained) and by their 1.x names."""
    folder = CONFIG_DIR / "mmseg"
    old = sorted(p for p in folder.glob("*.yaml") if "_4xb" not in p.name)
    assert {p.stem for p in old} >= {"pspnet_r50-d8_512x1024_40k_cityscapes", "pspnet_r50-d8_512x1024_80k_cityscapes",
                                      "deeplabv3_r50-d8_512x1024_40k_cityscapes",
                                      "deeplabv3plus_r50-d8_512x1024_40k_cityscapes", "fcn_r50-d8_512x1024_40k_cityscapes",
                                      "upernet_r50_512x1024_40k_cityscapes", "fcn_unet_s5-d16_64x64_40k_drive",
                                      "fcn_unet_s5-d16_128x128_40k_stare", "fcn_unet_s5-d16_128x128_40k_chase_db1",
                                      "fcn_unet_s5-d16_256x256_40k_hrf"}
    for path in old:
        header = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
        assert "MMSegmentation reports" in header and "GPUs x" in header, path
        new = header.split("MMSegmentation 1.x calls it ")[1].split()[0].rstrip(".")
        assert load_config(folder / f"{new}.yaml").dict == load_config(path).dict, new
