"""Building blocks shared by the classification models.

Every hidden layer is a *unit* ``weight layer -> BatchNorm -> QuantAct``; the QuantAct becomes one IF
neuron in the converted SNN. Units are ``nn.Sequential`` subclasses with named children ``conv`` /
``fc``, ``bn`` and ``act`` so state-dict keys read ``features.3.conv.weight``, ``features.3.act.act_alpha``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Type

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


__all__ = ["VALID_BITS", "check_model_bit", "ConvBNAct", "LinearBNAct", "init_conv_bn", "init_linear_normal"]
