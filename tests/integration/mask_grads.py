"""Run under ``accelerate launch`` (1 or 2 processes): the mask-classification objective on 4
fixed images split over the processes, one backward through DDP; the main process saves the
loss (mean over processes, as the run log reports it) and the gradients to ``argv[1]``.
``--per-process`` normalises by each process's own counts (what transformers does in effect)."""
from __future__ import annotations

import sys

import torch


def main(out: str, per_process: bool) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from seg_accel.config.schema import ModelConfig
    from seg_accel.config.types import parse_section
    from seg_accel.models import build_model, family_of_model
    from tests.unit.test_mask_classification import CLASSES, TINY_MASK2FORMER

    torch.manual_seed(0)
    model = build_model(parse_section(dict(TINY_MASK2FORMER), ModelConfig, "model"), CLASSES)
    # as the trainer sets it for this family (Swin's final layernorm has no gradient)
    unused = family_of_model(model).needs_unused_parameter_search(model, False)
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])
    objective = family_of_model(model).training_objective(model, 255, 0)
    if per_process:
        objective.loss.reduce_sum, objective.loss.world_size = (lambda t: t), (lambda: 1)
    wrapped = accelerator.prepare(model)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=generator)
    labels = torch.randint(0, 4, (4, 8, 8), generator=generator).repeat_interleave(8, 1).repeat_interleave(8, 2)
    labels[0] = 1  # one class in the first image, more in the others
    labels[3, :8] = 255
    per = 4 // accelerator.num_processes
    part = slice(accelerator.process_index * per, (accelerator.process_index + 1) * per)
    batch = {"pixel_values": images[part], "labels": labels[part], "indices": torch.arange(4)[part]}
    wrapped.train()
    loss, logs = objective(wrapped, batch, 1)
    accelerator.backward(loss)
    mean_loss = accelerator.reduce(loss.detach(), "mean")
    if accelerator.is_main_process:
        grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": mean_loss, "grads": grads, "params": len(list(model.parameters()))}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], "--per-process" in sys.argv[2:])
