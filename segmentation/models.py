"""Segmentation models of Fast-SNN, with quantized activations.

* ``deeplabv1_vgg9`` -- the original's MYVGG9 ("DeepLabv1" LargeFOV on a 9-layer VGG): eight
  conv3x3 + BN + QuantAct units ``features.0 .. features.7``

      3->64 (s1), 64->64 (s2), 64->128 (s1), 128->128 (s2), 128->256 (s2),
      256->256 (dil 2), 256->256 (dil 2), 256->1024 (dil 12, LargeFOV)

  (convs with bias), the 1x1 classifier ``classifier`` 1024 -> classes (no BN, no activation: the
  SNN's non-spiking accumulator) and the bilinear x8 upsampling of the logits (``align_corners``;
  output size = in * 8 - 7: 65 -> 513). Output stride 8. ``fov_dilation`` sets the LargeFOV layer's
  dilation: its taps lie 12 grid cells apart, so on a small input (a 9 x 9 grid at 65 pixels) all but
  the centre one read the zero padding and the layer acts as a 1 x 1 convolution; 1 or 2 suit such inputs.
* ``deeplabv3_r34`` -- MYResNet: the ImageNet ResNet-34 of this project (``conv1`` 7x7 stride 4, no
  max-pool, :class:`common.backbones.BasicBlock`) with stage strides [1, 2, 2, 1] (output stride
  16, no dilation in the backbone); ASPP ``aspp.0 .. aspp.4`` (1x1 and 3x3 at dilations 6, 12, 18, 24,
  512 -> 256 each, BN + QuantAct, no image pooling), channel concat (1280), ``project`` 1x1 -> 256,
  ``head0`` 3x3 256 -> 256, ``head1`` 1x1 -> classes (accumulator), bilinear x16 (33 -> 513).

Hidden weights are float, activations ``bit``-bit (32 = ReLU); the first and last layers
are plain float convs. Parameter names of the ResNet backbone are torchvision's (``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.downsample.0`` ...), so ImageNet / torchvision ResNet-34 weights load
into it by name (``--init`` backbone mode). ``width`` multiplies every hidden channel count (1.0 = the
paper's nets; smaller for CPU runs). The upsampling is part of ``forward``; in the converted SNN it
runs once, after the time average of the classifier's output.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.backbones import BasicBlock, check_model_bit, init_conv_bn
from quant import QuantAct, QuantConv2d
from quant.functional import FULL_PRECISION

MODELS = ("deeplabv1_vgg9", "deeplabv3_r34")
#: output stride of each model: valid crop / test sizes are ``k * stride + 1``
OUTPUT_STRIDE = {"deeplabv1_vgg9": 8, "deeplabv3_r34": 16}
ALPHA_INIT = 6.0
#: dilation of VGG-9's LargeFOV layer ``features.7`` (the paper's, for 513-pixel inputs)
FOV_DILATION = 12


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, at least 1."""
    return max(1, int(round(channels * width)))


def upsample_logits(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear ``align_corners`` upsampling from ``h`` to ``h * factor - (factor - 1)`` (the
    DeepLab output size: the corners of the input and output grids coincide)."""
    h, w = x.size(2), x.size(3)
    return F.interpolate(x, size=(h * factor - (factor - 1), w * factor - (factor - 1)), mode="bilinear",
                         align_corners=True)


class ConvBNAct(nn.Sequential):
    """``conv -> BatchNorm2d -> QuantAct`` with named children ``conv``, ``bn``, ``act``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1, *,
                 bit: int, alpha_init: float, bias: bool, first: bool = False):
        pad = dilation * (kernel - 1) // 2
        if first:  # the analog-input layer: a plain float conv
            conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=bias)
        else:
            conv = QuantConv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=bias,
                               wbit=FULL_PRECISION)
        super().__init__(OrderedDict([("conv", conv), ("bn", nn.BatchNorm2d(cout)),
                                      ("act", QuantAct(bit, alpha_init=alpha_init))]))


def init_classifier(conv: nn.Conv2d, std: float = 0.01):
    """The per-pixel classifier starts small (N(0, 0.01), zero bias) -- near-uniform class scores, as
    segmentation heads are usually initialised; Kaiming here would start with logits of several units."""
    nn.init.normal_(conv.weight, 0.0, std)
    nn.init.zeros_(conv.bias)


class SegmentationModel(nn.Module):
    """Common attributes: ``name``, ``bit``, ``num_classes``, ``width``, ``output_stride``,
    ``backbone_prefixes`` (the keys an ImageNet backbone can initialise) and the fine-tuner's
    ``ft_bn_mode`` / ``ft_weight_decay``."""

    ft_bn_mode = "recalibrate"
    ft_weight_decay = 1e-4
    backbone_prefixes: Sequence[str] = ()
    output_stride = 8
    fov_dilation: Optional[int] = None   # VGG-9's LargeFOV dilation; None: no such layer


