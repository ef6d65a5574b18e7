"""What tests/unit/test_mmseg.py compares with MMSegmentation 0.30, shared with the script that
saves the reference's outputs (make_mmseg_030.py): the six networks, the seeded weights both
models get, the inputs, the loss case, and how the reference is imported.

The weights are not MMSegmentation's random initialisation (which cannot be repeated without
it) but values drawn from a generator seeded by each tensor's name, of the initialisation's
scale, with BatchNorm statistics away from 0 and 1 so that eval mode is exercised; both
models get the same tensors under the same names.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import zlib
from pathlib import Path

import torch

# network -> (MMSegmentation 0.30 config under its configs/, seg-accel's shipped config)
CASES = {
    "pspnet_r50-d8": ("pspnet/pspnet_r50-d8_512x1024_40k_cityscapes.py", "pspnet_r50-d8_512x1024_40k_cityscapes"),
    "deeplabv3_r50-d8": ("deeplabv3/deeplabv3_r50-d8_512x1024_40k_cityscapes.py",
                         "deeplabv3_r50-d8_512x1024_40k_cityscapes"),
    "deeplabv3plus_r50-d8": ("deeplabv3plus/deeplabv3plus_r50-d8_512x1024_40k_cityscapes.py",
                             "deeplabv3plus_r50-d8_512x1024_40k_cityscapes"),
    "fcn_r50-d8": ("fcn/fcn_r50-d8_512x1024_40k_cityscapes.py", "fcn_r50-d8_512x1024_40k_cityscapes"),
    "upernet_r50": ("upernet/upernet_r50_512x1024_40k_cityscapes.py", "upernet_r50_512x1024_40k_cityscapes"),
    "fcn_unet_s5-d16": ("unet/fcn_unet_s5-d16_64x64_40k_drive.py", "fcn_unet_s5-d16_64x64_40k_drive"),
}
# every shipped config under its 0.x name -> MMSegmentation 0.30's config (parameter counts)
SHIPPED = {
    "pspnet_r50-d8_512x1024_40k_cityscapes": "pspnet/pspnet_r50-d8_512x1024_40k_cityscapes.py",
    "pspnet_r50-d8_512x1024_80k_cityscapes": "pspnet/pspnet_r50-d8_512x1024_80k_cityscapes.py",
    "deeplabv3_r50-d8_512x1024_40k_cityscapes": "deeplabv3/deeplabv3_r50-d8_512x1024_40k_cityscapes.py",
    "deeplabv3plus_r50-d8_512x1024_40k_cityscapes": "deeplabv3plus/deeplabv3plus_r50-d8_512x1024_40k_cityscapes.py",
    "fcn_r50-d8_512x1024_40k_cityscapes": "fcn/fcn_r50-d8_512x1024_40k_cityscapes.py",
    "upernet_r50_512x1024_40k_cityscapes": "upernet/upernet_r50_512x1024_40k_cityscapes.py",
    "fcn_unet_s5-d16_64x64_40k_drive": "unet/fcn_unet_s5-d16_64x64_40k_drive.py",
    "fcn_unet_s5-d16_128x128_40k_stare": "unet/fcn_unet_s5-d16_128x128_40k_stare.py",
    "fcn_unet_s5-d16_128x128_40k_chase_db1": "unet/fcn_unet_s5-d16_128x128_40k_chase_db1.py",
    "fcn_unet_s5-d16_256x256_40k_hrf": "unet/fcn_unet_s5-d16_256x256_40k_hrf.py",
    "fcn_unet_s5-d16_4x4_512x1024_160k_cityscapes": "unet/fcn_unet_s5-d16_4x4_512x1024_160k_cityscapes.py",
}
INPUT_SHAPE = (1, 3, 128, 256)
REFERENCE = Path(__file__).with_name("mmseg_030.safetensors")
REFERENCE_FACTS = Path(__file__).with_name("mmseg_030.json")
# the training-step case: PSPNet-R50-D8, decode CE with the Cityscapes class weights and OHEM
# (thresh 0.7), auxiliary CE 0.4, a batch of 2 at 64x128
CITYSCAPES_WEIGHTS = [0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539, 0.9843,
                      1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507]
LOSS_DECODE = {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 1.0,
               "class_weight": CITYSCAPES_WEIGHTS}
LOSS_SAMPLER = {"type": "OHEMPixelSampler", "thresh": 0.7, "min_kept": 2000}
LOSS_AUX = {"type": "CrossEntropyLoss", "use_sigmoid": False, "loss_weight": 0.4}
LOSS_BATCH = (2, 3, 64, 128)
DROPOUT_SEED = 7
# the decode classifier's weights are scaled so that some pixels are predicted confidently
# (probability of their label > thresh) and OHEM leaves them out
LOSS_LOGIT_SCALE = 30.0


def seeded_state(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """New values for every floating tensor of ``state``, a function of its name and shape."""
    out = {}
    for name, tensor in state.items():
        if not tensor.dtype.is_floating_point:
            out[name] = tensor.clone()
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        shape = tuple(tensor.shape)
        if name.endswith("running_var"):
            value = torch.rand(shape, generator=g) + 0.5
        elif name.endswith("running_mean"):
            value = torch.rand(shape, generator=g) * 0.2 - 0.1
        elif tensor.dim() == 1 and name.endswith("weight"):  # a norm's scale
            value = torch.rand(shape, generator=g) + 0.5
        elif tensor.dim() == 1:  # a bias
            value = torch.rand(shape, generator=g) * 0.2 - 0.1
        else:
            fan_in = tensor[0].numel()
            value = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        out[name] = value.to(tensor.dtype)
    return out


def loss_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The seeded weights of the training-step case (the decode classifier scaled)."""
    out = seeded_state(state)
    for name in ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias"):
        out[name] = out[name] * LOSS_LOGIT_SCALE
    return out


