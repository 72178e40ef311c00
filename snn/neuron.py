"""Integrate-and-fire neurons of Fast-SNN (spec section 5.3).

Layout: spike / current trains are **time-major and folded into the batch**: a train of T steps over a
batch of B samples is one tensor of shape ``[T*B, ...]`` whose rows ``t*B:(t+1)*B`` hold step t. Every
stateless layer (conv, BN in eval mode, pooling, concat, reorg, upsampling, flatten) therefore runs
unchanged, once, on the whole train; only the neurons unfold it to ``[T, B, ...]``.

Dynamics per neuron and step (threshold ``theta`` = the ANN's activation clip ``act_alpha``)::

    V <- V + I_t;  if V >= theta: V <- V - theta, n <- n + 1, emit +theta       (reset by subtraction)
    signed only:   elif V < -tol*theta and n > 0: V <- V + theta, n <- n - 1, emit -theta

with ``V0 = theta/2`` and ``n0 = 0``. The negative-spike test uses a tolerance relative to theta
(``tol = 1e-3``; the original used an absolute -1e-3, i.e. the same for theta ~ 1): a membrane that is
mathematically 0 after ``V = theta`` fired can come out as -1e-8 in float arithmetic, and must not
cancel the spike it just emitted.

A *constant* input current (the analog image driving the first layer) has the closed-form solution
``n_t = clip(floor(t*I/theta + 1/2), 0, t)`` (exact in real arithmetic, and the spike train is the
difference of consecutive ``n_t``). It is evaluated with the same float operations as the activation
quantizer (:func:`quant.act_levels`), so the first spiking layer equals the ANN bit for bit; the
current itself is computed once instead of T times.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from quant.functional import act_levels

DEFAULT_NEG_TOL = 1e-3


def if_constant_counts(current: torch.Tensor, theta: torch.Tensor, t0: int, steps: int) -> torch.Tensor:
    """Cumulative spike counts ``n_t`` for ``t = t0 .. t0+steps`` (``steps+1`` rows) of IF neurons
    driven by a constant current; ``n_0 = 0``."""
    u = torch.clamp(current / theta, 0.0, 1.0)
    t = torch.arange(t0, t0 + steps + 1, device=current.device, dtype=current.dtype)
    t = t.view(-1, *([1] * current.dim()))
    return torch.floor(u.unsqueeze(0) * t + 0.5)


def if_constant(current: torch.Tensor, theta: torch.Tensor, t0: int, steps: int) -> torch.Tensor:
    """Spike train (values in {0, theta}, shape ``[steps*B, ...]``) of a constant-current IF layer."""
    n = if_constant_counts(current, theta, t0, steps)
    s = (n[1:] - n[:-1]) * theta
    return s.reshape(steps * current.shape[0], *current.shape[1:])


def if_step(v: torch.Tensor, n: torch.Tensor | None, x: torch.Tensor, theta: torch.Tensor,
            neg_level: torch.Tensor, signed: bool):
    """One IF step: integrate ``x``, fire ``+1`` at ``v >= theta`` (reset by subtraction), and for
    signed neurons ``-1`` at ``v < neg_level`` while the net count ``n > 0``. Returns ``(s, v, n)``.
    The single definition of the dynamics: the reference loop and the compiled backend use it; the
    C / Triton kernels repeat its float operations in the same order (tested bit-identical)."""
    v = v + x
    pos = v >= theta
    v = torch.where(pos, v - theta, v)
    if signed:
        neg = (v < neg_level) & (n > 0)
        v = torch.where(neg, v + theta, v)
        s = pos.to(x.dtype) - neg.to(x.dtype)
        return s, v, n + s
    return pos.to(x.dtype), v, n


def if_multistep(current: torch.Tensor, theta: torch.Tensor, v: torch.Tensor, n: torch.Tensor | None,
                 signed: bool, neg_tol: float = DEFAULT_NEG_TOL):
    """Reference step loop. ``current``: ``[T, ...]``; ``v``: membrane ``[...]``; ``n``: net count
    (signed only). Returns ``(spikes [T, ...] in {-1, 0, 1}, v, n)``. Inputs are not modified."""
    out = torch.empty_like(current)
    neg_level = -neg_tol * theta
    for t in range(current.shape[0]):
        out[t], v, n = if_step(v, n, current[t], theta, neg_level, signed)
    return out, v, n


class IFNeuron(nn.Module):
    """Multi-step integrate-and-fire layer replacing one ``QuantAct``.

    ``act_alpha`` (the threshold) keeps the ANN's parameter name, so the SNN's state dict has the
    ANN's keys. ``constant_input`` marks a neuron driven by the analog input (closed form).
    The owning :class:`~snn.convert.SpikingNetwork` sets the time window ``(t0, steps)`` before each
    call; state carries over between windows (bounded-memory simulation) and resets at ``t0 = 0``.
    """

    def __init__(self, act_alpha: torch.Tensor, T: int, bit: int, signed: bool = True,
                 constant_input: bool = False, neg_tol: float = DEFAULT_NEG_TOL):
        super().__init__()
        self.act_alpha = nn.Parameter(act_alpha.detach().clone().reshape(()), requires_grad=False)
        self.T = int(T)
        self.bit = int(bit)
        self.signed = bool(signed)
        self.constant_input = bool(constant_input)
        self.neg_tol = float(neg_tol)
        self.t0, self.steps = 0, self.T
        self.v = self.n = None
        # recording (used by snn.Monitor): net spike count and number of spike events, per sample
        self.record = False
        self.count = self.events = None
        self.backend = None  # fused kernel chosen by snn.kernels (None: reference loop)

    @property
    def theta(self) -> torch.Tensor:
        return self.act_alpha

    def extra_repr(self):
        kind = "signed" if self.signed else "unsigned"
        return f"{kind}, T={self.T}, constant_input={self.constant_input}"

    def reset_state(self):
        self.v = self.n = None
        self.count = self.events = None

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        theta = self.act_alpha
        steps = self.steps
        if self.constant_input:
            out = if_constant(current, theta, self.t0, steps)
            if self.record:
                sp = out.view(steps, -1, *current.shape[1:]) / theta
                self._record(sp)
            return out
        b = current.shape[0] // steps
        cur = current.view(steps, b, *current.shape[1:])
        fresh = self.t0 == 0 or self.v is None
        if self.backend is None:
            # the fused kernel chosen by FASTSNN_KERNEL (auto: C on CPU, Triton on CUDA), bit-identical to
            # if_multistep and falling back to it (snn/kernels.py); it starts a fresh state itself and,
            # unless the spikes are recorded or theta needs a gradient, writes theta * spikes directly
            from .kernels import if_steps
            direct = not self.record and not (torch.is_grad_enabled() and theta.requires_grad)
            out, self.v, self.n = if_steps(cur, theta, self.signed, self.neg_tol,
                                           v=None if fresh else self.v, n=None if fresh else self.n,
                                           scale=theta.detach() if direct else None)
            if direct:
                return out.view_as(current)
            spikes = out
        else:
            if fresh:
                self.v = torch.full_like(cur[0], 0.5) * theta
                self.n = torch.zeros_like(cur[0]) if self.signed else None
            spikes, self.v, self.n = self.backend(cur, theta, self.v, self.n, self.signed, self.neg_tol)
        if self.record:
            self._record(spikes)
        return (spikes * theta).view_as(current)

    def _record(self, spikes: torch.Tensor):
        """``spikes``: ``[steps, B, ...]`` in {-1, 0, 1}."""
        # per-step accumulation: a reduction over the leading time dim is several times slower on CPU
        c, e = spikes[0].clone(), spikes[0].abs()
        for t in range(1, spikes.shape[0]):
            c += spikes[t]
            e += spikes[t].abs()
        if self.t0 == 0 or self.count is None:
            self.count, self.events = c, e
        else:
            self.count, self.events = self.count + c, self.events + e
