"""Fused integrate-and-fire kernels: the whole time loop of one layer in one pass over memory.

The dynamics are written once, in PyTorch (:mod:`snn.kernels.reference`: :func:`if_step`, the step
loop :func:`if_multistep`, the constant-input closed form :func:`if_constant`). The backends run the
same float operations in the same order, so their spike trains are **bit-identical** (tested):

* ``reference``: the PyTorch loop itself (~8 elementwise passes over the layer per step);
* ``compile``: that loop unrolled over the window and compiled by ``torch.compile`` (inductor; C++ on
  CPU, Triton on CUDA), :mod:`snn.kernels.compiled`;
* ``cpp``: C++ CPU kernels registered as PyTorch custom operators (``torch.ops.fastsnn.*``,
  ``snn/csrc/fastsnn_ops.cpp``, built by ``torch.utils.cpp_extension``), :mod:`snn.kernels.cpp`;
* ``triton``: Triton kernels for CUDA as custom operators (``torch.ops.fastsnn_triton.*``),
  :mod:`snn.kernels.triton_backend`; on CPU only under ``TRITON_INTERPRET=1`` (tests).

Every fused kernel reads each step's input current once (plus, optionally, a residual current that is
added first -- ``v + (a + r)``, the order of the unfused network), keeps the membrane and the net count
in registers, and writes the output once (optionally already multiplied by ``theta``, in place).

``backend="auto"`` (the default of :class:`~snn.neuron.IFNeuron`) picks per call, by device:
CPU -> ``cpp``, ``compile``, ``reference``; CUDA -> ``triton``, ``compile``, ``reference`` -- the first
that runs here. A backend that cannot (no C++ compiler, no ninja, no Triton, a compilation error) is
dropped with one warning. Inputs a native kernel does not take (other dtypes, gradients needed) go to
the reference loop. An explicit backend never falls back: it raises :class:`BackendUnavailable` with
the reason. ``FASTSNN_KERNEL=<name>`` overrides what ``auto`` picks (for benchmarks).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn as nn

from quant.fused import dense_same_layout, like_layout, warn_once

from . import compiled as _compiled
from . import cpp as _cpp
from . import triton_backend as _triton
from .cpp import BackendUnavailable
from .reference import (DEFAULT_NEG_TOL, if_constant, if_constant_counts, if_multistep, if_step, init_state)
from .reference import run as _ref_run
from .reference import run_const as _ref_const

BACKENDS = ("auto", "reference", "compile", "cpp", "triton")
CONCRETE = BACKENDS[1:]
AUTO_ORDER = {"cpu": ("cpp", "compile", "reference"), "cuda": ("triton", "compile", "reference")}
_DROPPED = set()  # backends `auto` found unusable in this process


def check_backend(name: Optional[str]) -> str:
    name = "auto" if name is None else str(name).lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown IF backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return name


def default_backend() -> str:
    """``FASTSNN_KERNEL`` (what ``auto`` resolves to; unset or unknown: ``auto``)."""
    name = os.environ.get("FASTSNN_KERNEL", "auto").lower()
    if name not in BACKENDS:
        warn_once("env:" + name, f"FASTSNN_KERNEL={name!r} is unknown (use one of {BACKENDS}): using 'auto'")
        name = "auto"
    return name


def cpp_available() -> bool:
    return _cpp.available()


def available_backends(device="cpu") -> list:
    """The concrete backends that run on ``device`` here (building / checking them if needed)."""
    dev = torch.device(device)
    out = ["reference"]
    if _usable("compile", dev):
        out.append("compile")
    if dev.type == "cpu" and _cpp.available():
        out.append("cpp")
    try:
        if dev.type == "cuda" or _triton.interpreter():
            _triton.check_device(dev)
            out.append("triton")
    except BackendUnavailable:
        pass
    return out


def _usable(name, dev) -> bool:
    if name == "compile":  # probe once: a tiny compiled call
        try:
            if_steps(torch.zeros(1, 4, device=dev), torch.tensor(1.0, device=dev), False, backend="compile")
            return True
        except BackendUnavailable:
            return False
    return True


def _candidates(backend: Optional[str], x: torch.Tensor, grad: bool):
    """The concrete backends to try, in order, for ``backend`` on tensor ``x``; ``explicit`` tells
    whether a failure must raise."""
    name = check_backend(backend)
    if name == "auto":
        env = default_backend()
        if env != "auto":
            return (env,), True
        if grad:  # a gradient is needed: the loop autograd differentiates
            return ("reference",), False
        order = AUTO_ORDER.get(x.device.type, ("compile", "reference"))
        if x.dtype not in (torch.float32, torch.float64):
            order = ("reference",)
        elif x.dtype != torch.float32:
            order = tuple(b for b in order if b != "triton")
        return tuple(b for b in order if b not in _DROPPED) or ("reference",), False
    return (name,), True


def resolve(backend: Optional[str], x: torch.Tensor, grad: bool = False) -> str:
    """The backend ``backend`` (``auto`` or a name) runs on ``x``: an explicit name as is; for
    ``auto`` the first candidate not known to be unusable here (the C++ kernels are built to find out)."""
    cands, explicit = _candidates(backend, x, grad)
    if explicit:
        return cands[0]
    for name in cands:
        if name == "cpp" and not _cpp.available():
            continue
        if name == "compile" and _compiled._STATE["error"] is not None:
            continue
        if name == "triton" and not (x.device.type == "cuda" or _triton.interpreter()):
            continue
        return name
    return "reference"


def _dispatch(backend, x, grad, calls):
    """Run ``calls[name]()`` for the first candidate backend that works."""
    cands, explicit = _candidates(backend, x, grad)
    for name in cands:
        try:
            return calls[name]()
        except BackendUnavailable as e:
            if explicit:
                raise BackendUnavailable(f"IF backend {name!r}: {e}") from None
            _DROPPED.add(name)
            warn_once("drop:" + name, f"fast-snn: IF backend {name!r} is unavailable ({e}); "
                      "backend='auto' falls back to the next one")
    return calls["reference"]()


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def threshold_levels(theta: torch.Tensor, dtype: torch.dtype, neg_tol: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(theta, -neg_tol * theta)`` as 0-dim tensors of ``dtype`` on theta's device, computed exactly
    as the reference computes them (the kernels read their values; no host synchronisation)."""
    th = theta.detach().to(dtype)
    return th, -neg_tol * th


