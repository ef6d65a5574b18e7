"""The model card of a pushed model: model-index metadata (dataset, mIoU/mAcc/aAcc), a
per-class IoU table, the training recipe, the hardware and how to load the model.

Everything comes from the files a run writes (the resolved ``config.yaml``,
``eval_results.json``, ``run_info.json`` and the export's ``config.json``), so the
same card is built during training and by ``scripts/push_to_hub.py`` afterwards.
"""
from __future__ import annotations

import math
from typing import Any

from seg_accel.version import __version__

# model-index metric types for our summary metrics (names as in MMSegmentation's logs)
METRIC_TYPES = {"mIoU": "mean_iou", "mAcc": "mean_accuracy", "aAcc": "overall_accuracy",
                "mDice": "mean_dice", "mFscore": "mean_fscore"}


def _fmt(value: Any) -> str:
    if value is None:  # undefined (NaN in the evaluation, null in its JSON)
        return "nan"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


def dataset_identity(data_cfg: dict) -> dict[str, Any]:
    """Hub id (when the data come from the Hub) or the dataset type, and the splits used."""
    train = data_cfg.get("train") or {}
    val = data_cfg.get("val") or {}
    path = str(train.get("path") or "")
    on_hub = train.get("type") == "HubDataset" and path and not path.startswith((".", "/")) and path.count("/") == 1
    name = path if on_hub else str(train.get("type", "dataset"))
    return {
        "hub_id": path if on_hub else None,
        "type": name,
        "name": name.split("/")[-1],
        "config": train.get("name"),
        "val_split": val.get("split") or ("validation" if val else None),
    }


def _recipe(cfg: dict, info: dict) -> list[tuple[str, str]]:
    optimizer = dict(cfg.get("optimizer") or {})
    opt = optimizer.pop("type", "?")
    paramwise = optimizer.pop("paramwise_cfg", None)
    opt_args = ", ".join(f"{k}={v}" for k, v in optimizer.items())
    rows = [("optimizer", f"{opt}({opt_args})")]
    if paramwise:
        rows.append(("parameter groups", ", ".join(f"{k}: {v}" for k, v in paramwise.items())))
    lr = dict(cfg.get("lr_config") or {})
    if lr:
        rows.append(("learning-rate schedule", ", ".join(f"{k}={v}" for k, v in lr.items())))
    model = cfg.get("model") or {}
    for head_key in ("decode_head", "auxiliary_head"):
        head = model.get(head_key)
        if head is None and head_key == "auxiliary_head":
            continue
        head = head or {}
        losses = head.get("loss_decode") or {"type": "CrossEntropyLoss", "loss_weight": 1.0}  # HeadConfig's default
        losses = losses if isinstance(losses, list) else [losses]
        text = "; ".join(", ".join(f"{k}={v}" for k, v in loss.items()) for loss in losses)
        rows.append((f"losses ({head_key})", text))
        sampler = head.get("sampler")
        if sampler:
            rows.append((f"pixel sampler ({head_key})", ", ".join(f"{k}={v}" for k, v in sampler.items())))
    runner = cfg.get("runner") or {}
    length = (f"{runner['max_epochs']} epochs" if "max_epochs" in runner else f"{runner.get('max_iters', '?')} iterations")
    if info.get("iterations") is not None:
        length += f" ({info['iterations']} optimizer iterations done)"
    rows.append(("training length", length))
    data = cfg.get("data") or {}
    per_gpu = data.get("samples_per_gpu", 2)
    processes = info.get("num_processes", 1)
    accumulation = cfg.get("gradient_accumulation_steps", 1)
    rows.append(("batch", f"{per_gpu} per process x {processes} process(es) x {accumulation} accumulation = "
                          f"{per_gpu * processes * accumulation} images per iteration"))
    crop = next((t.get("crop_size") for t in (data.get("train") or {}).get("pipeline") or []
                 if isinstance(t, dict) and t.get("type") == "RandomCrop"), None)
    if crop:
        rows.append(("crop", "x".join(str(c) for c in (crop if isinstance(crop, list) else [crop, crop]))))
    rows.append(("mixed precision", str(info.get("mixed_precision", cfg.get("mixed_precision") or "no"))))
    hardware = info.get("device_name") or info.get("device")
    if hardware:
        rows.append(("hardware", f"{processes} x {hardware}"))
    if info.get("train_seconds") is not None:
        rows.append(("training time", f"{info['train_seconds'] / 3600:.2f} h"))
    rows.append(("seed", str(cfg.get("seed", 0))))
    rows.append(("seg-accel", str(info.get("seg_accel", __version__))))
    return rows


