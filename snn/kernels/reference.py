"""The IF dynamics, written once in PyTorch: the reference every other backend is tested against.

:func:`if_step` is one time step of a layer of IF neurons (with the optional bound of the "settle"
mode); :func:`if_multistep` loops it over a train; :func:`if_constant_counts` /
:func:`if_constant` are the closed form for a constant input current. The compile backend compiles
exactly these functions; the C++ and Triton kernels repeat their float operations in the same order.
"""
from __future__ import annotations

from typing import Optional

import torch

DEFAULT_NEG_TOL = 1e-3


def if_step(v: torch.Tensor, n: Optional[torch.Tensor], x: torch.Tensor, theta: torch.Tensor,
            neg_level: torch.Tensor, signed: bool, bound=None):
    """One IF step: integrate ``x``, fire ``+1`` at ``v >= theta`` (reset by subtraction; with
    ``bound`` -- signed only -- only while the net count ``n < bound``), and for signed neurons
    ``-1`` at ``v < neg_level`` while ``n > 0``. Returns ``(s, v, n)``, ``s`` in {-1, 0, 1}."""
    v = v + x
    pos = v >= theta
    if bound is not None:
        pos = pos & (n < bound)
    v = torch.where(pos, v - theta, v)
    if signed:
        neg = (v < neg_level) & (n > 0)
        v = torch.where(neg, v + theta, v)
        s = pos.to(x.dtype) - neg.to(x.dtype)
        return s, v, n + s
    return pos.to(x.dtype), v, n


def if_multistep(current: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, n: Optional[torch.Tensor],
                 signed: bool, neg_tol: float = DEFAULT_NEG_TOL, bound=None):
    """Reference step loop. ``current``: ``[T, ...]``; ``v``: membrane ``[...]``; ``n``: net count
    (signed only). Returns ``(spikes [T, ...] in {-1, 0, 1}, v, n)``. Inputs are not modified."""
    if bound is not None and not signed:
        raise ValueError("a bounded IF neuron must be signed")
    out = torch.empty_like(current)
    neg_level = -neg_tol * theta
    for t in range(current.shape[0]):
        out[t], v, n = if_step(v, n, current[t], theta, neg_level, signed, bound)
    return out, v, n


def if_constant_counts(current: torch.Tensor, theta: torch.Tensor, t0: int, steps: int,
                       T: Optional[int] = None) -> torch.Tensor:
    """Cumulative spike counts ``n_t`` for ``t = t0 .. t0+steps`` (``steps+1`` rows) of IF neurons
    driven by a constant current; ``n_0 = 0``. With ``T``, the input is switched off after step T
    (``n_t = n_T`` for ``t > T``: settle steps emit nothing)."""
    u = torch.clamp(current / theta, 0.0, 1.0)
    t = torch.arange(t0, t0 + steps + 1, device=current.device, dtype=current.dtype)
    if T is not None:
        t = t.clamp(max=T)
    t = t.view(-1, *([1] * current.dim()))
    return torch.floor(u.unsqueeze(0) * t + 0.5)


def if_constant(current: torch.Tensor, theta: torch.Tensor, t0: int, steps: int,
                T: Optional[int] = None) -> torch.Tensor:
    """Spike train (values in {0, theta}, shape ``[steps*B, ...]``) of a constant-current IF layer."""
    n = if_constant_counts(current, theta, t0, steps, T)
    s = (n[1:] - n[:-1]) * theta
    return s.reshape(steps * current.shape[0], *current.shape[1:])


def init_state(cur: torch.Tensor, theta: torch.Tensor, signed: bool, v=None, n=None):
    """The state a fresh neuron starts from (``V0 = theta/2``, ``n0 = 0``), or the given one."""
    if v is None:
        v = torch.full_like(cur[0], 0.5) * theta
        n = torch.zeros_like(cur[0]) if signed else None
    elif signed and n is None:
        n = torch.zeros_like(cur[0])
    return v, n


def run(cur, theta, signed, neg_tol, residual, v, n, state, scale, inplace, bound, out=None):
    """The reference backend behind :func:`snn.kernels.if_steps`."""
    v, n = init_state(cur, theta, signed, v, n)
    x = cur if residual is None else cur + residual
    s, v, n = if_multistep(x, theta, v, n if signed else None, signed, neg_tol, bound)
    if scale is not None:
        s = s * scale
    if out is not None:
        out.copy_(s)
        s = out
    elif inplace:
        cur.copy_(s)
        s = cur
    return s, (v if state else None), (n if state and signed else None)


def run_const(current, theta, t0, steps, T, scale, channels_last, out=None):
    """The reference backend behind :func:`snn.kernels.if_const_steps`: ``spikes * scale`` (with
    ``scale = theta`` exactly :func:`if_constant`)."""
    n = if_constant_counts(current, theta, t0, steps, T)
    s = n[1:] - n[:-1]
    if scale is not None:
        s = s * scale
    s = s.reshape(steps * current.shape[0], *current.shape[1:])
    if out is not None:
        out.copy_(s)
        return out
    if channels_last and s.dim() == 4:
        s = s.contiguous(memory_format=torch.channels_last)
    return s
