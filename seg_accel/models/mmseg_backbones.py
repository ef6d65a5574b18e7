"""MMSegmentation 0.30's CNN backbones, with its constructor arguments, defaults and parameter
names (so its checkpoints load as they are): ``ResNet`` (``ResNetV1c``: 3-conv deep stem;
``ResNetV1d``: deep stem and average-pool shortcuts) at depths 18-152 with any strides and
dilations, and the ``UNet`` of the ``fcn_unet_s5-d16`` configs.

The building block is MMCV's ``ConvModule`` (conv, then norm, then ReLU), kept as its own
small module so that the names (``conv``, ``bn``) are MMCV's. ``norm_cfg`` takes ``BN`` and
``SyncBN`` (built as ``BatchNorm2d``; seg-accel converts to ``SyncBatchNorm`` on multi-GPU
runs), with ``requires_grad``, ``eps`` and ``momentum``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

NORM_TYPES = ("BN", "SyncBN", "BN2d")
ACT_TYPES = ("ReLU",)


def norm_layer(norm_cfg: dict[str, Any] | None, channels: int) -> nn.Module:
    """MMCV's ``build_norm_layer`` for BatchNorm (``BN``/``SyncBN``)."""
    cfg = dict(norm_cfg or {"type": "BN"})
    layer = nn.BatchNorm2d(channels, eps=float(cfg.get("eps", 1e-5)), momentum=float(cfg.get("momentum", 0.1)))
    for param in layer.parameters():
        param.requires_grad = bool(cfg.get("requires_grad", True))
    return layer


