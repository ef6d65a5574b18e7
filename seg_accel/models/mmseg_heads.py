"""MMSegmentation 0.30's decode heads, with its arguments, defaults and parameter names:
``FCNHead``, ``PSPHead``, ``ASPPHead`` (DeepLabV3), ``DepthwiseSeparableASPPHead``
(DeepLabV3+) and ``UPerHead``. Each reads the backbone's features (``in_index``,
``input_transform``), ends in dropout and the 1x1 classifier ``conv_seg`` and returns logits at
its input's stride; the losses are seg-accel's (``loss_decode``, ``sampler``), applied by the
trainer as MMSegmentation's ``forward_train`` applies them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from seg_accel.models.mmseg_backbones import ConvModule, DepthwiseSeparableConvModule


def resize(x: torch.Tensor, size: Any, align_corners: bool) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


class BaseDecodeHead(nn.Module):
    """What every head shares: which features it reads, dropout and ``conv_seg``."""

    def __init__(self, in_channels: int | list[int], channels: int, num_classes: int, dropout_ratio: float = 0.1,
                 norm_cfg: dict | None = None, in_index: int | list[int] = -1, input_transform: str | None = None,
                 align_corners: bool = False):
        super().__init__()
        if input_transform is None and isinstance(in_channels, (list, tuple)) != isinstance(in_index, (list, tuple)):
            raise ValueError("in_channels and in_index must both be one number (input_transform: null) or lists")
        if input_transform is not None and (not isinstance(in_channels, (list, tuple)) or
                                            len(in_channels) != len(in_index)):
            raise ValueError(f"input_transform {input_transform} needs lists in_channels and in_index of one length")
        self.in_channels = sum(in_channels) if input_transform == "resize_concat" else in_channels
        self.channels, self.num_classes, self.norm_cfg = channels, num_classes, norm_cfg
        self.in_index, self.input_transform, self.align_corners = in_index, input_transform, align_corners
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else None
        nn.init.normal_(self.conv_seg.weight, 0, 0.01)  # MMSegmentation's init of conv_seg
        nn.init.zeros_(self.conv_seg.bias)

    def _transform_inputs(self, inputs: list[torch.Tensor]) -> Any:
        if self.input_transform == "resize_concat":
            picked = [inputs[i] for i in self.in_index]
            return torch.cat([resize(x, picked[0].shape[2:], self.align_corners) for x in picked], dim=1)
        if self.input_transform == "multiple_select":
            return [inputs[i] for i in self.in_index]
        return inputs[self.in_index]

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(feat) if self.dropout is not None else feat)


class FCNHead(BaseDecodeHead):
    def __init__(self, num_convs: int = 2, kernel_size: int = 3, concat_input: bool = True, dilation: int = 1,
                 **kwargs: Any):
        super().__init__(**kwargs)
        if num_convs == 0 and self.in_channels != self.channels:
            raise ValueError(f"num_convs: 0 passes the feature through, so channels must be in_channels "
                             f"({self.in_channels}), got {self.channels}")
        padding = kernel_size // 2 * dilation
        convs = [ConvModule(self.in_channels if i == 0 else self.channels, self.channels, kernel_size,
                            padding=padding, dilation=dilation, norm_cfg=self.norm_cfg) for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        self.concat_input = concat_input
        if concat_input:
            self.conv_cat = ConvModule(self.in_channels + self.channels, self.channels, kernel_size,
                                       padding=kernel_size // 2, norm_cfg=self.norm_cfg)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = self._transform_inputs(inputs)
        feats = self.convs(x)
        if self.concat_input:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return self.cls_seg(feats)


class PPM(nn.ModuleList):
    """Pooling pyramid: per scale, adaptive average pooling and a 1x1 ``ConvModule``, upsampled back."""

    def __init__(self, pool_scales: tuple[int, ...], in_channels: int, channels: int, norm_cfg: dict | None,
                 align_corners: bool):
        super().__init__([nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvModule(in_channels, channels, 1,
                                                                                norm_cfg=norm_cfg))
                          for scale in pool_scales])
        self.align_corners = align_corners

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(module(x), x.shape[2:], self.align_corners) for module in self]


class PSPHead(BaseDecodeHead):
    def __init__(self, pool_scales: tuple[int, ...] = (1, 2, 3, 6), **kwargs: Any):
        super().__init__(**kwargs)
        self.psp_modules = PPM(tuple(pool_scales), self.in_channels, self.channels, self.norm_cfg, self.align_corners)
        self.bottleneck = ConvModule(self.in_channels + len(pool_scales) * self.channels, self.channels, 3,
                                     padding=1, norm_cfg=self.norm_cfg)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = self._transform_inputs(inputs)
        return self.cls_seg(self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1)))


class ASPPHead(BaseDecodeHead):
    def __init__(self, dilations: tuple[int, ...] = (1, 6, 12, 18), **kwargs: Any):
        super().__init__(**kwargs)
        self.dilations = tuple(dilations)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                        ConvModule(self.in_channels, self.channels, 1, norm_cfg=self.norm_cfg))
        self.aspp_modules = nn.ModuleList([
            ConvModule(self.in_channels, self.channels, 1 if d == 1 else 3, dilation=d, padding=0 if d == 1 else d,
                       norm_cfg=self.norm_cfg) for d in self.dilations])
        self.bottleneck = ConvModule((len(self.dilations) + 1) * self.channels, self.channels, 3, padding=1,
                                     norm_cfg=self.norm_cfg)

    def _aspp(self, x: torch.Tensor) -> torch.Tensor:
        outs = [resize(self.image_pool(x), x.shape[2:], self.align_corners)]
        outs += [module(x) for module in self.aspp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self._aspp(self._transform_inputs(inputs)))


class DepthwiseSeparableASPPHead(ASPPHead):
    """DeepLabV3+: ASPP with depthwise-separable dilated branches, fused with a low-level
    feature (``inputs[0]`` through ``c1_bottleneck``) and two separable 3x3 convolutions."""

    def __init__(self, c1_in_channels: int, c1_channels: int, **kwargs: Any):
        super().__init__(**kwargs)
        for i, d in enumerate(self.dilations):
            if d > 1:
                self.aspp_modules[i] = DepthwiseSeparableConvModule(self.in_channels, self.channels, 3, dilation=d,
                                                                    padding=d, norm_cfg=self.norm_cfg)
        self.c1_bottleneck = ConvModule(c1_in_channels, c1_channels, 1, norm_cfg=self.norm_cfg) \
            if c1_in_channels > 0 else None
        self.sep_bottleneck = nn.Sequential(
            DepthwiseSeparableConvModule(self.channels + c1_channels, self.channels, 3, padding=1,
                                         norm_cfg=self.norm_cfg),
            DepthwiseSeparableConvModule(self.channels, self.channels, 3, padding=1, norm_cfg=self.norm_cfg))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        output = self._aspp(self._transform_inputs(inputs))
        if self.c1_bottleneck is not None:
            c1 = self.c1_bottleneck(inputs[0])
            output = torch.cat([resize(output, c1.shape[2:], self.align_corners), c1], dim=1)
        return self.cls_seg(self.sep_bottleneck(output))


class UPerHead(BaseDecodeHead):
    """UPerNet: a pooling pyramid on the last feature and an FPN over all of them, fused."""

    def __init__(self, pool_scales: tuple[int, ...] = (1, 2, 3, 6), **kwargs: Any):
        super().__init__(input_transform=kwargs.pop("input_transform", "multiple_select"), **kwargs)
        in_channels = list(self.in_channels)
        self.psp_modules = PPM(tuple(pool_scales), in_channels[-1], self.channels, self.norm_cfg, self.align_corners)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * self.channels, self.channels, 3, padding=1,
                                     norm_cfg=self.norm_cfg)
        self.lateral_convs = nn.ModuleList([ConvModule(c, self.channels, 1, norm_cfg=self.norm_cfg, inplace=False)
                                            for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(self.channels, self.channels, 3, padding=1, norm_cfg=self.norm_cfg,
                                                   inplace=False) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(in_channels) * self.channels, self.channels, 3, padding=1,
                                         norm_cfg=self.norm_cfg)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        inputs = self._transform_inputs(inputs)
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        last = inputs[-1]
        laterals.append(self.bottleneck(torch.cat([last, *self.psp_modules(last)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:], self.align_corners)
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)] + [laterals[-1]]
        outs = [outs[0]] + [resize(o, outs[0].shape[2:], self.align_corners) for o in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(torch.cat(outs, dim=1)))


HEADS: dict[str, type[BaseDecodeHead]] = {"FCNHead": FCNHead, "PSPHead": PSPHead, "ASPPHead": ASPPHead,
                                          "DepthwiseSeparableASPPHead": DepthwiseSeparableASPPHead,
                                          "UPerHead": UPerHead}