def _scale_tensor(th: torch.Tensor, scale) -> torch.Tensor:
    if scale is None:
        return torch.ones((), dtype=th.dtype, device=th.device)
    if isinstance(scale, torch.Tensor):
        return scale.detach().to(device=th.device, dtype=th.dtype)
    return torch.full((), float(scale), dtype=th.dtype, device=th.device)


def _dense_train(cur: torch.Tensor) -> bool:
    T = cur.shape[0]
    return dense_same_layout(cur) and (T <= 1 or cur.numel() == 0 or cur.stride(0) == cur.numel() // T)


def _prepare(cur, residual, v, n, signed, inplace):
    """Bring every operand into ``cur``'s dense, time-outermost layout (copies only where they differ).
    Returns the operands and whether the result can be written into ``cur``."""
    if not _dense_train(cur):
        cur, inplace = cur.contiguous(), False
    if residual is not None:
        residual = like_layout(residual, cur)
        if residual.dtype != cur.dtype:
            residual = residual.to(cur.dtype)
    if v is not None:
        v = like_layout(v, cur[0])
        if signed:
            n = torch.zeros_like(v) if n is None else like_layout(n, cur[0])
        else:
            n = None
    else:
        n = None
    return cur, residual, v, n, inplace


def if_steps(cur: torch.Tensor, theta: torch.Tensor, signed: bool, neg_tol: float = DEFAULT_NEG_TOL,
             residual: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
             n: Optional[torch.Tensor] = None, state: bool = True, scale: Optional[float] = None,
             inplace: bool = False, backend: Optional[str] = "auto", bound: Optional[int] = None,
             levels: Optional[Tuple[float, float]] = None, out: Optional[torch.Tensor] = None
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fused IF layer over ``T = cur.shape[0]`` steps.

    ``cur``: input currents ``[T, ...]``; ``residual``: a second current of the same shape, added to
    ``cur`` first; ``v`` / ``n``: initial membrane / net count ``[...]`` (``None``: ``theta/2`` / 0);
    ``state``: also return the final ``v`` / ``n`` (else ``None``); ``scale``: multiply the spikes
    (``None``: spikes in {-1, 0, 1}; ``theta``: the layer's output train; a float or 0-dim tensor);
    ``inplace``: write the result into ``cur`` (``cur`` is returned; copied back if its layout needs a
    dense copy first); ``bound``: the bounded signed neuron's cap on the net count (``T``); ``levels``:
    ``threshold_levels(theta, cur.dtype, neg_tol)`` if already known; ``out``: a tensor of ``cur``'s
    shape to write the result into (a reused buffer; it may be ``cur`` or ``residual`` itself: every
    element is read before it is written; same values as without it). Returns ``(spikes * scale, v,
    n)``; ``n`` is ``None`` for unsigned neurons.
    """
    if bound is not None and not signed:
        raise ValueError("a bounded IF neuron must be signed")
    grad = _needs_grad(cur, residual, v, theta)
    theta_d = theta if grad else theta.detach()

    def reference():
        return _ref_run(cur, theta_d, signed, neg_tol, residual, v, n, state, scale, inplace, bound, out)

    def prepared():
        return _prepare(cur, residual, v, n, signed, inplace)

    def native(impl):
        c, r, vv, nn_, ip = prepared()
        th, neg = levels if levels is not None else threshold_levels(theta_d, c.dtype, neg_tol)
        sc = _scale_tensor(th, scale)
        if out is not None:
            if out.dtype == c.dtype and out.device == c.device and out.shape == c.shape and dense_same_layout(out, c):
                return impl(c, th, neg, signed, r, vv, nn_, state, sc, False, bound, out)
            s, v2, n2 = impl(c, th, neg, signed, r, vv, nn_, state, sc, False, bound)
            out.copy_(s)
            return out, v2, n2
        res = impl(c, th, neg, signed, r, vv, nn_, state, sc, ip, bound)
        return _finish(res, cur, inplace)

    def cpp():
        if cur.device.type != "cpu":
            raise BackendUnavailable(f"the C++ kernels run on CPU tensors (got {cur.device})")
        return native(_cpp.run)

    def triton():
        if grad:
            raise BackendUnavailable("the Triton kernels have no autograd formula (use backend='cpp' / "
                                     "'compile' / 'reference' when a gradient is needed)")
        return native(_triton.run)

    def compile_():
        return native(_compiled.run)

    return _dispatch(backend, cur, grad, {"reference": reference, "cpp": cpp, "triton": triton,
                                          "compile": compile_})


def _finish(res, cur, inplace):
    """An in-place request whose layout forced a copy: copy the result back into ``cur``."""
    s, v, n = res
    if inplace and s.data_ptr() != cur.data_ptr():
        cur.copy_(s)
        s = cur
    return s, v, n


def if_const_steps(current: torch.Tensor, theta: torch.Tensor, t0: int, steps: int, T: Optional[int] = None,
                   scale: Optional[float] = None, channels_last: bool = False,
                   backend: Optional[str] = "auto", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Closed form of a constant-current IF layer (:func:`if_constant`) in one pass: the folded train
    ``[steps*B, ...]`` of ``spikes * scale`` (``scale=None``: spikes) for steps ``t0 .. t0+steps-1``, in
    channels-last layout if asked (4-d); with ``T``, steps ``t >= T`` emit nothing (the input is switched
    off after T steps). Bit-identical to ``if_constant(...) / theta * scale``. ``out``: a tensor of shape
    ``[steps*B, ...]`` (contiguous or channels-last; it decides the layout) to write the train into."""
    Tm = int(T) if T is not None else int(t0) + int(steps)
    grad = _needs_grad(current, theta)
    theta_d = theta if grad else theta.detach()

    if out is not None:
        shape = (int(steps) * current.shape[0],) + tuple(current.shape[1:])
        ok = tuple(out.shape) == shape and out.dtype == current.dtype and out.device == current.device and (
            out.is_contiguous() or (out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last)))
        if not ok:
            raise ValueError(f"if_const_steps: out must be a contiguous or channels-last {current.dtype} tensor "
                             f"of shape {shape} on {current.device} (got {tuple(out.shape)}, {out.dtype})")
        channels_last = out.dim() == 4 and not out.is_contiguous()

    def reference():
        return _ref_const(current, theta_d, t0, steps, Tm, scale, channels_last, out)

    def native(impl):
        th = theta_d.detach().to(current.dtype)
        return impl(current, th, t0, steps, Tm, _scale_tensor(th, scale), channels_last, out)

    def cpp():
        if current.device.type != "cpu":
            raise BackendUnavailable(f"the C++ kernels run on CPU tensors (got {current.device})")
        return native(_cpp.run_const)

    def triton():
        if grad:
            raise BackendUnavailable("the Triton kernels have no autograd formula")
        return native(_triton.run_const)

    def compile_():
        return native(_compiled.run_const)

    return _dispatch(backend, current, grad, {"reference": reference, "cpp": cpp, "triton": triton,
                                              "compile": compile_})


def nonzero_per_position(x: torch.Tensor) -> torch.Tensor:
    """Count of non-zero entries of a 4-d ``[N, C, H, W]`` tensor at each spatial position, summed
    over N and C (int64 ``[H, W]``): one pass (C++ op on CPU float tensors, contiguous or
    channels-last), else ``torch.count_nonzero``."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.numel() > 0 \
            and default_backend() != "reference" and "cpp" not in _DROPPED \
            and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        try:
            return _cpp.load().nonzero_per_position(x)
        except BackendUnavailable as e:
            _DROPPED.add("cpp")
            warn_once("drop:cpp", f"fast-snn: IF backend 'cpp' is unavailable ({e}); falling back")
    return torch.count_nonzero(x, dim=(0, 1))


def set_backend(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Set ``backend`` on every IF neuron of ``module`` (a :class:`~snn.SpikingNetwork` or any
    module); returns the module."""
    from ..neuron import IFNeuron
    name = check_backend(backend)
    for m in module.modules():
        if isinstance(m, IFNeuron):
            m.backend = name
    return module


__all__ = ["BACKENDS", "BackendUnavailable", "if_steps", "if_const_steps", "set_backend", "resolve",
           "available_backends", "cpp_available", "nonzero_per_position", "default_backend", "threshold_levels",
           "if_step", "if_multistep", "if_constant", "if_constant_counts", "init_state", "DEFAULT_NEG_TOL"]
