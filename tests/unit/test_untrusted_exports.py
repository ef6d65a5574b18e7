"""An export is data (issue 23, finding 1): a module export's config.json names a class and
options, and loading it must never import or call what a crafted file names unless the user
opts in (``trust_remote_code``). Each crafted export writes a marker file if its payload runs;
it is loaded through ``seg_accel.load_model``, ``seg-accel predict``, ``seg-accel evaluate``,
``seg-accel export-onnx`` and a Hub repo id."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import script_env, tiny_config, write_yaml

CLASSES = ["background", "circle", "square", "triangle"]

USER_NET = textwrap.dedent("""
    import torch
    from torch import nn

    from seg_accel.registry import MODELS


    @MODELS.register()
    class UserNet(nn.Module):
        def __init__(self, num_classes: int, width: int = 4):
            super().__init__()
            self.num_classes = num_classes
            self.body = nn.Conv2d(3, width, 3, stride=2, padding=1)
            self.head = nn.Conv2d(width, num_classes, 1)

        def forward(self, pixel_values):
            return self.head(torch.relu(self.body(pixel_values)))
""")

HUBCONF = textwrap.dedent("""
    from pathlib import Path

    Path({marker!r}).write_text("hubconf ran")


    def payload(**kwargs):
        import torch
        return torch.nn.Conv2d(3, 4, 1)
""")

BESIDE = textwrap.dedent("""
    from pathlib import Path

    import torch

    Path({marker!r}).write_text("the module beside the export ran")


    class EvilNet(torch.nn.Conv2d):
        def __init__(self, num_classes, **kwargs):
            super().__init__(3, num_classes, 1)
""")


def user_export(tmp_path: Path) -> Path:
    """A legitimate module export of UserNet (its module in tmp_path/user, imported here)."""
    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from seg_accel.models import build_model, export_model

    user = tmp_path / "user"
    user.mkdir(exist_ok=True)
    (user / "user_net.py").write_text(USER_NET)
    sys.path.insert(0, str(user))
    from seg_accel.registry import MODELS

    MODELS._entries.pop("UserNet", None)  # another test's UserNet (a module of that name) would clash
    try:
        import user_net  # noqa: F401  (registers UserNet)

        model = build_model(parse_section({"type": "UserNet", "width": 4}, ModelConfig, "model"), CLASSES)
        folder = tmp_path / "export"
        export_model(model, folder, CLASSES)
    finally:
        sys.path.remove(str(user))
        sys.modules.pop("user_net", None)
        from seg_accel.registry import MODELS

        MODELS._entries.pop("UserNet", None)  # as in a fresh process that never imported user_net
    return folder


def crafted(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(export folder, marker file): a module export whose config.json names a payload."""
    folder = user_export(tmp_path)
    marker = tmp_path / f"{kind}.ran"
    config = json.loads((folder / "config.json").read_text())
    if kind == "hubconf":
        evil = tmp_path / "evil_repo"
        evil.mkdir()
        (evil / "hubconf.py").write_text(HUBCONF.format(marker=str(marker)))
        spec = {"import_path": "torch.hub.load", "type": "load",
                "options": {"repo_or_dir": str(evil), "model": "payload", "source": "local", "trust_repo": True}}
    elif kind == "os_system":
        spec = {"import_path": "os.system", "type": "system", "options": {"command": f"touch {marker}"}}
    else:  # a module dropped beside the export, found when the current folder is on the path
        (folder / "evil_net.py").write_text(BESIDE.format(marker=str(marker)))
        spec = {"import_path": "evil_net.EvilNet", "type": "EvilNet", "options": {}}
    config["seg_accel_model"] = spec
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


KINDS = ["hubconf", "os_system", "beside"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_export_never_runs_through_load_model(tmp_path, kind, monkeypatch):
    import seg_accel
    from seg_accel.errors import UntrustedExportError

    folder, marker = crafted(tmp_path, kind)
    monkeypatch.chdir(folder)  # the folder of a dropped module on the path
    monkeypatch.syspath_prepend(str(folder))
    with pytest.raises(UntrustedExportError, match="trust_remote_code=True"):
        seg_accel.load_model(folder)
    assert not marker.exists()
    assert "evil_net" not in sys.modules


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_export_never_runs_through_the_commands(tmp_path, kind, monkeypatch, capsys):
    from seg_accel.cli import evaluate_cli, export_onnx_cli, predict_cli

    folder, marker = crafted(tmp_path, kind)
    image = tmp_path / "image.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    config = write_yaml(tmp_path / "exp.yaml", tiny_config())
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    for command, argv in ((predict_cli, [str(folder), str(image), "--out", str(tmp_path / "out")]),
                          (evaluate_cli, [str(config), str(folder)]),
                          (export_onnx_cli, [str(folder), "--out", str(tmp_path / "model.onnx")])):
        assert command(argv) == 2, command
        err = [line for line in capsys.readouterr().err.splitlines() if line]
        assert len(err) == 1 and err[0].startswith("error: ") and "--trust-remote-code" in err[0], (command, err)
        assert not marker.exists(), command
    assert not (tmp_path / "out").exists() and not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_crafted_export_on_the_hub_never_runs(tmp_path, kind, hub_server, monkeypatch, capsys):
    from huggingface_hub import HfApi

    import seg_accel
    from seg_accel.cli import predict_cli
    from seg_accel.errors import UntrustedExportError

    folder, marker = crafted(tmp_path, kind)
    repo_id = f"tester/crafted-{kind.replace('_', '-')}"
    api = HfApi()
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UntrustedExportError):
        seg_accel.load_model(repo_id)
    image = tmp_path / "image.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    assert predict_cli([repo_id, str(image), "--out", str(tmp_path / "out")]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.slow
