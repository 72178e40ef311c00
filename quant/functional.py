"""Quantization functions of Fast-SNN, written as fused autograd functions.

Activations: uniform b-bit quantized ReLU with a learnable clip ``alpha``::

    u = clamp(x / alpha, 0, 1);  q = floor(u * n + 1/2) / n;  out = alpha * q,   n = 2**b - 1

Rounding is *round-half-up* (``floor(x + 0.5)``), the same rule as the integrate-and-fire neuron's
firing test ``V >= theta`` with ``V0 = theta / 2``, so the converted first layer is bit-exact.

Weights: per-layer standardisation, learnable clip ``alpha_w``, projection onto a signed level set
(APoT for b >= 3, ternary for b = 2, or uniform), straight-through estimator. First / last layers use
8-bit weights scaled by ``max|w|``.
"""
from __future__ import annotations

import functools
import itertools

import torch

FULL_PRECISION = 32


def num_levels(bit: int) -> int:
    """Number of non-zero activation levels, ``2**bit - 1`` (= the SNN's T)."""
    return 2 ** int(bit) - 1


def check_bit(bit: int, *, allow=(2, 3, 4, 5, 6, 7, 8, FULL_PRECISION), what: str = "bit") -> int:
    if int(bit) != bit or int(bit) not in allow:
        raise ValueError(f"{what}={bit} is not supported: use one of {sorted(allow)} (32 = full precision)")
    return int(bit)


# ----------------------------------------------------------------------------------------------
# activation quantizer
# ----------------------------------------------------------------------------------------------
def round_half_up(x: torch.Tensor) -> torch.Tensor:
    """``floor(x + 0.5)``: rounds exact halves up (torch.round rounds them to even)."""
    return torch.floor(x + 0.5)


def act_levels(x: torch.Tensor, alpha: torch.Tensor, n: int) -> torch.Tensor:
    """Integer level index ``clip(floor(n*x/alpha + 1/2), 0, n)`` of an ``n``-level quantizer.

    This exact expression (same operations, same order) is what the IF neuron's closed form uses
    for a constant input current, which makes the first spiking layer bit-identical to the ANN.
    """
    return round_half_up(torch.clamp(x / alpha, 0.0, 1.0) * n)


class _ActQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, n):
        level = act_levels(x, alpha, n)
        out = level * (alpha / n)
        ctx.save_for_backward(x, alpha, level)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, g):
        x, alpha, level = ctx.saved_tensors
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_x = g * ((x >= 0) & (x <= alpha)).to(g.dtype)
        if ctx.needs_input_grad[1]:
            y = torch.clamp(x, min=0.0)
            # d out / d alpha: 1 above the clip, q - y/alpha inside (0 for negative inputs)
            d = torch.where(y > alpha, torch.ones_like(y), level / ctx.n - y / alpha)
            grad_alpha = (g * d).sum().reshape(alpha.shape)
        return grad_x, grad_alpha, None


def act_quant_levels(x: torch.Tensor, alpha: torch.Tensor, n: int) -> torch.Tensor:
    """Quantized ReLU onto ``{0, alpha/n, ..., alpha}`` (``n = T`` levels) with the STE gradients."""
    return _ActQuant.apply(x, alpha, int(n))


def act_quant(x: torch.Tensor, alpha: torch.Tensor, bit: int) -> torch.Tensor:
    """Uniform b-bit quantized ReLU with learnable clip ``alpha`` (bit 32: plain ReLU)."""
    if bit >= FULL_PRECISION:
        return torch.relu(x)
    return _ActQuant.apply(x, alpha, num_levels(bit))


# ----------------------------------------------------------------------------------------------
# weight level sets
# ----------------------------------------------------------------------------------------------
def _apot_exponent_slots(magnitude_bits: int):
    """Distribute the power-of-two exponents 1, 2, ... over the additive terms.

    ``magnitude_bits`` B is split into 2-bit terms (3 non-zero choices each) plus, for odd B, one
    1-bit term (1 non-zero choice). Exponents are dealt round-robin over the terms; for odd B the
    1-bit term joins from the second round on. B=2, 3, 4 reproduce the APoT level sets of the
    paper (e.g. B=3 -> {0,.1,.2,.3,.4,.6,.8,1}); larger B is this project's generalisation.
    """
    n2, odd = divmod(magnitude_bits, 2)
    capacity = [3] * n2 + ([1] if odd else [])
    slots = [[] for _ in capacity]
    exponent = 1
    round_index = 0
    while any(len(s) < c for s, c in zip(slots, capacity)):
        for j, (s, c) in enumerate(zip(slots, capacity)):
            if odd and j == len(capacity) - 1 and round_index == 0:
                continue  # the 1-bit term joins from the second round
            if len(s) < c:
                s.append(exponent)
                exponent += 1
        round_index += 1
    return slots


