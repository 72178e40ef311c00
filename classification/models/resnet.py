"""Residual classifiers: CIFAR-10 ResNet-20/32/44/56/110 and ResNet-18 (TET variant), ImageNet
ResNet-18/34, all :class:`common.backbones.ResNet` (BasicBlocks, the addition before the second
QuantAct). Parameter names follow torchvision (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0`` / ``.1``, ``fc``); the activations are ``act1`` (stem), ``layerX.Y.act1`` / ``act2``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn

from common.backbones import BasicBlock, ResNet
from quant import Conv2d8bit, Linear8bit


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
