"""ONNX export of a seg-accel model with a parity check in onnxruntime.

The graph takes ``pixel_values`` ``(N, 3, H, W)`` (normalised as the export's image
processor says) and returns ``logits`` ``(N, C, h, w)`` at the model's output stride, as the
PyTorch model does; resizing to the image and argmax stay with the caller. ``dynamic``
makes batch, height and width free (``H`` and ``W`` should stay multiples of the model's
stride, e.g. 32). The class names and the normalisation go into the file's metadata.

Parity: the same sample images (given, or random ones of the export size) go through the
PyTorch model and onnxruntime; the largest absolute logit difference and the share of
output pixels whose argmax agrees are reported, and the export fails below
``MIN_AGREEMENT``.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seg_accel.errors import ConfigError, StorageError, TrainingError
from seg_accel.runtime.storage import atomic_file, write_failure

logger = logging.getLogger("seg_accel")

MIN_AGREEMENT = 0.999
DEFAULT_OPSET = 18


class LogitsOnly(torch.nn.Module):
    """The model with ``forward(pixel_values) -> logits`` (what an ONNX graph returns)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from seg_accel.models.interface import segmentation_logits

        return segmentation_logits(self.model, pixel_values)


@dataclass
class ParityReport:
    images: int
    max_abs_diff: float
    agreement: float  # share of output pixels with the same argmax (a 1-channel head: the same side of 0)
    shapes: list[tuple[int, ...]]

    def line(self) -> str:
        return (f"parity on {self.images} image(s): max |logit difference| {self.max_abs_diff:.3g}, argmax agreement "
                f"{100 * self.agreement:.4f}% of pixels")


def require_onnxruntime() -> Any:
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): pip install "
                          "'seg-accel[onnx]'", key="export-onnx") from exc
    return onnxruntime


PROTOBUF_LIMIT = 2**31 - 1  # an ONNX file holds its weights up to this size; larger: external data beside it


