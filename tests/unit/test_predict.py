"""seg_accel.Predictor and the predict command's parts: inputs, names, outputs, probabilities, palette."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seg_accel.inference.predict import Predictor, collect_inputs, output_names, pipeline_from_processor
from seg_accel.errors import ConfigError
from seg_accel.metrics.palette import default_palette, overlay_panel, srgb_to_lab
from tests.conftest import NORMALIZE, tiny_config, write_yaml

CLASSES = ["background", "circle", "square", "triangle"]


def write_images(folder: Path, count: int, size=(40, 56), seed=0, suffix=".png") -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:02d}{suffix}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def export(tmp_path):
    """A tiny SegFormer (random init) exported as training would, with its image processor."""
    from seg_accel.config import load_config
    from seg_accel.validate import validate_train_config
    from seg_accel.models import build_model
    from seg_accel.models.builder import export_model
    from seg_accel.models.processor import build_image_processor

    torch.manual_seed(0)
    cfg = validate_train_config(load_config(str(write_yaml(tmp_path / "cfg.yaml", tiny_config()))))
    model = build_model(cfg.model, list(cfg.classes))
    folder = tmp_path / "export"
    export_model(model, folder, list(cfg.classes), build_image_processor(cfg.data))
    return folder, model.eval(), cfg


# ----------------------------------------------------------------------------- inputs and names
def test_inputs_from_files_folders_and_globs_each_once(tmp_path):
    a = write_images(tmp_path / "a", 3)
    b = write_images(tmp_path / "b" / "deep", 2, suffix=".jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    found = collect_inputs([str(tmp_path / "a"), str(a[0]), str(tmp_path / "b" / "**" / "*.jpg")])
    assert found == [*a, *b]  # a[0] given twice, kept once; the text file left out
    with pytest.raises(ConfigError, match=r"INPUTS.*missing.png: no such file"):
        collect_inputs([str(tmp_path / "missing.png")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no image files"):
        collect_inputs([str(tmp_path / "empty")])


def test_output_names_follow_the_sources_and_never_collide(tmp_path):
    paths = [tmp_path / "x" / "a.png", tmp_path / "y" / "a.png", tmp_path / "x" / "b.jpg", tmp_path / "x" / "b.png"]
    assert output_names(paths) == ["x/a", "y/a", "x/b_jpg", "x/b_png"]
    assert output_names([tmp_path / "one.tif"]) == ["one"]


# ----------------------------------------------------------------------------- predictor
def test_the_export_processor_gives_the_config_normalisation(export):
    folder, _, _ = export
    pipeline = pipeline_from_processor(folder)
    assert [step["type"] for step in pipeline] == ["Normalize"]
    np.testing.assert_allclose(pipeline[0]["mean"], NORMALIZE["mean"], rtol=1e-9)
    np.testing.assert_allclose(pipeline[0]["std"], NORMALIZE["std"], rtol=1e-9)


def test_a_prediction_is_the_models_softmax_at_the_image_size(export):
    folder, model, _ = export
    predictor = Predictor.from_export(folder)
    assert predictor.classes == CLASSES
    image = np.random.default_rng(3).integers(0, 256, (37, 45, 3), dtype=np.uint8)
    prediction = predictor(image)
    assert prediction.labels.shape == (37, 45) and prediction.probs.shape == (4, 37, 45)
    np.testing.assert_allclose(prediction.probs.sum(0), 1.0, atol=1e-5)
    assert (prediction.probs.argmax(0) == prediction.labels).all()
    # the reference: normalise by hand, the model, bilinear to the image size, softmax
    mean, std = torch.tensor(NORMALIZE["mean"]).view(3, 1, 1), torch.tensor(NORMALIZE["std"]).view(3, 1, 1)
    x = ((torch.from_numpy(image).permute(2, 0, 1).float() - mean) / std)[None]
    with torch.no_grad():
        logits = torch.nn.functional.interpolate(model(pixel_values=x).logits, size=(37, 45), mode="bilinear",
                                                 align_corners=False)
    np.testing.assert_allclose(prediction.probs, logits.softmax(1)[0].numpy(), atol=1e-5)


def test_from_config_and_load_choose_the_same_model(export, tmp_path):
    folder, _, _ = export
    config = tmp_path / "cfg.yaml"
    image = write_images(tmp_path / "one", 1)[0]
    by_export = Predictor.load(folder)(image)
    by_config = Predictor.load(config, str(folder))(image)
    np.testing.assert_array_equal(by_export.labels, by_config.labels)
    np.testing.assert_allclose(by_export.probs, by_config.probs, atol=1e-6)
    with pytest.raises(ConfigError, match="is a config: give the checkpoint"):
        Predictor.load(config)
    with pytest.raises(ConfigError, match="holds its own weights"):
        Predictor.load(folder, str(folder))


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "png"])
def test_run_writes_labels_overlays_and_probabilities_named_after_the_sources(export, tmp_path, fmt):
    folder, _, _ = export
    images = write_images(tmp_path / "in", 3, size=(24, 30)) + write_images(tmp_path / "in" / "sub", 2, size=(33, 21))
    out = tmp_path / "out"
    written = Predictor.from_export(folder).run([str(tmp_path / "in")], out, probs=fmt, probs_dtype="float32",
                                                progress=False)
    names = ["img_00", "img_01", "img_02", "sub/img_00", "sub/img_01"]
    assert sorted(written) == sorted(out / "labels" / f"{n}.png" for n in names)
    for name, source in zip(names, images):
        label_png = Image.open(out / "labels" / f"{name}.png")
        assert label_png.mode == "P" and label_png.size == Image.open(source).size
        labels = np.asarray(label_png)
        overlay = np.asarray(Image.open(out / "overlays" / f"{name}.png"))
        assert overlay.shape[1] >= 2 * label_png.size[0] and overlay.shape[0] > label_png.size[1]
        if fmt == "npy":
            probs = np.load(out / "probs" / f"{name}.npy")
        elif fmt == "safetensors":
            from safetensors.numpy import load_file

            probs = load_file(str(out / "probs" / f"{name}.safetensors"))["probs"]
        else:
            probs = np.stack([np.asarray(Image.open(out / "probs" / name / f"{c}.png")) for c in CLASSES]) / 255.0
        assert probs.shape == (4, *labels.shape)
        if fmt == "png":  # 8-bit: sums to 1 within the rounding of 4 maps
            assert np.abs(probs.sum(0) - 1).max() <= 4 * 0.5 / 255 + 1e-9
        else:
            assert probs.dtype == np.float32
            np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
            assert (probs.argmax(0) == labels).all()  # the probabilities give the label PNG back


def test_a_sigmoid_head_writes_the_foreground_probability(tmp_path):
    """A 1-channel head: probs (1, H, W) = sigmoid, labels = probs > threshold."""
    model = torch.nn.Conv2d(3, 1, 1)
    predictor = Predictor(model, ["background", "vessel"], threshold=0.3)
    image = np.random.default_rng(1).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    prediction = predictor(image)
    assert prediction.probs.shape == (1, 16, 20)
    with torch.no_grad():
        reference = model(torch.from_numpy(image).permute(2, 0, 1).float()[None]).sigmoid()[0].numpy()
    np.testing.assert_allclose(prediction.probs, reference, atol=1e-6)
    np.testing.assert_array_equal(prediction.labels, (reference[0] > 0.3).astype(np.int64))


def test_bad_probs_format_names_the_option(export, tmp_path):
    folder, _, _ = export
    write_images(tmp_path / "in", 1)
    with pytest.raises(ConfigError, match="--probs"):
        Predictor.from_export(folder).run([str(tmp_path / "in")], tmp_path / "out", probs="tiff")


# ----------------------------------------------------------------------------- palette and overlays
def test_the_default_palette_is_fixed_and_perceptually_spaced():
    palette = default_palette(12)
    assert palette.shape == (12, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(default_palette(40)[:12], palette)  # the first n the same for every n
    lab = srgb_to_lab(palette)
    distances = np.linalg.norm(lab[:, None] - lab[None], axis=-1)[np.triu_indices(12, 1)]
    assert distances.min() > 35  # random colours had pairs under 10 (three near-identical cyans)
    random_lab = srgb_to_lab(np.random.default_rng(42).integers(0, 256, size=(12, 3), dtype=np.uint8))
    assert distances.min() > 2 * np.linalg.norm(random_lab[:, None] - random_lab[None], axis=-1)[
        np.triu_indices(12, 1)].min()


def test_srgb_to_lab_known_values():
    np.testing.assert_allclose(srgb_to_lab(np.array([255, 255, 255])), [100, 0, 0], atol=0.01)
    np.testing.assert_allclose(srgb_to_lab(np.array([255, 0, 0])), [53.24, 80.09, 67.20], atol=0.02)


def test_overlay_panel_has_a_header_and_a_legend_of_the_present_classes():
    rgb = np.full((30, 40, 3), 128, dtype=np.uint8)
    labels = np.zeros((30, 40), dtype=np.int64)
    labels[10:20, 10:20] = 2
    palette = default_palette(4)
    panel = np.asarray(overlay_panel([("prediction", rgb, labels), ("ground truth", rgb, labels)], CLASSES, palette,
                                     opacity=1.0, present=[0, 2]))
    assert panel.shape[1] == max(40 + 4 + 40, 120)  # two panels and a gap; at least 120 wide (the legend)
    assert panel.shape[0] > 16 + 30  # header + image + legend
    body = panel[16:46, :40]
    np.testing.assert_array_equal(body[15, 15], palette[2])  # opacity 1: the class colour itself
    legend = panel[46:]
    colours = {tuple(c) for c in legend.reshape(-1, 3)}
    assert tuple(palette[2]) in colours and tuple(palette[0]) in colours
    assert tuple(palette[1]) not in colours  # circle is not present: not in the legend


def test_run_on_a_dataset_split_in_hub_layout(export, tmp_path):
    """``hub_dataset``: the images of a split (a local folder in Hub layout), named <split>/<row>."""
    from tests.parquet_data import write_parquet_dataset

    folder, _, _ = export
    root = tmp_path / "hub"
    ids = write_parquet_dataset(root, [3, 2], split="test", size=24)
    out = tmp_path / "out"
    written = Predictor.from_export(folder).run([], out, probs="npy", probs_dtype="float32", progress=False,
                                                hub_dataset={"path": str(root), "split": "test"})
    assert sorted(p.relative_to(out / "labels").as_posix() for p in written) == \
        [f"test/{i:06d}.png" for i in range(len(ids))]
    for i in range(len(ids)):
        labels = np.asarray(Image.open(out / "labels" / "test" / f"{i:06d}.png"))
        probs = np.load(out / "probs" / "test" / f"{i:06d}.npy")
        assert labels.shape == (24, 24) and (probs.argmax(0) == labels).all()
    with pytest.raises(ConfigError, match="--hub-dataset.*split 'nope'"):
        Predictor.from_export(folder).run([], out, progress=False, hub_dataset={"path": str(root), "split": "nope"})
    with pytest.raises(ConfigError, match="--image-column.*no column 'pixels'"):
        Predictor.from_export(folder).run([], out, progress=False,
                                          hub_dataset={"path": str(root), "split": "test", "image_column": "pixels"})


def test_an_output_folder_inside_the_input_folder_is_not_read_as_input(tmp_path):
    """Issue 23, finding 8: `predict --out` inside the input folder predicted its own earlier
    outputs on the next run."""
    import numpy as np
    from PIL import Image

    from seg_accel.cli import predict_cli
    from tests.unit.test_evaluate import save_tiny_model

    save_tiny_model(tmp_path / "export")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(images / f"{name}.png")
    for _ in range(2):  # the second run finds the first's labels/ and overlays/ under images/
        assert predict_cli([str(tmp_path / "export"), str(images), "--out", str(images / "pred")]) == 0
    written = sorted(p.relative_to(images / "pred").as_posix() for p in (images / "pred").rglob("*.png"))
    assert written == ["labels/a.png", "labels/b.png", "overlays/a.png", "overlays/b.png"], written


def test_a_class_named_dot_dot_gets_a_file_name_of_its_own(tmp_path):
    """Issue 23, finding 7: a class named `..` became the hidden file `...png` among the probability
    maps (and a path component elsewhere); such names get `class<index>`."""
    import numpy as np

    from seg_accel.inference.predict import PredictionWriter

    writer = PredictionWriter(tmp_path, ["background", "..", ".hidden", "a/b"], np.zeros((4, 3), np.uint8), "png")
    writer.write("img", np.zeros((4, 4), np.int64), np.full((4, 4, 4), 0.25, np.float32), None)
    assert sorted(p.name for p in (tmp_path / "probs" / "img").iterdir()) == [
        "a_b.png", "background.png", "class1.png", "class2.png"]