def seeded_input(shape: tuple[int, ...] = INPUT_SHAPE, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def loss_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels (19 classes, some pixels 255) of the training-step case."""
    g = torch.Generator().manual_seed(3)
    images = torch.randn(LOSS_BATCH, generator=g)
    labels = torch.randint(0, 19, (LOSS_BATCH[0], *LOSS_BATCH[2:]), generator=g)
    labels[:, :8] = 255
    return images, labels


def reference_available() -> bool:
    """Whether MMSegmentation 0.30 and mmcv 1.7.2 are importable here."""
    return importlib.util.find_spec("mmseg") is not None and importlib.util.find_spec("mmcv") is not None


def install_mmcv_stubs() -> None:
    """mmcv built without its compiled ops (MMCV_WITH_OPS=0): ``mmcv.ops``/``mmcv._ext`` as modules
    whose names are classes that refuse to be built (MMSegmentation imports them at import
    time; these six networks use none)."""

    class Missing:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("an mmcv compiled op (not built: MMCV_WITH_OPS=0)")

    def stub(name: str) -> types.ModuleType:
        module = types.ModuleType(name)

        def getattr_(attr: str):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (Missing,), {})

        module.__getattr__ = getattr_
        module.__path__ = []
        return module

    for name in ("mmcv.ops", "mmcv._ext"):
        sys.modules.setdefault(name, stub(name))


def mmseg_config(relative: str):
    """The MMSegmentation config (its own file under the installed package), with BatchNorm for
    SyncBN (one process) and no ImageNet weights."""
    install_mmcv_stubs()
    import mmseg
    from mmcv import Config

    root = Path(mmseg.__file__).parent / ".mim" / "configs"
    cfg = Config.fromfile(str(root / relative))
    cfg.model.pretrained = None

    def plain_bn(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "norm_cfg" and isinstance(value, dict) and value.get("type") == "SyncBN":
                    node[key] = dict(type="BN", requires_grad=True)
                else:
                    plain_bn(value)

    plain_bn(cfg.model)
    return cfg


def mmseg_model(relative: str, **head_changes):
    """MMSegmentation's ``EncoderDecoder`` of a config (``head_changes``: keys set on the decode
    and auxiliary heads, e.g. their losses)."""
    install_mmcv_stubs()
    from mmseg.models import build_segmentor

    cfg = mmseg_config(relative)
    for head, changes in head_changes.items():
        cfg.model[head].update(changes)
    return build_segmentor(cfg.model)


def image_metas(shape: tuple[int, ...]) -> list[dict]:
    height, width = shape[-2:]
    return [dict(img_shape=(height, width, 3), ori_shape=(height, width, 3), pad_shape=(height, width, 3),
                 scale_factor=1.0, flip=False) for _ in range(shape[0])]


def mmseg_pspnet_losses() -> dict[str, float]:
    """MMSegmentation's decode and auxiliary losses of the training-step case (``forward_train``)."""
    model = mmseg_model(CASES["pspnet_r50-d8"][0], decode_head={"loss_decode": LOSS_DECODE, "sampler": LOSS_SAMPLER},
                        auxiliary_head={"loss_decode": LOSS_AUX})
    model.load_state_dict(loss_state(model.state_dict()), strict=True)
    model.train()
    images, labels = loss_batch()
    torch.manual_seed(DROPOUT_SEED)
    losses = model.forward_train(images, image_metas(images.shape), labels[:, None])
    return {k: float(v.detach()) for k, v in losses.items() if "loss" in k}