@functools.lru_cache(maxsize=None)
def _level_list(bit: int, mode: str):
    if mode == "ternary":
        mags = [0.0, 1.0]
    elif mode == "uniform":
        m = 2 ** (bit - 1) - 1
        mags = [i / m for i in range(m + 1)]
    elif mode == "apot":
        terms = [[0.0] + [2.0 ** -e for e in s] for s in _apot_exponent_slots(bit - 1)]
        sums = sorted({sum(c) for c in itertools.product(*terms)})
        top = sums[-1]
        mags = [v / top for v in sums]
    else:
        raise ValueError(f"unknown weight quantization mode {mode!r}: use 'apot', 'uniform' or 'ternary'")
    return tuple(mags)


def default_weight_mode(bit: int) -> str:
    """The original's choice: ternary at 2 bits, APoT from 3 bits."""
    return "ternary" if bit == 2 else "apot"


def weight_magnitudes(bit: int, mode: str | None = None) -> torch.Tensor:
    """Sorted non-negative magnitudes (largest = 1) of a signed ``bit``-bit weight level set."""
    bit = check_bit(bit, allow=tuple(range(2, 9)), what="weight bit")
    mode = mode or default_weight_mode(bit)
    if mode == "apot" and bit < 3:
        raise ValueError("APoT weights need bit >= 3 (use ternary at 2 bits)")
    return torch.tensor(_level_list(bit, mode), dtype=torch.float64)


def weight_levels(bit: int, mode: str | None = None) -> torch.Tensor:
    """The full, symmetric, sorted signed level set."""
    m = weight_magnitudes(bit, mode)
    return torch.cat([-m.flip(0)[:-1], m])


def project_magnitude(a: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """Nearest magnitude level for ``a >= 0`` (ties go to the lower level), via bucketize on the
    midpoints: O(N log L) time and O(N) memory, no N x L broadcast."""
    mags = magnitudes.to(device=a.device, dtype=a.dtype)
    mids = (mags[1:] + mags[:-1]) * 0.5
    return mags[torch.bucketize(a, mids)]


def project(v: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * project_magnitude(v.abs(), magnitudes)


class _WeightQuant(torch.autograd.Function):
    """Clip a standardised weight with ``alpha_w`` and project it onto a level set."""

    @staticmethod
    def forward(ctx, w_hat, alpha, magnitudes, pass_outside):
        r = w_hat / alpha
        v = torch.clamp(r, -1.0, 1.0)
        q = project(v, magnitudes)
        ctx.save_for_backward(r, q)
        ctx.pass_outside = pass_outside
        return q * alpha

    @staticmethod
    def backward(ctx, g):
        r, q = ctx.saved_tensors
        outside = r.abs() > 1.0
        grad_w = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_w = g if ctx.pass_outside else g * (~outside).to(g.dtype)
        if ctx.needs_input_grad[1]:
            d = torch.where(outside, torch.sign(r), q - r)
            grad_alpha = (g * d).sum().reshape(())
        return grad_w, grad_alpha, None, None


def standardize(w: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-layer (whole tensor) weight standardisation; gradients flow through mean and std."""
    return (w - w.mean()) / (w.std() + eps)


def weight_quant(w: torch.Tensor, alpha: torch.Tensor, bit: int, mode: str | None = None) -> torch.Tensor:
    """Quantize a weight tensor: standardise, clip with ``alpha``, project, rescale by ``alpha``."""
    if bit >= FULL_PRECISION:
        return w
    mode = mode or default_weight_mode(bit)
    mags = weight_magnitudes(bit, mode).to(w.dtype)
    # the ternary path passes gradients straight through outside the clip
    return _WeightQuant.apply(standardize(w), alpha.reshape(()), mags, mode == "ternary")


def weight_quant_8bit(w: torch.Tensor) -> torch.Tensor:
    """8-bit first/last layer weights: ``round(w/m*127)/127*m`` with ``m = max|w|``, STE pass-through."""
    m = w.detach().abs().max().clamp_min(1e-12)
    wq = torch.round(w.detach() / m * 127.0) / 127.0 * m
    return w + (wq - w).detach()


__all__ = [
    "FULL_PRECISION", "num_levels", "check_bit", "round_half_up", "act_levels", "act_quant",
    "act_quant_levels",
    "default_weight_mode", "weight_magnitudes", "weight_levels", "project_magnitude", "project",
    "standardize", "weight_quant", "weight_quant_8bit",
]

if __name__ == "__main__":  # pragma: no cover - quick look at the level sets
    for b in range(2, 9):
        print(b, [round(float(v), 4) for v in weight_magnitudes(b)][:20])