def build_model_card(
    repo_id: str,
    cfg: dict,
    model_config: dict,
    evaluation: dict | None = None,
    info: dict | None = None,
) -> Any:
    """A ``huggingface_hub.ModelCard``. ``cfg``: the resolved training config; ``model_config``:
    the export's ``config.json``; ``evaluation``: ``eval_results.json`` (metrics, per-class,
    iteration); ``info``: ``run_info.json`` (processes, device, time)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from seg_accel.models import family_of_export

    info = info or {}
    dataset = dataset_identity(cfg.get("data") or {})
    family = family_of_export(model_config)  # the family that wrote the export says how to present it
    described = family.describe_export(model_config)
    architecture = described["architecture"]
    model_name = repo_id.split("/")[-1]
    eval_results = []
    if evaluation:
        for name, value in evaluation.get("metrics", {}).items():
            if name in METRIC_TYPES and isinstance(value, (int, float)) and not math.isnan(value):
                eval_results.append(EvalResult(
                    task_type="image-segmentation", task_name="Semantic Segmentation",
                    dataset_type=dataset["hub_id"] or dataset["type"], dataset_name=dataset["name"],
                    dataset_config=dataset["config"], dataset_split=dataset["val_split"],
                    metric_type=METRIC_TYPES[name], metric_name=name, metric_value=round(float(value), 4),
                ))
    card_data = ModelCardData(
        library_name=described["library"],
        pipeline_tag="image-segmentation",
        tags=["seg-accel", "semantic-segmentation", described["tag"]],
        datasets=[dataset["hub_id"]] if dataset["hub_id"] else None,
        metrics=["mean_iou"] if eval_results else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    id2label = family.id2label(model_config)
    classes = [id2label.get(str(i), str(i)) for i in range(len(id2label))]
    lines = [f"# {model_name}", "",
             f"A `{architecture}` for semantic segmentation of {len(classes)} classes, trained on "
             f"{'[' + dataset['hub_id'] + '](https://huggingface.co/datasets/' + dataset['hub_id'] + ')' if dataset['hub_id'] else dataset['type']}"
             f" with seg-accel (Hugging Face Accelerate).", ""]
    lines += ["## Results", ""]
    if evaluation:
        metrics = evaluation.get("metrics", {})
        where = f"iteration {evaluation.get('iter')}" + (f", {evaluation['num_processes']} process(es)"
                                                          if evaluation.get("num_processes") else "")
        lines += [f"Evaluated on the `{dataset['val_split']}` split at {where} (metrics in %):", "",
                  "| " + " | ".join(metrics) + " |", "|" + "---|" * len(metrics),
                  "| " + " | ".join(_fmt(v) for v in metrics.values()) + " |", ""]
        per_class = evaluation.get("per_class", {})
        columns = [c for c in ("IoU", "Acc", "Dice", "Fscore") if c in per_class]
        if columns:
            lines += ["Per class:", "", "| class | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
            for name in evaluation.get("classes", classes):
                lines.append(f"| {name} | " + " | ".join(_fmt(per_class[c].get(name, math.nan)) for c in columns) + " |")
            lines.append("")
    else:
        lines += ["Not evaluated (the training config has no `data.val`).", ""]
    lines += ["## How to use", "", *family.usage(repo_id, model_config)]
    lines += ["## Training", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in _recipe(cfg, info)]
    lines += ["", "The full training config is `training_config.yaml` in this repository; the training log "
              "(one JSON object per logged iteration and evaluation) is under `logs/`, the last evaluation in "
              "`eval_results.json`. To train it again: `seg-accel train training_config.yaml`.", ""]
    return ModelCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n",
                                   body="\n".join(lines))
