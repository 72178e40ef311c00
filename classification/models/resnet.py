"""Residual classifiers: CIFAR-10 ResNet-20/32/44/56/110 and ResNet-18 (TET variant), ImageNet
ResNet-18/34 (spec section 6).

All share :class:`BasicBlock`::

    out = act1(bn1(conv1(x)))
    out = act2(bn2(conv2(out)) + shortcut(x))       # the addition comes BEFORE the second QuantAct

with ``shortcut`` the identity or ``downsample = Sequential(conv1x1, BN)`` (option B). Parameter names
follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0`` / ``.1``, ``fc``);
the activations are ``act1`` (stem), ``layerX.Y.act1`` / ``act2`` -- every QuantAct is its own module,
called exactly once per forward.
"""
from __future__ import annotations

from typing import Optional, Sequence, Type

import torch
import torch.nn as nn

from quant import Conv2d8bit, Linear8bit, QuantAct, QuantConv2d

from .common import init_conv_bn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, bit: int, wbit: int,
                 alpha_init: float, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = QuantConv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False, wbit=wbit)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = QuantAct(bit, alpha_init=alpha_init)
        self.conv2 = QuantConv2d(planes, planes, 3, stride=1, padding=1, bias=False, wbit=wbit)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = QuantAct(bit, alpha_init=alpha_init)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.act2(out + shortcut)


class ResNet(nn.Module):
    """Stem ``conv1 -> bn1 -> act1`` (no max-pool), stages ``layer1..layerN`` of BasicBlocks,
    ``avgpool`` (adaptive, 1x1), ``torch.flatten``, ``fc`` (no activation)."""

    input_size = 224
    ft_bn_mode = "recalibrate"
    ft_weight_decay = 1e-4

    def __init__(self, blocks: Sequence[int], widths: Sequence[int], strides: Sequence[int], *,
                 stem_width: int, stem_kernel: int, stem_stride: int, stem_padding: int,
                 stem_cls: Type[nn.Conv2d], fc_cls: Type[nn.Linear], bit: int, wbit: int,
                 alpha_init: float, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv1 = stem_cls(in_channels, stem_width, stem_kernel, stride=stem_stride,
                              padding=stem_padding, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.act1 = QuantAct(bit, alpha_init=alpha_init)
        inplanes = stem_width
        self.stage_names = []
        for i, (n, planes, stride) in enumerate(zip(blocks, widths, strides)):
            layers = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or inplanes != planes:
                    down = nn.Sequential(
                        QuantConv2d(inplanes, planes, 1, stride=s, bias=False, wbit=wbit),
                        nn.BatchNorm2d(planes))
                layers.append(BasicBlock(inplanes, planes, s, bit=bit, wbit=wbit, alpha_init=alpha_init,
                                         downsample=down))
                inplanes = planes
            name = f"layer{i + 1}"
            setattr(self, name, nn.Sequential(*layers))
            self.stage_names.append(name)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = fc_cls(inplanes, num_classes)
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class CifarResNet(ResNet):
    """He et al. CIFAR ResNet-(6n+2): 8-bit 3x3 stem 16, stages 16/32/64 (s1/s2/s2) with n blocks
    each, option-B downsample, average pool over the final 8x8 map, 8-bit FC 64 -> classes."""

    input_size = 32

    def __init__(self, depth: int, **kw):
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        super().__init__([n, n, n], [16, 32, 64], [1, 2, 2], stem_width=16, stem_kernel=3, stem_stride=1,
                         stem_padding=1, stem_cls=Conv2d8bit, fc_cls=Linear8bit, **kw)
        self.depth = depth
        self.blocks_per_stage = n


class CifarResNet18(ResNet):
    """ResNet-18 of TET for CIFAR: float 3x3 stem 64, stages [3 @128 s1, 3 @256 s2, 2 @512 s2],
    average pool over 8x8, float FC 512 -> classes."""

    input_size = 32

    def __init__(self, **kw):
        super().__init__([3, 3, 2], [128, 256, 512], [1, 2, 2], stem_width=64, stem_kernel=3, stem_stride=1,
                         stem_padding=1, stem_cls=nn.Conv2d, fc_cls=nn.Linear, **kw)


class ImageNetResNet(ResNet):
    """torchvision-named ResNet with BasicBlocks; stem 7x7 stride 4 (padding 3) and NO max-pool, so
    the overall stride stays 32. Float first / last layers."""

    input_size = 224

    def __init__(self, blocks: Sequence[int], **kw):
        super().__init__(blocks, [64, 128, 256, 512], [1, 2, 2, 2], stem_width=64, stem_kernel=7,
                         stem_stride=4, stem_padding=3, stem_cls=nn.Conv2d, fc_cls=nn.Linear, **kw)


__all__ = ["BasicBlock", "ResNet", "CifarResNet", "CifarResNet18", "ImageNetResNet"]