class DeepLabV1VGG9(SegmentationModel):
    #: (out channels, stride, dilation) of features.0 .. features.7
    CFG = ((64, 1, 1), (64, 2, 1), (128, 1, 1), (128, 2, 1), (256, 2, 1), (256, 1, 2), (256, 1, 2),
           (1024, 1, 12))
    output_stride = 8
    backbone_prefixes = ("features.",)

    def __init__(self, num_classes: int, *, bit: int = FULL_PRECISION, width: float = 1.0,
                 alpha_init: float = ALPHA_INIT, in_channels: int = 3, fov_dilation: int = FOV_DILATION):
        super().__init__()
        self.fov_dilation = fov_dilation
        layers, cin = [], in_channels
        for i, (c, s, d) in enumerate(self.CFG):
            d = fov_dilation if i == len(self.CFG) - 1 else d
            cout = scaled(c, width)
            layers.append(ConvBNAct(cin, cout, 3, s, d, bit=bit, alpha_init=alpha_init, bias=True, first=i == 0))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Conv2d(cin, num_classes, 1)
        init_conv_bn(self)
        init_classifier(self.classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_logits(self.classifier(self.features(x)), 8)


class DeepLabV3ResNet34(SegmentationModel):
    BLOCKS = (3, 4, 6, 3)
    WIDTHS = (64, 128, 256, 512)
    STRIDES = (1, 2, 2, 1)
    DILATIONS = (6, 12, 18, 24)
    output_stride = 16
    backbone_prefixes = ("conv1.", "bn1.", "act1.", "layer1.", "layer2.", "layer3.", "layer4.")

    def __init__(self, num_classes: int, *, bit: int = FULL_PRECISION, width: float = 1.0,
                 alpha_init: float = ALPHA_INIT, in_channels: int = 3):
        super().__init__()
        kw = dict(bit=bit, wbit=FULL_PRECISION, alpha_init=alpha_init)
        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=4, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act1 = QuantAct(bit, alpha_init=alpha_init)
        inplanes = stem
        for i, (n, planes, stride) in enumerate(zip(self.BLOCKS, self.WIDTHS, self.STRIDES)):
            planes = scaled(planes, width)
            blocks = []
            for j in range(n):
                s = stride if j == 0 else 1
                down = None
                if s != 1 or inplanes != planes:
                    down = nn.Sequential(QuantConv2d(inplanes, planes, 1, stride=s, bias=False, wbit=FULL_PRECISION),
                                         nn.BatchNorm2d(planes))
                blocks.append(BasicBlock(inplanes, planes, s, downsample=down, **kw))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        mid = scaled(256, width)
        branches = [ConvBNAct(inplanes, mid, 1, bit=bit, alpha_init=alpha_init, bias=False)]
        branches += [ConvBNAct(inplanes, mid, 3, dilation=d, bit=bit, alpha_init=alpha_init, bias=False)
                     for d in self.DILATIONS]
        self.aspp = nn.ModuleList(branches)
        self.project = ConvBNAct(mid * len(branches), mid, 1, bit=bit, alpha_init=alpha_init, bias=False)
        self.head0 = ConvBNAct(mid, mid, 3, bit=bit, alpha_init=alpha_init, bias=False)
        self.head1 = nn.Conv2d(mid, num_classes, 1)
        init_conv_bn(self)
        init_classifier(self.head1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.cat([branch(x) for branch in self.aspp], 1)
        x = self.head1(self.head0(self.project(x)))
        return upsample_logits(x, 16)


_BUILDERS = {"deeplabv1_vgg9": DeepLabV1VGG9, "deeplabv3_r34": DeepLabV3ResNet34}
assert tuple(_BUILDERS) == MODELS


def get_model(name: str, num_classes: int, bit: int = FULL_PRECISION, *, width: float = 1.0,
              alpha_init: Optional[float] = None, in_channels: int = 3,
              fov_dilation: Optional[int] = None) -> SegmentationModel:
    """Build ``name`` (one of :data:`MODELS`) for ``num_classes`` classes (background included) with
    ``bit``-bit activations; ``fov_dilation``: VGG-9's LargeFOV dilation (default 12; small inputs want
    less, see :class:`DeepLabV1VGG9`). Raises ``ValueError`` for bad arguments."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")
    bit = check_model_bit(bit, "bit")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes={num_classes!r}: a segmenter needs background and at least one class")
    if not (float(width) > 0):
        raise ValueError(f"width={width!r} must be positive")
    kw = {}
    if fov_dilation is not None:
        if name != "deeplabv1_vgg9":
            raise ValueError(f"fov_dilation={fov_dilation!r}: only deeplabv1_vgg9 has a LargeFOV layer")
        if int(fov_dilation) != fov_dilation or int(fov_dilation) < 1:
            raise ValueError(f"fov_dilation={fov_dilation!r} must be a positive integer")
        kw["fov_dilation"] = int(fov_dilation)
    model = _BUILDERS[name](int(num_classes), bit=bit, width=float(width),
                            alpha_init=float(ALPHA_INIT if alpha_init is None else alpha_init),
                            in_channels=int(in_channels), **kw)
    model.name, model.arch, model.bit, model.num_classes, model.width = name, name, bit, int(num_classes), float(width)
    model.wbit = FULL_PRECISION
    return model


def classifier_weight_key(name: str) -> str:
    """State-dict key of the last (accumulator) layer's weight: its first dim is the class count."""
    return "classifier.weight" if name == "deeplabv1_vgg9" else "head1.weight"


__all__ = ["MODELS", "OUTPUT_STRIDE", "DeepLabV1VGG9", "DeepLabV3ResNet34", "SegmentationModel", "get_model",
           "upsample_logits", "classifier_weight_key", "scaled"]
