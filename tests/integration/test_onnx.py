"""ONNX export with parity: the demo-style SegFormer through the command (dynamic shapes), and
one model of each family the exporter supports (transformers SegFormer, UperNet-ConvNeXt, DPT,
BEiT; a registered plain module)."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_script, tiny_config, write_yaml
from tests.unit.test_models import ARCHITECTURES

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'seg-accel[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install 'seg-accel[onnx]')")

CLASSES = ["background", "a", "b"]

ONNX_NET = textwrap.dedent('''
    from torch import nn

    from seg_accel.registry import MODELS


    @MODELS.register()
    class OnnxNet(nn.Module):
        def __init__(self, num_classes: int, width: int = 8):
            super().__init__()
            self.num_classes = num_classes
            self.body = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, num_classes, 1))

        def forward(self, pixel_values):
            return self.body(pixel_values)
''')


def export_folder(tmp_path, model_section, size=None):
    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from seg_accel.models import build_model
    from seg_accel.models.builder import export_model
    from seg_accel.models.processor import build_image_processor

    torch.manual_seed(0)
    model = build_model(parse_section(model_section, ModelConfig, "model"), CLASSES)
    cfg = tiny_config()
    if size is not None:  # a fixed-size test pipeline: the processor (and the ONNX input) has that size
        cfg["data"]["val"]["pipeline"] = [{"type": "Resize", "scale": [size[1], size[0]], "keep_ratio": False},
                                          *cfg["data"]["val"]["pipeline"]]
    from seg_accel.config import load_config
    from seg_accel.validate import validate_train_config

    data = validate_train_config(load_config(str(write_yaml(tmp_path / "c.yaml", cfg)))).data
    export_model(model, tmp_path / "export", CLASSES, build_image_processor(data))
    return tmp_path / "export"


@pytest.mark.slow  # ten exports (~80 s): CI runs it in its slow step
@pytest.mark.parametrize("family", ["segformer", "upernet_convnext", "dpt", "beit", "module", "smp.Unet",
                                    "smp.DeepLabV3Plus", "smp.FPN", "mmseg.PSPNet", "mmseg.UNet"])
def test_each_family_exports_with_parity(tmp_path, family, monkeypatch):
    from seg_accel.inference.onnx_export import export_with_parity

    if family == "module":
        (tmp_path / "onnx_models.py").write_text(ONNX_NET)
        monkeypatch.syspath_prepend(str(tmp_path))
        import onnx_models  # noqa: F401  (registers OnnxNet)

        section, size = {"type": "OnnxNet", "width": 8}, (48, 64)
    elif family.startswith("smp."):  # 48 x 80: not multiples of 32, the input is padded inside the graph
        from tests.unit.test_smp import smp_model

        section, size = smp_model(family[4:]), (48, 80)
    elif family.startswith("mmseg."):  # MMSegmentation's networks; the UNet at 40 x 56, padded inside the graph
        from tests.integration.test_mmseg_e2e import PSPNET
        from tests.unit.test_mmseg import UNET_TINY

        section, size = (PSPNET, (64, 64)) if family == "mmseg.PSPNet" else (UNET_TINY, (40, 56))
        section = json.loads(json.dumps(section))  # a copy
    else:
        section = ARCHITECTURES[family]
        size = (32, 32) if family in ("dpt", "beit") else (64, 64)  # the ViTs: their config's image size
    folder = export_folder(tmp_path, section, size)
    report = export_with_parity(str(folder), tmp_path / "model.onnx")
    assert report.images == 4 and report.agreement >= 0.999, report.line()
    assert report.max_abs_diff < 1e-3
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == CLASSES


@pytest.mark.slow  # CI runs it in its slow step (keeps the README test command under 10 min)
def test_export_onnx_command_dynamic_shapes(tmp_path):
    folder = export_folder(tmp_path, ARCHITECTURES["segformer"])
    out = tmp_path / "demo.onnx"
    proc = run_script(["-m", "seg_accel", "export-onnx", str(folder), "--out", str(out), "--size", "64", "64",
                       "--dynamic"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "argmax agreement 100.0000% of pixels" in text and "max |logit difference|" in text
    assert "dynamic batch/height/width" in text
    import onnxruntime as ort

    from seg_accel.models import load_model

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 96, 160)
    got = session.run(None, {"pixel_values": x.numpy()})[0]
    with torch.no_grad():
        reference = load_model(folder).eval()(pixel_values=x).logits.numpy()
    assert got.shape == reference.shape == (3, 3, 24, 40)
    assert np.abs(got - reference).max() < 1e-3
    # errors: one line each
    bad = run_script(["-m", "seg_accel", "export-onnx", str(tmp_path / "nothing"), "--out", str(out)], cwd=REPO)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "nothing" in bad.stderr


def test_an_export_embeds_its_weights_leaves_nothing_unused_and_takes_the_data_size(tmp_path):
    """Issue 23, finding 8: export-onnx left an unused .onnx.data beside an .onnx that embeds the
    weights, and defaulted to 512x512 instead of the data's size."""
    import onnx
    from PIL import Image

    from seg_accel.inference.onnx_export import export_with_parity

    folder = export_folder(tmp_path, ARCHITECTURES["segformer"])  # no resize in its processor
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(tmp_path / "check.png")
    out = tmp_path / "onnx" / "model.onnx"
    out.parent.mkdir()
    (out.parent / "model.onnx.data").write_bytes(b"an earlier export's weights")
    export_with_parity(str(folder), out, check=[str(tmp_path / "check.png")], exporter="torchscript")
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no .data, no temporary file
    proto = onnx.load(str(out))
    assert {p.key: p.value for p in proto.metadata_props}["input"] == "pixel_values (N, 3, H, W), H x W = (48, 64)"
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 48, 64]


def test_a_graph_that_fails_its_parity_check_is_not_written_at_out(tmp_path, monkeypatch):
    from seg_accel.errors import TrainingError
    from seg_accel.inference import onnx_export

    folder = export_folder(tmp_path, ARCHITECTURES["segformer"], size=(32, 32))
    out = tmp_path / "model.onnx"
    out.write_bytes(b"a graph that passed earlier")
    monkeypatch.setattr(onnx_export, "MIN_AGREEMENT", 1.01)  # no graph can pass
    with pytest.raises(TrainingError, match=f"nothing was written to {out}"):
        onnx_export.export_with_parity(str(folder), out, exporter="torchscript")
    assert out.read_bytes() == b"a graph that passed earlier"
    assert (tmp_path / "model.failed.onnx").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