def _storage_cause(exc: BaseException) -> OSError | None:
    """The OSError of a full or read-only disk somewhere in an exporter's chain of exceptions."""
    import errno

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT,
                                                      errno.EPERM, errno.EIO):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def export_onnx(model: torch.nn.Module, out: str | os.PathLike, size: tuple[int, int], opset: int = DEFAULT_OPSET,
                dynamic: bool = False, metadata: dict[str, str] | None = None, exporter: str = "dynamo") -> Path:
    """Write ``model`` as ONNX to ``out`` for ``(3, *size)`` images, the weights inside the file
    (beside it, ``<out>.data``, only past protobuf's 2 GB); returns the path. A full or read-only
    disk is a ``StorageError`` naming the path."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"could not write {out}: {exc.strerror or exc}") from exc
    wrapper = LogitsOnly(model.float().eval()).eval()
    # batch 2 when dynamic: an example of batch 1 would let the exporter fix the batch at 1
    example = torch.randn(2 if dynamic else 1, 3, *size, generator=torch.Generator().manual_seed(0))
    kwargs: dict[str, Any] = {"input_names": ["pixel_values"], "output_names": ["logits"], "opset_version": opset}
    if exporter == "dynamo":
        kwargs["dynamo"] = True
        if dynamic:
            dim = torch.export.Dim
            kwargs["dynamic_shapes"] = {"pixel_values": {0: dim("batch", min=1, max=1024),
                                                         2: dim("height", min=16, max=16384),
                                                         3: dim("width", min=16, max=16384)}}
    elif exporter == "torchscript":
        kwargs["dynamo"] = False
        if dynamic:
            kwargs["dynamic_axes"] = {"pixel_values": {0: "batch", 2: "height", 3: "width"},
                                      "logits": {0: "batch", 2: "out_height", 3: "out_width"}}
    else:
        raise ConfigError(f"must be dynamo or torchscript, got {exporter!r}", key="--exporter")
    import tempfile

    import onnx

    try:
        with tempfile.TemporaryDirectory(prefix=".seg_accel_onnx_", dir=out.parent) as scratch:
            raw = Path(scratch) / "model.onnx"  # the exporter may write its weights beside it (model.onnx.data)
            try:
                with torch.no_grad():
                    torch.onnx.export(wrapper, (example,), str(raw), **kwargs)
            except Exception as exc:  # the exporters raise many kinds; say which model and how to try otherwise
                if _storage_cause(exc) is not None:
                    raise _storage_cause(exc) from exc
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                other = "torchscript" if exporter == "dynamo" else "dynamo"
                raise TrainingError(f"torch.onnx ({exporter} exporter) cannot export {type(model).__name__}: "
                                    f"{type(exc).__name__}: {first[:400]} (try --exporter {other})") from exc
            proto = onnx.load(str(raw))  # with its external data, if any
            for key, value in (metadata or {}).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, value
            embedded = proto.ByteSize() < PROTOBUF_LIMIT
            with atomic_file(out) as tmp:
                if embedded:
                    onnx.save(proto, str(tmp))
                else:
                    onnx.save(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                              location=f"{out.name}.data")
                    os.replace(tmp.parent / f"{out.name}.data", out.parent / f"{out.name}.data")
            if embedded:
                Path(f"{out}.data").unlink(missing_ok=True)  # an earlier export's, now unused
    except OSError as exc:
        raise StorageError(f"could not write {out}: {write_failure(exc)}") from exc
    return out


def parity(model: torch.nn.Module, onnx_file: str | os.PathLike, batches: Sequence[torch.Tensor]) -> ParityReport:
    """Run each batch through the PyTorch model and onnxruntime; compare logits and argmax."""
    ort = require_onnxruntime()
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    wrapper = LogitsOnly(model.float().eval()).eval()
    worst, agree, total, shapes, images = 0.0, 0, 0, [], 0
    for pixel_values in batches:
        with torch.no_grad():
            reference = wrapper(pixel_values.float()).float().numpy()
        got = session.run(["logits"], {"pixel_values": pixel_values.float().numpy()})[0]
        if got.shape != reference.shape:
            raise TrainingError(f"the ONNX graph returned {got.shape}, PyTorch {reference.shape}")
        worst = max(worst, float(np.abs(got - reference).max()))
        if reference.shape[1] == 1:
            same = (got[:, 0] > 0) == (reference[:, 0] > 0)
        else:
            same = got.argmax(1) == reference.argmax(1)
        agree += int(same.sum())
        total += same.size
        shapes.append(tuple(got.shape))
        images += pixel_values.shape[0]
    return ParityReport(images, worst, agree / max(total, 1), shapes)


def export_with_parity(source: str, out: str | os.PathLike, opset: int = DEFAULT_OPSET, dynamic: bool = False,
                       size: tuple[int, int] | None = None, check: Sequence[str] = (), samples: int = 4,
                       exporter: str = "dynamo", trust_remote_code: bool = False) -> ParityReport:
    """Load an export (folder or Hub id), write ``out`` and check it on ``check`` images (files,
    folders, globs) or ``samples`` random images. Raises when the argmax agreement is below
    ``MIN_AGREEMENT``."""
    require_onnxruntime()
    from seg_accel.version import __version__
    from seg_accel.inference.predict import Predictor, collect_inputs

    predictor = Predictor.from_export(source, trust_remote_code=trust_remote_code)
    files = collect_inputs(list(check), key="--check") if check else []
    # the input size: --size, else the image processor's resize, else the first check image's
    size = size or _processor_size(predictor) or (tuple(predictor.prepare(files[0]).shape[-2:]) if files else None)
    if size is None:
        size = (512, 512)
        logger.info("no input size known (no --size, no resize in the export's image processor, no --check "
                    "images): 512x512")
    metadata = {"seg_accel_version": __version__, "classes": json.dumps(predictor.classes),
                "pipeline": json.dumps(predictor.pipeline), "input": f"pixel_values (N, 3, H, W), H x W = {size}"
                + (" (dynamic)" if dynamic else "")}
    final = Path(out)
    path = export_onnx(predictor.model, final.with_name(f".{final.name}.unchecked.onnx"), size, opset, dynamic,
                       metadata, exporter)
    batches: list[torch.Tensor] = []
    if check:
        for file in files:
            pixel_values = predictor.prepare(file)[None]
            if not dynamic and tuple(pixel_values.shape[-2:]) != tuple(size):
                pixel_values = torch.nn.functional.interpolate(pixel_values, size=size, mode="bilinear",
                                                               align_corners=False)
            batches.append(pixel_values)
    else:
        rng = np.random.default_rng(0)
        for _ in range(samples):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            batches.append(predictor.prepare(image)[None])
        if dynamic:  # a batch of 2 at another size too
            other = (size[0] + 32, size[1] + 64)
            batches.append(torch.stack([predictor.prepare(rng.integers(0, 256, (*other, 3), dtype=np.uint8))
                                        for _ in range(2)]))
    report = parity(predictor.model, path, batches)
    if report.agreement < MIN_AGREEMENT:  # not at --out: a graph there is one that passed
        failed = final.with_name(f"{final.stem}.failed{final.suffix or '.onnx'}")
        _move_onnx(path, failed)
        raise TrainingError(f"the ONNX graph disagrees with PyTorch: {report.line()} (below "
                            f"{100 * MIN_AGREEMENT:.1f}%); nothing was written to {final}; the graph is kept for "
                            f"inspection as {failed}")
    _move_onnx(path, final)
    logger.info("wrote %s (opset %d, %s exporter%s); %s", final, opset, exporter, ", dynamic batch/height/width"
                if dynamic else f", input 1x3x{size[0]}x{size[1]}", report.line())
    return report


def _move_onnx(source: Path, target: Path) -> None:
    """Rename a graph (and its external data, if any) to ``target``; the graph it replaces goes."""
    data = Path(f"{source}.data")
    try:
        if data.exists():  # past 2 GB: the graph names its data file; write it under the new name
            import onnx

            proto = onnx.load(str(source))
            onnx.save(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"{target.name}.data")
            source.unlink()
            data.unlink()
            return
        os.replace(source, target)
        Path(f"{target}.data").unlink(missing_ok=True)
    except OSError as exc:
        raise StorageError(f"could not write {target}: {write_failure(exc)}") from exc


def _processor_size(predictor: Any) -> tuple[int, int] | None:
    for step in predictor.pipeline:
        if step.get("type") == "Resize" and step.get("keep_ratio") is False:
            w, h = step["scale"]
            return int(h), int(w)
    return None
