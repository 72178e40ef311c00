"""Integrate-and-fire neurons of Fast-SNN.

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
cancel the spike it just emitted. A *bounded* (signed) neuron also suppresses a positive spike while
``n >= T``, so its net count stays in ``[0, T]`` (the "settle" mode).

A *constant* input current (the analog image driving the first layer) has the closed-form solution
``n_t = clip(floor(t*I/theta + 1/2), 0, t)`` (exact in real arithmetic, and the spike train is the
difference of consecutive ``n_t``). It is evaluated with the same float operations as the activation
quantizer (:func:`quant.act_levels`), so the first spiking layer equals the ANN bit for bit; the
current itself is computed once instead of T times. After T steps the analog input is switched off:
steps ``t >= T`` (settle steps) emit nothing.

The dynamics are written once, in :mod:`snn.kernels.reference` (:func:`if_step`); the neuron runs them
through one of the backends of :mod:`snn.kernels` (``backend=``), all bit-identical.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn

from . import kernels
from .kernels import cpp as _cpp
from .kernels.reference import (DEFAULT_NEG_TOL, if_constant, if_constant_counts, if_multistep,  # noqa: F401
                                if_step)


class BufferPool:
    """Output buffers an optimised network's neurons reuse from one forward pass to the next (CPU).

    :func:`snn.optimize` gives every neuron whose output train is read only inside the network a
    *slot*; two neurons share a slot when their outputs are never alive at the same time (a liveness
    plan over the graph). A slot's buffer is allocated on first use, grows to the largest train it
    holds, and is then reused, so a forward pass allocates no new spike trains: the convolutions'
    outputs are then the only large temporaries, freed right after the neuron reads them, and the
    process heap does not grow and shrink (page-fault) every forward -- without touching the
    allocator. Not part of the state dict; a copy (``copy.deepcopy``, pickling) starts empty. One
    forward at a time per network (threads sharing one network would share its buffers).
    """

    def __init__(self, slots: int = 0):
        self.slots = int(slots)
        self.bufs = [None] * self.slots

    def get(self, slot: int, shape, strides, like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= int(d)
        b = self.bufs[slot]
        if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
            b = self.bufs[slot] = None  # the old buffer goes first (it is not alive: the plan says so)
            b = self.bufs[slot] = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
        return b.as_strided(shape, strides)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs if b is not None)

    def clear(self):
        self.bufs = [None] * self.slots

    def __deepcopy__(self, memo):
        return BufferPool(self.slots)

    def __getstate__(self):
        return {"slots": self.slots}

    def __setstate__(self, state):
        self.__init__(state["slots"])

    def __repr__(self):
        return f"BufferPool(slots={self.slots}, {self.nbytes() / 2**20:.1f} MB)"


def _dense_strides(shape, channels_last: bool):
    if channels_last and len(shape) == 4:
        n, c, h, w = shape
        return (c * h * w, 1, w * c, c)
    st, acc = [], 1
    for d in reversed(shape):
        st.append(acc)
        acc *= max(int(d), 1)
    return tuple(reversed(st))


class IFNeuron(nn.Module):
    """Multi-step integrate-and-fire layer replacing one ``QuantAct``.

    ``act_alpha`` (the threshold) keeps the ANN's parameter name, so the SNN's state dict has the
    ANN's keys. ``constant_input`` marks a neuron driven by the analog input (closed form).
    ``bounded`` (signed only): no positive spike while the net count is ``>= T``. ``backend``: how
    the time loop runs (:data:`supported_backends`, ``"auto"``: the fastest that runs here, see
    :mod:`snn.kernels`); every backend gives the same spikes bit for bit.

    The owning :class:`~snn.convert.SpikingNetwork` sets the time window ``(t0, steps)`` before each
    call; state carries over between windows (bounded-memory simulation) and resets at ``t0 = 0``.
    The state is kept after a window that ends before ``horizon`` (default ``T``; a simulation with
    settle steps beyond T sets it to its last step). Windows may extend past T: a constant-input
    neuron then emits nothing, any other continues its dynamics on the input it gets.

    ``forward(current, residual=None)``: ``current`` (and ``residual``, added to it first) folded
    ``[steps*B, ...]``; returns ``theta * spikes`` in the same layout. ``inplace``: the output may
    overwrite ``current`` (set by :func:`snn.optimize` where nothing else reads it; never while the
    module has hooks); ``channels_last``: a constant-input neuron emits a channels-last train;
    ``pool`` / ``pool_slot``: the :class:`BufferPool` slot the output train is written into (set by
    :func:`snn.optimize`; used on CPU for windows within T, never while the module has hooks or records).
    """

    supported_backends = ["reference", "compile", "cpp", "triton"]

    def __init__(self, act_alpha: torch.Tensor, T: int, bit: int, signed: bool = True,
                 constant_input: bool = False, neg_tol: float = DEFAULT_NEG_TOL, bounded: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if bounded and not signed:
            raise ValueError("bounded=True needs a signed neuron (the bound caps the net count of signed spikes)")
        self.act_alpha = nn.Parameter(act_alpha.detach().clone().reshape(()), requires_grad=False)
        self.T = int(T)
        self.bit = int(bit)
        self.signed = bool(signed)
        self.constant_input = bool(constant_input)
        self.neg_tol = float(neg_tol)
        self.bounded = bool(bounded)
        self.backend = kernels.check_backend(backend)
        self.t0, self.steps = 0, self.T
        self.horizon: Optional[int] = None
        self.v = self.n = None
        self.inplace = False
        self.channels_last = False
        self.pool: Optional[BufferPool] = None
        self.pool_slot = -1
        # recording (used by snn.Monitor): net spike count and number of spike events, per sample
        self.record = False
        self.count = self.events = None
        self._levels_cache = None
        self._plan = None  # the fast path of the last inference call (see _fast_plan)

    def __getstate__(self):  # copies and pickles start without the cached fast path
        state = dict(super().__getstate__())
        state["_plan"] = None
        return state

    @property
    def theta(self) -> torch.Tensor:
        return self.act_alpha

    def extra_repr(self):
        kind = "signed" if self.signed else "unsigned"
        extra = ", bounded" if self.bounded else ""
        extra += f", backend={self.backend}" if self.backend != "auto" else ""
        extra += ", inplace" if self.inplace else ""
        return f"{kind}, T={self.T}, constant_input={self.constant_input}{extra}"

    def reset_state(self):
        self.v = self.n = None
        self.count = self.events = None

    def _hooked(self) -> bool:
        from torch.nn.modules import module as _m
        return bool(self._forward_hooks or self._forward_pre_hooks or _m._global_forward_hooks
                    or _m._global_forward_pre_hooks)

    def _levels(self, dtype):
        """(theta, negative level) as 0-dim tensors of ``dtype``, cached until the threshold changes."""
        a = self.act_alpha
        if torch.compiler.is_compiling():
            return kernels.threshold_levels(a, dtype, self.neg_tol)
        key = (id(a), a._version, a.data_ptr(), a.device, dtype, self.neg_tol)
        if self._levels_cache is None or self._levels_cache[0] != key:
            th, neg = kernels.threshold_levels(a, dtype, self.neg_tol)
            self._levels_cache = (key, (th.clone(), neg))
        return self._levels_cache[1]

    def _plan_key(self, current: torch.Tensor, residual: Optional[torch.Tensor]):
        """Everything the general path's decisions depend on, for a call that may take the cached plan."""
        a = self.act_alpha
        return (id(self), current.shape, current.stride(), current.dtype, current.device,
                None if residual is None else (residual.shape, residual.stride(), residual.dtype),
                self.t0, self.steps, self.T, self.horizon, self.signed, self.bounded, self.neg_tol, self.inplace,
                self.backend, self.pool, self.pool_slot, id(a), a._version, a.data_ptr(), os.environ.get("FASTSNN_KERNEL"))

    def _fast_plan(self, current: torch.Tensor, residual: Optional[torch.Tensor]):
        """The C++ call the general path makes for this input, as one closure, or ``None`` where the
        general path must run (recording, gradients, hooks, carried state, layouts that need copies, other
        backends). Taking it gives the same op with the same operands, so the same result bit for bit; it
        only skips re-deriving the decisions (about 100 us of Python per call, ~19 calls per ResNet-20)."""
        steps, t0 = self.steps, self.t0
        if (self.constant_input or steps < 1 or t0 != 0 or current.device.type != "cpu" or current.numel() == 0
                or current.shape[0] % steps or (self.bounded and not self.signed)):
            return None
        if (self.horizon if self.horizon is not None else self.T) > steps:  # state kept for a later window
            return None
        cur = current.view(steps, current.shape[0] // steps, *current.shape[1:])
        if kernels.resolve(self.backend, cur) != "cpp" or not kernels.cpp_available() \
                or not kernels._dense_train(cur):
            return None
        if residual is not None and (residual.shape != current.shape or residual.dtype != current.dtype
                                     or not kernels.dense_same_layout(residual, current)):
            return None
        th, neg = self._levels(current.dtype)
        bound = self.T if self.bounded else None
        signed, vshape, vstride = self.signed, cur.shape, cur.stride()
        pool, slot = (self.pool, self.pool_slot) if self.pool is not None and steps <= self.T else (None, -1)
        inplace, fshape = self.inplace, current.shape
        views = [None, None, None]  # the pool's buffer, its [T, B, ...] view and its folded view

        def run(current, residual):
            c = current.view(vshape)
            r = None if residual is None else residual.view(vshape)
            if pool is None:
                return _cpp.run(c, th, neg, signed, r, None, None, False, th, inplace, bound)[0].view(fshape)
            if pool.bufs[slot] is not views[0] or views[0] is None:  # (re)allocated since: new views
                out = pool.get(slot, vshape, vstride, c)
                views[:] = [pool.bufs[slot], out, out.view(fshape)]
            _cpp.run(c, th, neg, signed, r, None, None, False, th, False, bound, views[1])
            return views[2]
        return run

    def forward(self, current: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        fast = not self.record and not self._hooked() and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (self.act_alpha.requires_grad or current.requires_grad
                                         or (residual is not None and residual.requires_grad)))
        if fast:
            key = self._plan_key(current, residual)
            plan = self._plan
            if plan is None or plan[0] != key:
                fn = self._fast_plan(current, residual)
                plan = self._plan = (key, fn)
            if plan[1] is not None:
                if self.v is not None:  # no state is kept after a window that ends the run
                    self.v = self.n = None
                return plan[1](current, residual)
        return self._forward(current, residual)

    def _forward(self, current: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.bounded and not self.signed:
            raise ValueError("bounded=True needs a signed neuron (set_signed(False) on a bounded network?)")
        theta = self.act_alpha
        t0, steps = self.t0, self.steps
        # theta * spikes straight from the kernel unless the spikes are recorded or theta needs a gradient
        grad = torch.is_grad_enabled() and theta.requires_grad
        direct = not self.record and not grad
        scale = self._levels(current.dtype)[0] if direct and not grad else None
        pooled = (direct and self.pool is not None and current.device.type == "cpu" and t0 + steps <= self.T
                  and not self._hooked())
        if self.constant_input:
            if residual is not None:
                current = current + residual
            buf = None
            if pooled:
                shape = (steps * current.shape[0],) + tuple(current.shape[1:])
                cl = len(shape) == 4 and (self.channels_last or (
                    current.is_contiguous(memory_format=torch.channels_last) and not current.is_contiguous()))
                buf = self.pool.get(self.pool_slot, shape, _dense_strides(shape, cl), current)
            out = kernels.if_const_steps(current, theta, t0, steps, T=self.T, scale=scale,
                                         channels_last=self.channels_last, backend=self.backend, out=buf)
            spikes = None if direct else out
        else:
            if current.shape[0] % max(steps, 1) != 0:
                raise ValueError(f"IF neuron: a train of {current.shape[0]} rows is not {steps} steps x batch")
            b = current.shape[0] // steps if steps else 0
            cur = current.view(steps, b, *current.shape[1:])
            res = residual.view(steps, b, *residual.shape[1:]) if residual is not None else None
            fresh = t0 == 0
            if not fresh and self.v is None:
                raise RuntimeError(f"IF neuron: the window starting at step {t0} continues a simulation whose "
                                   "state was not kept; set neuron.horizon to the last step of the run "
                                   "(T + settle steps) before simulating it in several windows")
            keep = t0 + steps < (self.horizon if self.horizon is not None else self.T)
            inplace = self.inplace and direct and not self._hooked()
            buf = self.pool.get(self.pool_slot, cur.shape, cur.stride(), cur) \
                if pooled and kernels._dense_train(cur) else None
            out, v, n = kernels.if_steps(cur, theta, self.signed, self.neg_tol, residual=res,
                                         v=None if fresh else self.v, n=None if fresh else self.n, state=keep,
                                         scale=scale, inplace=inplace, backend=self.backend,
                                         bound=self.T if self.bounded else None,
                                         levels=self._levels(current.dtype) if not grad else None, out=buf)
            self.v, self.n = (v, n) if keep else (None, None)
            out = out.view(current.shape)
            spikes = None if direct else out.view(steps, b, *current.shape[1:])
        if spikes is None:
            return out
        if self.record:
            self._record(spikes.view(steps, -1, *current.shape[1:]))
        return spikes.view(out.shape) * theta

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


__all__ = ["IFNeuron", "BufferPool", "if_step", "if_multistep", "if_constant", "if_constant_counts", "DEFAULT_NEG_TOL"]
