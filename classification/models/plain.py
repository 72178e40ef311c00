"""Plain (non-residual) CNN classifiers: CIFAR-10 AlexNet / VGG11, ImageNet AlexNet / VGG16 / VGG11.

No max-pooling anywhere: down-sampling is done by stride-2 convolutions. Every hidden
conv / linear is followed by BatchNorm and a ``QuantAct`` (one IF neuron after conversion); the first
conv and the classifier use 8-bit weights (``Conv2d8bit`` / ``Linear8bit``); the classifier has no
activation.

Layout (state-dict keys)::

    features.<i>.{conv,bn,act}     conv units, i = 0 .. n_conv-1   (features.0.conv is Conv2d8bit)
    classifier.<j>.{fc,bn,act}     hidden linear units
    classifier.<last>              Linear8bit, the non-spiking read-out

``forward``: ``features -> torch.flatten(x, 1) -> classifier``. ``flatten_id`` is the 0-based index,
in the list of weight layers, of the first layer after the flatten (= ``len(features)``; the
original's 1-based ``flatten_id`` is this + 1, e.g. 14 for VGG16). Hidden layers have no bias (BN
follows); the classifier has one.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from common.backbones import ConvBNAct, LinearBNAct, init_conv_bn, init_linear_normal
from quant import Conv2d8bit, Linear8bit

ConvSpec = Tuple[int, int, int, int]  # (out_channels, kernel, stride, padding)


class PlainNet(nn.Module):
    """Conv units -> flatten -> hidden linear units -> 8-bit classifier."""

    input_size = 32
    ft_bn_mode = "recalibrate"
    ft_weight_decay = 1e-4

    def __init__(self, convs: Sequence[ConvSpec], flat_hw: int, hidden: Sequence[int], *, bit: int,
                 wbit: int, alpha_init: float, num_classes: int, in_channels: int = 3):
        super().__init__()
        layers: List[nn.Module] = []
        cin = in_channels
        for i, (cout, k, s, p) in enumerate(convs):
            layers.append(ConvBNAct(cin, cout, k, s, p, bit=bit, wbit=wbit, alpha_init=alpha_init,
                                    conv_cls=Conv2d8bit if i == 0 else None))
            cin = cout
        self.features = nn.Sequential(*layers)
        fin = cin * flat_hw * flat_hw
        head: List[nn.Module] = []
        for fout in hidden:
            head.append(LinearBNAct(fin, fout, bit=bit, wbit=wbit, alpha_init=alpha_init))
            fin = fout
        head.append(Linear8bit(fin, num_classes))
        self.classifier = nn.Sequential(*head)
        self.flatten_id = len(self.features)
        self.flat_features = cin * flat_hw * flat_hw
        init_conv_bn(self)
        init_linear_normal(self, 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# ------------------------------------------------------------------------------------------ CIFAR
class CifarAlexNet(PlainNet):
    """CIFAR-10 AlexNet: 5 convs (96, 256/s2, 384/s2, 384, 256/s2) -> 4x4x256 -> FC 2048 -> FC 10."""

    input_size = 32
    ft_bn_mode = "frozen"
    ft_weight_decay = 5e-4

    def __init__(self, **kw):
        convs = [(96, 3, 1, 1), (256, 3, 2, 1), (384, 3, 2, 1), (384, 3, 1, 1), (256, 3, 2, 1)]
        super().__init__(convs, 4, [2048], **kw)


class CifarVGG11(PlainNet):
    """CIFAR-10 VGG11: 64, 128/s2, 256, 256/s2, 512, 512/s2, 512, 512/s2 -> 2x2x512 -> 4096 -> 4096 -> 10."""

    input_size = 32
    ft_bn_mode = "frozen"
    ft_weight_decay = 5e-4

    def __init__(self, **kw):
        convs = [(64, 3, 1, 1), (128, 3, 2, 1), (256, 3, 1, 1), (256, 3, 2, 1),
                 (512, 3, 1, 1), (512, 3, 2, 1), (512, 3, 1, 1), (512, 3, 2, 1)]
        super().__init__(convs, 2, [4096, 4096], **kw)


# --------------------------------------------------------------------------------------- ImageNet
class ImageNetAlexNet(PlainNet):
    """ImageNet AlexNet: 11x11/s4 64, 5x5/s2 192, 3x3/s2 384, 3x3 256, 3x3/s2 256 -> 6x6x256 -> 4096 -> 4096 -> 1000."""

    input_size = 224

    def __init__(self, **kw):
        convs = [(64, 11, 4, 2), (192, 5, 2, 1), (384, 3, 2, 0), (256, 3, 1, 1), (256, 3, 2, 0)]
        super().__init__(convs, 6, [4096, 4096], **kw)


def _vgg_stages(stages: Sequence[Sequence[int]]) -> List[ConvSpec]:
    """3x3 convs; the last conv of every stage has stride 2 (in place of a max-pool)."""
    out = []
    for stage in stages:
        for j, c in enumerate(stage):
            out.append((c, 3, 2 if j == len(stage) - 1 else 1, 1))
    return out


class ImageNetVGG(PlainNet):
    """ImageNet VGG: stride-2 last conv per stage (224 -> 7), 7x7x512 -> 4096 -> 4096 -> 1000."""

    input_size = 224

    def __init__(self, stages: Sequence[Sequence[int]], **kw):
        super().__init__(_vgg_stages(stages), 7, [4096, 4096], **kw)


class ImageNetVGG16(ImageNetVGG):
    def __init__(self, **kw):
        super().__init__([[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]], **kw)


class ImageNetVGG11(ImageNetVGG):
    def __init__(self, **kw):
        super().__init__([[64], [128], [256, 256], [512, 512], [512, 512]], **kw)


__all__ = ["PlainNet", "CifarAlexNet", "CifarVGG11", "ImageNetAlexNet", "ImageNetVGG", "ImageNetVGG16",
           "ImageNetVGG11"]