def test_a_user_module_export_loads_when_registered_or_trusted_and_only_then(tmp_path):
    folder = user_export(tmp_path)
    image = tmp_path / "image.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    env = script_env(PYTHONPATH=str(tmp_path / "user"))

    def python(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    load = f"import seg_accel; m = seg_accel.load_model({str(folder)!r}{{}}); print(type(m).__name__, m.num_classes)"
    refused = python(load.format(""))
    assert refused.returncode != 0 and "UntrustedExportError" in refused.stderr
    assert "import user_net" in refused.stderr  # what to do: import the module that registers it
    registered = python("import user_net; " + load.format(""))
    trusted = python(load.format(", trust_remote_code=True"))
    assert registered.stdout.split() == trusted.stdout.split() == ["UserNet", "4"], registered.stderr + trusted.stderr
    predicted = subprocess.run([sys.executable, "-m", "seg_accel", "predict", str(folder), str(image), "--out",
                                str(tmp_path / "out"), "--trust-remote-code"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert (tmp_path / "out" / "labels" / "image.png").is_file()


def test_a_registered_name_with_other_options_or_another_class_is_refused(tmp_path):
    import seg_accel
    from seg_accel.errors import UntrustedExportError

    folder = user_export(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    sys.path.insert(0, str(tmp_path / "user"))
    try:
        import user_net  # noqa: F401

        bad_options = {**config, "seg_accel_model": {**config["seg_accel_model"], "options": {"colour": "red"}}}
        (folder / "config.json").write_text(json.dumps(bad_options))
        with pytest.raises(ValueError, match="has no option 'colour'"):
            seg_accel.load_model(folder)
        elsewhere = {**config, "seg_accel_model": {**config["seg_accel_model"], "import_path": "elsewhere.UserNet"}}
        (folder / "config.json").write_text(json.dumps(elsewhere))
        with pytest.raises(UntrustedExportError, match="here 'UserNet' is user_net.UserNet"):
            seg_accel.load_model(folder)
        for count in (0, 10**9, "4", True):
            (folder / "config.json").write_text(json.dumps({**config, "num_classes": count}))
            with pytest.raises(ValueError, match="num_classes must be an integer from 1 to 10000"):
                seg_accel.load_model(folder)
    finally:
        sys.path.remove(str(tmp_path / "user"))
        sys.modules.pop("user_net", None)
        from seg_accel.registry import MODELS

        MODELS._entries.pop("UserNet", None)


def test_an_image_processor_that_would_size_huge_images_is_refused(tmp_path, capsys):
    """Issue 23, finding 4: a downloaded preprocessor_config.json with size 40000x40000 made
    predict allocate 19 GB; its sizes are bounded and the export refused in one line."""
    import tracemalloc

    from seg_accel.cli import predict_cli
    from tests.unit.test_evaluate import save_tiny_model

    save_tiny_model(tmp_path / "export")
    (tmp_path / "export" / "preprocessor_config.json").write_text(json.dumps(
        {"do_resize": True, "size": {"height": 40000, "width": 40000}, "do_normalize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SegformerImageProcessor"}))
    image = tmp_path / "image.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
    tracemalloc.start()
    code = predict_cli([str(tmp_path / "export"), str(image), "--out", str(tmp_path / "out")])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(err) == 1 and "size 40000x40000 is outside 1..8192 pixels a side" in err[0], err
    assert peak < 200 * 2**20, peak


def crafted_weights(folder: Path, kind: str) -> None:
    """Replace the export's model.safetensors with a damaged or crafted one."""
    import struct

    import torch
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    data = file.read_bytes()
    header_size = struct.unpack("<Q", data[:8])[0]
    if kind == "huge header":
        file.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    elif kind == "invalid JSON":
        file.write_bytes(data[:8] + b"{" * header_size + data[8 + header_size:])
    elif kind == "truncated":
        file.write_bytes(data[: 8 + header_size + 10])
    else:
        state = load_file(str(file))
        name = next(iter(state))
        if kind == "wrong shape":
            state[name] = torch.zeros(1, 2, 3)
        elif kind == "NaN weights":
            state = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v for k, v in state.items()}
        elif kind == "int64 weights":
            state[name] = state[name].to(torch.int64)
        save_file(state, str(file))


WEIGHT_FAULTS = ["huge header", "invalid JSON", "truncated", "wrong shape", "NaN weights", "int64 weights"]


@pytest.mark.parametrize("kind", WEIGHT_FAULTS)
def test_damaged_or_crafted_weights_are_one_line(tmp_path, kind, capsys):
    """Issue 23, finding 7: crafted or truncated safetensors gave tracebacks; NaN weights predicted
    without a word; int64-stored float weights were cast silently."""
    from seg_accel.cli import predict_cli

    folder = user_export(tmp_path)
    sys.path.insert(0, str(tmp_path / "user"))
    try:
        import user_net  # noqa: F401  (registered: the export itself is loadable)

        crafted_weights(folder, kind)
        image = tmp_path / "image.png"
        Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(image)
        assert predict_cli([str(folder), str(image), "--out", str(tmp_path / "out")]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error", "Traceback"))]
        assert len(err) == 1 and err[0].startswith("error: SOURCE: cannot load the model: "), (kind, err)
        words = {"NaN weights": "are not finite", "int64 weights": "is stored as I64 but the model's is float32",
                 "wrong shape": "does not fit the UserNet"}.get(kind, "not readable safetensors")
        assert words in err[0], (kind, err)
        assert not (tmp_path / "out" / "labels").exists()
    finally:
        sys.path.remove(str(tmp_path / "user"))
        sys.modules.pop("user_net", None)
        from seg_accel.registry import MODELS

        MODELS._entries.pop("UserNet", None)
