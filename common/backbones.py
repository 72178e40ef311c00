"""Quantized building blocks and backbones shared by the tasks' models.

Every hidden layer is a *unit* ``weight layer -> BatchNorm -> QuantAct``; the QuantAct becomes one IF
neuron in the converted SNN. Units are ``nn.Sequential`` subclasses with named children ``conv`` /
``fc``, ``bn`` and ``act`` so state-dict keys read ``features.3.conv.weight``, ``features.3.act.act_alpha``.

:class:`ResNet` (BasicBlocks, torchvision parameter names) is the classifier family of
:mod:`classification.models` and the backbone of YOLOv2-ResNet34 and DeepLabV3-ResNet34::

    out = act1(bn1(conv1(x)))
    out = act2(bn2(conv2(out)) + shortcut(x))       # the addition comes BEFORE the second QuantAct

with ``shortcut`` the identity or ``downsample = Sequential(conv1x1, BN)`` (option B); every QuantAct is
its own module, called exactly once per forward.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence, Type

import torch
import torch.nn as nn

from quant import QuantAct, QuantConv2d, QuantLinear
from quant.functional import FULL_PRECISION

#: activation / weight bit-widths a model accepts (32 = full precision)
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, FULL_PRECISION)


def check_model_bit(bit, what: str = "bit") -> int:
    """Validate a bit-width (an integer in :data:`VALID_BITS`); raise ``ValueError`` naming the choices."""
    ok = (not isinstance(bit, bool) and isinstance(bit, (int, float)) and float(bit).is_integer()
          and int(bit) in VALID_BITS)
    if not ok:
        raise ValueError(f"{what}={bit!r} is not supported: use one of "
                         f"{', '.join(str(b) for b in VALID_BITS)} (32 = full precision)")
    return int(bit)


class ConvBNAct(nn.Sequential):
    """``conv (no bias) -> BatchNorm2d -> QuantAct``."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, *,
                 bit: int, wbit: int, alpha_init: float, conv_cls: Optional[Type[nn.Conv2d]] = None):
        if conv_cls is None:
            conv = QuantConv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False, wbit=wbit)
        else:
            conv = conv_cls(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        super().__init__(OrderedDict([
            ("conv", conv),
            ("bn", nn.BatchNorm2d(cout)),
            ("act", QuantAct(bit, alpha_init=alpha_init)),
        ]))


class LinearBNAct(nn.Sequential):
    """``linear (no bias) -> BatchNorm1d -> QuantAct``."""

    def __init__(self, fin: int, fout: int, *, bit: int, wbit: int, alpha_init: float):
        super().__init__(OrderedDict([
            ("fc", QuantLinear(fin, fout, bias=False, wbit=wbit)),
            ("bn", nn.BatchNorm1d(fout)),
            ("act", QuantAct(bit, alpha_init=alpha_init)),
        ]))


def init_conv_bn(model: nn.Module):
    """Kaiming-normal (fan_out, ReLU) convolutions, BN weight 1 / bias 0, zero conv biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_linear_normal(model: nn.Module, std: float = 0.01):
    """N(0, std) linear weights, zero biases (AlexNet / VGG)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)



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


__all__ = ["VALID_BITS", "check_model_bit", "ConvBNAct", "LinearBNAct", "init_conv_bn", "init_linear_normal",
           "BasicBlock", "ResNet"]