class ConvModule(nn.Module):
    """MMCV's ``ConvModule``: ``conv`` (bias only without a norm), ``bn``, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 dilation: int = 1, groups: int = 1, norm_cfg: dict | None = None, act: bool = True,
                 inplace: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                              bias=norm_cfg is None)
        self.bn = norm_layer(norm_cfg, out_channels) if norm_cfg is not None else None
        self.activate = nn.ReLU(inplace=inplace) if act else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")  # MMCV's init
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.activate(x) if self.activate is not None else x


class DepthwiseSeparableConvModule(nn.Module):
    """MMCV's depthwise (groups = channels) then pointwise ``ConvModule`` pair."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, dilation: int = 1,
                 norm_cfg: dict | None = None):
        super().__init__()
        self.depthwise_conv = ConvModule(in_channels, in_channels, kernel_size, padding=padding, dilation=dilation,
                                         groups=in_channels, norm_cfg=norm_cfg)
        self.pointwise_conv = ConvModule(in_channels, out_channels, 1, norm_cfg=norm_cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None,
                 style: str, norm_cfg: dict | None):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride, dilation, dilation)
        self.bn1 = norm_layer(norm_cfg, planes)
        self.conv2 = _conv(planes, planes, 3, 1, 1)
        self.bn2 = norm_layer(norm_cfg, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """The PyTorch-style bottleneck (stride on the 3x3 conv; ``style: caffe`` puts it on the first 1x1)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None,
                 style: str, norm_cfg: dict | None):
        super().__init__()
        stride1, stride2 = (1, stride) if style == "pytorch" else (stride, 1)
        self.conv1 = _conv(inplanes, planes, 1, stride1)
        self.bn1 = norm_layer(norm_cfg, planes)
        self.conv2 = _conv(planes, planes, 3, stride2, dilation, dilation)
        self.bn2 = norm_layer(norm_cfg, planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1)
        self.bn3 = norm_layer(norm_cfg, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


ARCH_SETTINGS: dict[int, tuple[type[nn.Module], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)), 152: (Bottleneck, (3, 8, 36, 3))}


class ResNet(nn.Module):
    """MMSegmentation's ``ResNet`` (``deep_stem``/``avg_down`` give V1c/V1d): ``out_indices``
    of the stage outputs, at ``strides``/``dilations`` per stage; ``contract_dilation`` halves
    the first block's dilation of a dilated stage; ``multi_grid`` sets the last stage's."""

    def __init__(self, depth: int, in_channels: int = 3, stem_channels: int = 64, base_channels: int = 64,
                 num_stages: int = 4, strides: tuple[int, ...] = (1, 2, 2, 2), dilations: tuple[int, ...] = (1, 1, 1, 1),
                 out_indices: tuple[int, ...] = (0, 1, 2, 3), style: str = "pytorch", deep_stem: bool = False,
                 avg_down: bool = False, frozen_stages: int = -1, norm_cfg: dict | None = None, norm_eval: bool = False,
                 multi_grid: tuple[int, ...] | None = None, contract_dilation: bool = False,
                 zero_init_residual: bool = True):
        super().__init__()
        norm_cfg = dict(norm_cfg or {"type": "BN", "requires_grad": True})
        block, stage_blocks = ARCH_SETTINGS[depth]
        self.out_indices, self.frozen_stages, self.norm_eval = tuple(out_indices), frozen_stages, norm_eval
        self.deep_stem = deep_stem
        if deep_stem:
            half = stem_channels // 2
            self.stem = nn.Sequential(
                _conv(in_channels, half, 3, 2, 1), norm_layer(norm_cfg, half), nn.ReLU(inplace=True),
                _conv(half, half, 3, 1, 1), norm_layer(norm_cfg, half), nn.ReLU(inplace=True),
                _conv(half, stem_channels, 3, 1, 1), norm_layer(norm_cfg, stem_channels), nn.ReLU(inplace=True))
        else:
            self.conv1 = _conv(in_channels, stem_channels, 7, 2, 3)
            self.bn1 = norm_layer(norm_cfg, stem_channels)
            self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem_channels
        self.res_layers: list[str] = []
        for i, blocks in enumerate(stage_blocks[:num_stages]):
            planes = base_channels * 2 ** i
            grid = tuple(multi_grid) if multi_grid is not None and i == num_stages - 1 else None
            layer = self._make_layer(block, inplanes, planes, blocks, strides[i], dilations[i], style, avg_down,
                                     norm_cfg, grid, contract_dilation)
            inplanes = planes * block.expansion
            name = f"layer{i + 1}"
            self.add_module(name, layer)
            self.res_layers.append(name)
        self.feat_dim = inplanes
        self._init_weights(zero_init_residual)
        self._freeze_stages()

    @staticmethod
    def _make_layer(block: Any, inplanes: int, planes: int, blocks: int, stride: int, dilation: int, style: str,
                    avg_down: bool, norm_cfg: dict, multi_grid: tuple[int, ...] | None,
                    contract_dilation: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            parts: list[nn.Module] = []
            if avg_down:
                parts.append(nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False))
            parts += [_conv(inplanes, planes * block.expansion, 1, 1 if avg_down else stride),
                      norm_layer(norm_cfg, planes * block.expansion)]
            downsample = nn.Sequential(*parts)
        if multi_grid is not None:
            dilation_of = list(multi_grid)
        else:
            first = dilation // 2 if dilation > 1 and contract_dilation else dilation
            dilation_of = [first] + [dilation] * (blocks - 1)
        layers = [block(inplanes, planes, stride, dilation_of[0], downsample, style, norm_cfg)]
        layers += [block(planes * block.expansion, planes, 1, dilation_of[i], None, style, norm_cfg)
                   for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:  # the last norm of each residual branch starts at zero
            for module in self.modules():
                last = getattr(module, "bn3", None) if isinstance(module, Bottleneck) else \
                    getattr(module, "bn2", None) if isinstance(module, BasicBlock) else None
                if last is not None:
                    nn.init.zeros_(last.weight)

    def _freeze_stages(self) -> None:
        if self.frozen_stages < 0:
            return
        frozen = [self.stem] if self.deep_stem else [self.conv1, self.bn1]
        frozen += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x) if self.deep_stem else self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        outs = []
        for i, name in enumerate(self.res_layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return outs

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            _batch_norms_eval(self)
        return self


def _batch_norms_eval(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


def ResNetV1c(depth: int, **kwargs: Any) -> ResNet:  # noqa: N802 (MMSegmentation's name)
    return ResNet(depth, deep_stem=True, avg_down=False, **kwargs)


def ResNetV1d(depth: int, **kwargs: Any) -> ResNet:  # noqa: N802
    return ResNet(depth, deep_stem=True, avg_down=True, **kwargs)


# --------------------------------------------------------------------------- UNet
class BasicConvBlock(nn.Module):
    """``num_convs`` 3x3 ``ConvModule``s (the first with the stride)."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int, stride: int, dilation: int,
                 norm_cfg: dict | None):
        super().__init__()
        self.convs = nn.Sequential(*[
            ConvModule(in_channels if i == 0 else out_channels, out_channels, 3, stride=stride if i == 0 else 1,
                       dilation=1 if i == 0 else dilation, padding=1 if i == 0 else dilation, norm_cfg=norm_cfg)
            for i in range(num_convs)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class InterpConv(nn.Module):
    """MMSegmentation's ``InterpConv``: bilinear x2 upsampling, then a 1x1 ``ConvModule``."""

    def __init__(self, in_channels: int, out_channels: int, norm_cfg: dict | None):
        super().__init__()
        self.interp_upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                             ConvModule(in_channels, out_channels, 1, norm_cfg=norm_cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.interp_upsample(x)


class UpConvBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, num_convs: int, dilation: int,
                 norm_cfg: dict | None, upsample: bool):
        super().__init__()
        self.conv_block = BasicConvBlock(2 * skip_channels, out_channels, num_convs, 1, dilation, norm_cfg)
        self.upsample = InterpConv(in_channels, skip_channels, norm_cfg) if upsample else \
            ConvModule(in_channels, skip_channels, 1, norm_cfg=norm_cfg)

    def forward(self, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([skip, self.upsample(x)], dim=1))


class UNet(nn.Module):
    """MMSegmentation's ``UNet``: ``num_stages`` encoder stages of ``base_channels * 2**i``
    (max-pooled where ``downsamples``), decoders with ``InterpConv`` upsampling; the forward
    returns the deepest feature, then each decoder's output (the last at full resolution)."""

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_stages: int = 5,
                 strides: tuple[int, ...] = (1, 1, 1, 1, 1), enc_num_convs: tuple[int, ...] = (2, 2, 2, 2, 2),
                 dec_num_convs: tuple[int, ...] = (2, 2, 2, 2), downsamples: tuple[bool, ...] = (True, True, True, True),
                 enc_dilations: tuple[int, ...] = (1, 1, 1, 1, 1), dec_dilations: tuple[int, ...] = (1, 1, 1, 1),
                 norm_cfg: dict | None = None, upsample_cfg: dict | None = None, norm_eval: bool = False):
        super().__init__()
        norm_cfg = dict(norm_cfg or {"type": "BN", "requires_grad": True})
        self.num_stages, self.strides, self.downsamples = num_stages, tuple(strides), tuple(downsamples)
        self.norm_eval = norm_eval
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        channels = in_channels
        for i in range(num_stages):
            stage: list[nn.Module] = []
            if i != 0:
                if strides[i] == 1 and downsamples[i - 1]:
                    stage.append(nn.MaxPool2d(kernel_size=2))
                upsample = strides[i] != 1 or downsamples[i - 1]
                self.decoder.append(UpConvBlock(base_channels * 2 ** i, base_channels * 2 ** (i - 1),
                                                base_channels * 2 ** (i - 1), dec_num_convs[i - 1], dec_dilations[i - 1],
                                                norm_cfg, upsample))
            stage.append(BasicConvBlock(channels, base_channels * 2 ** i, enc_num_convs[i], strides[i],
                                        enc_dilations[i], norm_cfg))
            self.encoder.append(nn.Sequential(*stage))
            channels = base_channels * 2 ** i

    def downsample_rate(self) -> int:
        rate = 1
        for i in range(1, self.num_stages):
            if self.strides[i] == 2 or self.downsamples[i - 1]:
                rate *= 2
        return rate

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        rate = self.downsample_rate()
        height, width = x.shape[-2:]
        pad_h, pad_w = (-height) % rate, (-width) % rate
        if pad_h or pad_w:  # MMSegmentation asserts divisibility; pad, and crop every output back
            x = F.pad(x, (0, pad_w, 0, pad_h))
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        outs = [x]
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](skips[i], x)
            outs.append(x)
        if pad_h or pad_w:
            full_h, full_w = height + pad_h, width + pad_w
            outs = [o[..., :-(-height * o.shape[-2] // full_h), :-(-width * o.shape[-1] // full_w)] for o in outs]
        return outs

    def train(self, mode: bool = True) -> UNet:
        super().train(mode)
        if mode and self.norm_eval:
            _batch_norms_eval(self)
        return self


BACKBONES: dict[str, Any] = {"ResNet": ResNet, "ResNetV1c": ResNetV1c, "ResNetV1d": ResNetV1d, "UNet": UNet}
