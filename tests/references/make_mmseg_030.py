"""Regenerates tests/references/mmseg_030.safetensors and mmseg_030.json: MMSegmentation 0.30's
outputs for the six networks of tests/references/mmseg_case.py (seeded weights, eval mode,
a 1x3x128x256 input): the decode and auxiliary heads' logits at their stride (the logits at
the input size are compared only against the live reference: 2.5 MB each), the state dict's
names and shapes, the parameter
counts at full size (every shipped config), and the decode and auxiliary losses of one PSPNet training step.

Run where MMSegmentation 0.30 is installed (``pip install setuptools==69.5.1 wheel``,
``MMCV_WITH_OPS=0 pip install --no-build-isolation mmcv==1.7.2``,
``pip install --no-deps mmsegmentation==0.30.0``, plus opencv-python-headless), from the
repository root:

    python tests/references/make_mmseg_030.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.references import mmseg_case as case  # noqa: E402


def main() -> None:
    from safetensors.torch import save_file

    import mmseg

    tensors: dict[str, torch.Tensor] = {}
    facts: dict = {"mmseg": mmseg.__version__, "torch": torch.__version__, "networks": {}}
    x = case.seeded_input()
    for name, (relative, _) in case.CASES.items():
        model = case.mmseg_model(relative)
        state = case.seeded_state(model.state_dict())
        model.load_state_dict(state, strict=True)
        model.eval()
        with torch.no_grad():
            features = model.extract_feat(x)
            tensors[f"{name}.decode"] = model.decode_head.forward_test(features, None, None).contiguous()
            tensors[f"{name}.auxiliary"] = model.auxiliary_head.forward_test(features, None, None).contiguous()
        facts["networks"][name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "state_dict": {k: list(v.shape) for k, v in model.state_dict().items()},
        }
        print(name, facts["networks"][name]["parameters"])
    facts["parameters"] = {name: sum(p.numel() for p in case.mmseg_model(relative).parameters())
                           for name, relative in case.SHIPPED.items()}
    facts["losses"] = case.mmseg_pspnet_losses()
    print("losses", facts["losses"])
    save_file(tensors, str(case.REFERENCE))
    case.REFERENCE_FACTS.write_text(json.dumps(facts, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
