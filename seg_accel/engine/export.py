"""Exports: the trained model as a folder that loads with one call (``seg_accel.load_model`` or,
for transformers models, ``AutoModelForSemanticSegmentation.from_pretrained``), with the
image processor that prepares images as the test pipeline does."""
from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seg_accel.runtime.storage import WRITE_ERRORS, agree_on_write
from seg_accel.models import export_model

logger = logging.getLogger("seg_accel")


class Exporter:
    """Writes exports of the prepared ``model``. Every process calls ``export`` (a model
    sharded by FSDP/DeepSpeed is gathered first); the main process writes. Listeners in
    ``on_final`` are called with the folder of the final export."""

    def __init__(self, accelerator: Any, model: Any, classes: list[str], processor: Any = None):
        self.accelerator, self.model, self.classes, self.processor = accelerator, model, list(classes), processor
        self.on_final: list[Callable[[Path], None]] = []

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: no process holds the whole model."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def export(self, folder: Path, final: bool = False) -> None:
        """Write the export into ``.<name>.tmp`` and rename it to ``folder``: an interrupted or
        failed export never leaves a folder that looks complete (nor replaces a good one)."""
        acc, folder = self.accelerator, Path(folder)
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model) if self.sharded else None  # a collective when sharded
        tmp, error = folder.parent / f".{folder.name}.tmp", None
        if acc.is_main_process:
            try:
                if tmp.exists():
                    shutil.rmtree(tmp)
                model = acc.unwrap_model(self.model, keep_fp32_wrapper=False, keep_torch_compile=False)
                export_model(model, tmp, self.classes, self.processor, state_dict=state_dict)
                if folder.exists():
                    shutil.rmtree(folder)
                tmp.rename(folder)
            except WRITE_ERRORS as exc:  # safetensors and torch.save wrap ENOSPC in their own errors
                error = exc
        agree_on_write(acc, error, f"the export {folder} (nothing else was touched)",
                       cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))
        if acc.is_main_process:
            logger.info("exported the model to %s", folder)
            if final:
                for listener in self.on_final:
                    listener(folder)
        acc.wait_for_everyone()
