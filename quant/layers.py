"""Quantized layers: activation (``QuantAct``), weights (``QuantConv2d`` / ``QuantLinear``) and the
8-bit first / last layers (``Conv2d8bit`` / ``Linear8bit``).

Parameter names are fixed because checkpoints and the SNN converter rely on them:
``act_alpha`` (activation clip = the SNN threshold) and ``wgt_alpha`` (weight clip).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import (FULL_PRECISION, act_quant, check_bit, default_weight_mode, num_levels,
                         weight_quant_8bit)

ACT_ALPHA = "act_alpha"
WGT_ALPHA = "wgt_alpha"
QUANTIZER_PARAMS = (ACT_ALPHA, WGT_ALPHA)

DEFAULT_ACT_ALPHA = 6.0
DEFAULT_WGT_ALPHA = 3.0


class QuantAct(nn.Module):
    """Uniform ``bit``-bit quantized ReLU with one learnable clip ``act_alpha`` (bit 32: ReLU).

    In the converted SNN this module becomes an IF neuron with threshold ``act_alpha`` and
    ``T = 2**bit - 1`` steps.
    """

    def __init__(self, bit: int = FULL_PRECISION, alpha_init: float = DEFAULT_ACT_ALPHA):
        super().__init__()
        self.bit = check_bit(bit, what="activation bit")
        self.alpha_init = float(alpha_init)
        if self.bit < FULL_PRECISION:
            self.act_alpha = nn.Parameter(torch.tensor(self.alpha_init))
        else:
            self.register_parameter(ACT_ALPHA, None)

    @property
    def quantized(self) -> bool:
        return self.bit < FULL_PRECISION

    @property
    def levels(self) -> int:
        return num_levels(self.bit)

    def reset_quantizer(self):
        if self.act_alpha is not None:
            with torch.no_grad():
                self.act_alpha.fill_(self.alpha_init)

    def forward(self, x):
        if self.act_alpha is not None:
            from .fused import act_quant_fused  # one-pass native kernels, same values (quant/fused.py)
            return act_quant_fused(x, self.act_alpha, self.levels)
        return act_quant(x, self.act_alpha, self.bit)

    def extra_repr(self):
        return f"bit={self.bit}" + (f", alpha_init={self.alpha_init}" if self.quantized else "")


class _WeightQuantMixin:
    """Shared weight-quantizer state of QuantConv2d / QuantLinear."""

    def _init_wq(self, wbit, wmode, alpha_init):
        self.wbit = check_bit(wbit, what="weight bit")
        self.wmode = (wmode or default_weight_mode(self.wbit)) if self.wbit < FULL_PRECISION else None
        self.wgt_alpha_init = float(alpha_init)
        if self.wbit < FULL_PRECISION:
            self.wgt_alpha = nn.Parameter(torch.tensor(self.wgt_alpha_init))
        else:
            self.register_parameter(WGT_ALPHA, None)

    def reset_quantizer(self):
        if self.wgt_alpha is not None:
            with torch.no_grad():
                self.wgt_alpha.fill_(self.wgt_alpha_init)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as used in the forward pass (float weights when ``wbit == 32``)."""
        from .fused import weight_quant_fused  # native kernels, same values as weight_quant (quant/fused.py)
        return weight_quant_fused(self.weight, self.wgt_alpha, self.wbit, self.wmode)

    def _wq_repr(self):
        return f", wbit={self.wbit}" + (f", wmode={self.wmode}" if self.wmode else "")


def centre_taps(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor):
    """``(weight, padding, dilation)`` of the same convolution without the taps that read only padding,
    or None when every tap can read the input.

    A "same"-padded conv (odd kernel ``k``, zero padding ``d * (k - 1) / 2``) whose dilation ``d`` is at
    least the input's extent along a dimension reads zeros with every off-centre tap of that dimension:
    DeepLab's dilation-12 LargeFOV layer on a 9 x 9 grid, ASPP's branches on small inputs. Dropping them
    gives the same sums with a fraction of the work; the dropped taps' gradients are zero either way.
    """
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or x.dim() != 4:
        return None
    w, pad, dil, cut = weight, list(conv.padding), list(conv.dilation), False
    for d in (0, 1):
        k = weight.shape[2 + d]
        if k > 1 and k % 2 == 1 and pad[d] == dil[d] * (k - 1) // 2 and dil[d] >= x.shape[2 + d]:
            w = w.narrow(2 + d, k // 2, 1)
            pad[d], dil[d], cut = 0, 1, True
    return (w, tuple(pad), tuple(dil)) if cut else None


class QuantConv2d(_WeightQuantMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight is quantized to ``wbit`` bits (APoT / ternary / uniform).

    While training, taps that read only padding are skipped (:func:`centre_taps`: the same sums, up to
    the gradients' float rounding); evaluation runs the plain convolution, as the converted SNN and the
    optimised networks do, so that they round alike.
    """

    def __init__(self, *args, wbit: int = FULL_PRECISION, wmode: str | None = None,
                 wgt_alpha_init: float = DEFAULT_WGT_ALPHA, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_wq(wbit, wmode, wgt_alpha_init)

    def forward(self, x):
        w = self.quantized_weight()
        if self.training and torch.is_grad_enabled():
            cut = centre_taps(self, x, w)
            if cut is not None:
                return F.conv2d(x, cut[0], self.bias, self.stride, cut[1], cut[2], self.groups)
        return self._conv_forward(x, w, self.bias)

    def extra_repr(self):
        return super().extra_repr() + self._wq_repr()


class QuantLinear(_WeightQuantMixin, nn.Linear):
    """``nn.Linear`` whose weight is quantized to ``wbit`` bits."""

    def __init__(self, *args, wbit: int = FULL_PRECISION, wmode: str | None = None,
                 wgt_alpha_init: float = DEFAULT_WGT_ALPHA, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_wq(wbit, wmode, wgt_alpha_init)

    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self):
        return super().extra_repr() + self._wq_repr()


class Conv2d8bit(nn.Conv2d):
    """First layer: 8-bit weights scaled by ``max|w|`` (no learnable clip)."""

    wbit = 8

    def quantized_weight(self):
        return weight_quant_8bit(self.weight)

    def forward(self, x):
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class Linear8bit(nn.Linear):
    """Last layer (classifier): 8-bit weights scaled by ``max|w|``."""

    wbit = 8

    def quantized_weight(self):
        return weight_quant_8bit(self.weight)

    def forward(self, x):
        return F.linear(x, self.quantized_weight(), self.bias)


WEIGHT_LAYERS = (QuantConv2d, QuantLinear, Conv2d8bit, Linear8bit)


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a conv / linear module actually multiplies with (quantized where it is)."""
    if hasattr(module, "quantized_weight"):
        return module.quantized_weight()
    return module.weight
