"""The Triton backend: the IF loop and the constant-input closed form as Triton kernels (CUDA,
float32), wrapped as PyTorch custom operators (``torch.ops.fastsnn_triton.if_steps`` /
``if_steps_triton_inplace`` / ``if_const_triton``, with fake implementations for torch.compile).

On CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is first
imported): that is how the tests check it on a machine without a GPU; ``benchmarks/gpu_check.sh`` runs
the same tests on a CUDA device. Before its first use on a device the kernel is checked once against
the reference loop on random currents with exact ties; a mismatch makes the backend unavailable there.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .cpp import BackendUnavailable
from .reference import DEFAULT_NEG_TOL, if_multistep

_K = {}
_CHECKED = {}  # device -> None (passed) or the reason it failed
tl = None  # triton.language, imported on first use (the interpreter patches this global)
BLOCK = 1024


def interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels():
    """Build (once) the Triton kernels."""
    if "if" in _K:
        return _K["if"], _K["const"]
    global tl
    try:
        import triton
        import triton.language as tl
    except Exception as e:  # noqa: BLE001
        raise BackendUnavailable(f"Triton is not installed ({type(e).__name__}: {e}): pip install triton") from None

    @triton.jit
    def _if_kernel(cur, res, out, vin, nin, vout, nout, N, theta_p, neg_p, scale_p, bound,
                   T: tl.constexpr, SIGNED: tl.constexpr, RES: tl.constexpr, VIN: tl.constexpr,
                   VOUT: tl.constexpr, BOUNDED: tl.constexpr, BLOCK: tl.constexpr):
        theta = tl.load(theta_p)  # 0-dim tensors on the device: no host sync for the threshold
        neg_level = tl.load(neg_p)
        scale = tl.load(scale_p)
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        if VIN:
            v = tl.load(vin + offs, mask=mask, other=0.0)
        else:
            v = tl.zeros([BLOCK], dtype=tl.float32) + theta * 0.5
        if SIGNED and VIN:
            n = tl.load(nin + offs, mask=mask, other=0.0)
        else:
            n = tl.zeros([BLOCK], dtype=tl.float32)
        for t in tl.static_range(T):
            x = tl.load(cur + t * N + offs, mask=mask, other=0.0)
            if RES:
                x = x + tl.load(res + t * N + offs, mask=mask, other=0.0)
            v = v + x
            pos = v >= theta
            if BOUNDED:
                pos = pos & (n < bound)
            v = tl.where(pos, v - theta, v)
            s = pos.to(tl.float32)
            if SIGNED:
                ng = (v < neg_level) & (n > 0.0)
                v = tl.where(ng, v + theta, v)
                s = s - ng.to(tl.float32)
                n = n + s
            tl.store(out + t * N + offs, s * scale, mask=mask)
        if VOUT:
            tl.store(vout + offs, v, mask=mask)
            if SIGNED:
                tl.store(nout + offs, n, mask=mask)

    @triton.jit
    def _const_kernel(cur, out, N, theta_p, scale_p, T0: tl.constexpr, K0: tl.constexpr, ON: tl.constexpr,
                      STEPS: tl.constexpr, BLOCK: tl.constexpr):
        # n_k = floor(clamp(cur / theta, 0, 1) * k + 0.5), k = min(t, T): steps t >= ON (past T) emit nothing
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        theta = tl.load(theta_p)
        scale = tl.load(scale_p)
        u = tl.load(cur + offs, mask=mask, other=0.0) / theta
        u = tl.minimum(tl.maximum(u, 0.0), 1.0)
        prev = tl.floor(u * K0 + 0.5)
        for t in tl.static_range(STEPS):
            if t < ON:
                nx = tl.floor(u * (T0 + t + 1.0) + 0.5)
            else:
                nx = prev
            tl.store(out + t * N + offs, (nx - prev) * scale, mask=mask)
            prev = nx

    _K["if"], _K["const"] = _if_kernel, _const_kernel
    return _if_kernel, _const_kernel


def _launch_if(cur, res, out, vin, nin, vout, nout, theta, neg, scale, bound, signed):
    k, _ = kernels()
    T = cur.shape[0]
    N = cur[0].numel() if T else 0
    if N == 0 or T == 0:
        return
    d = cur
    k[(triton_cdiv(N),)](cur, res if res is not None else d, out, vin if vin is not None else d,
                         nin if nin is not None else d, vout if vout is not None else d,
                         nout if nout is not None else d, N, theta, neg, scale,
                         float(bound) if bound is not None else 0.0, T=T, SIGNED=bool(signed),
                         RES=res is not None, VIN=vin is not None, VOUT=vout is not None,
                         BOUNDED=bound is not None, BLOCK=BLOCK, enable_fp_fusion=False)  # no FMA: the reference's rounding


def triton_cdiv(N):
    return max(1, (N + BLOCK - 1) // BLOCK)


def _state_bufs(cur, signed, state):
    if not state:
        return cur.new_empty(0), cur.new_empty(0)
    c0 = cur[0]
    v = torch.empty_strided(c0.shape, c0.stride(), dtype=cur.dtype, device=cur.device)
    n = torch.empty_strided(c0.shape, c0.stride(), dtype=cur.dtype, device=cur.device) if signed else cur.new_empty(0)
    return v, n


def _b(bound):
    return None if bound == float("inf") else bound


@torch.library.custom_op("fastsnn_triton::if_steps", mutates_args=())
def if_steps_triton(cur: torch.Tensor, res: Optional[torch.Tensor], v: Optional[torch.Tensor],
                    n: Optional[torch.Tensor], theta: torch.Tensor, neg: torch.Tensor, scale: torch.Tensor,
                    bound: float, signed: bool, state: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = torch.empty_strided(cur.shape, cur.stride(), dtype=cur.dtype, device=cur.device)
    vo, no = _state_bufs(cur, signed, state)
    _launch_if(cur, res, out, v, n if signed else None, vo if state else None, no if state and signed else None,
               theta, neg, scale, _b(bound), signed)
    return out, vo, no


@if_steps_triton.register_fake
def _(cur, res, v, n, theta, neg, scale, bound, signed, state):
    out = torch.empty_strided(cur.shape, cur.stride(), dtype=cur.dtype, device=cur.device)
    return (out,) + _state_bufs(cur, signed, state)


@torch.library.custom_op("fastsnn_triton::if_steps_inplace", mutates_args=("cur",))
def if_steps_triton_inplace(cur: torch.Tensor, res: Optional[torch.Tensor], v: Optional[torch.Tensor],
                            n: Optional[torch.Tensor], theta: torch.Tensor, neg: torch.Tensor, scale: torch.Tensor,
                            bound: float, signed: bool, state: bool) -> tuple[torch.Tensor, torch.Tensor]:
    vo, no = _state_bufs(cur, signed, state)
    _launch_if(cur, res, cur, v, n if signed else None, vo if state else None, no if state and signed else None,
               theta, neg, scale, _b(bound), signed)
    return vo, no


@if_steps_triton_inplace.register_fake
def _(cur, res, v, n, theta, neg, scale, bound, signed, state):
    return _state_bufs(cur, signed, state)


@torch.library.custom_op("fastsnn_triton::if_const", mutates_args=())
def if_const_triton(cur: torch.Tensor, theta: torch.Tensor, scale: torch.Tensor, t0: int, steps: int, T: int,
                    channels_last: bool) -> torch.Tensor:
    cl = cur.dim() == 4 and channels_last
    src = cur.contiguous(memory_format=torch.channels_last) if cl else cur.contiguous()
    shape = (steps * cur.shape[0],) + tuple(cur.shape[1:])
    out = torch.empty(shape, dtype=cur.dtype, device=cur.device,
                      memory_format=torch.channels_last if cl else torch.contiguous_format)
    N = cur.numel()
    if N and steps:
        _, k = kernels()
        k[(triton_cdiv(N),)](src, out, N, theta, scale, T0=int(t0), K0=float(min(t0, T)),
                             ON=max(0, min(int(steps), int(T) - int(t0))), STEPS=int(steps), BLOCK=BLOCK,
                             enable_fp_fusion=False)  # u * k + 0.5 rounded twice, as the reference does
    return out


@if_const_triton.register_fake
def _(cur, theta, scale, t0, steps, T, channels_last):
    cl = cur.dim() == 4 and channels_last
    shape = (steps * cur.shape[0],) + tuple(cur.shape[1:])
    return torch.empty(shape, dtype=cur.dtype, device=cur.device,
                           memory_format=torch.channels_last if cl else torch.contiguous_format)


def check_device(device) -> None:
    """Raise :class:`BackendUnavailable` unless the Triton kernels run (and agree with the reference)
    on ``device``; the check runs once per device."""
    key = str(device)
    if key not in _CHECKED:
        kernels()
        if torch.device(device).type != "cuda" and not interpreter():
            raise BackendUnavailable("the Triton backend needs a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")
        _CHECKED[key] = _selfcheck(device)
    if _CHECKED[key] is not None:
        raise BackendUnavailable(_CHECKED[key])


def _selfcheck(device) -> Optional[str]:
    try:
        g = torch.Generator().manual_seed(0)
        theta = torch.tensor(0.75)
        cur = torch.randn(5, 3001, generator=g) * 0.6
        m = torch.rand(cur.shape, generator=g) < 0.3
        cur[m] = (torch.randint(-4, 5, cur.shape, generator=g).float() * 0.1875)[m]
        res = torch.randn(cur.shape, generator=g) * 0.2
        neg = -DEFAULT_NEG_TOL * theta
        for signed, bound in ((True, None), (False, None), (True, 2.0)):
            v0 = torch.full_like(cur[0], 0.375)
            n0 = torch.zeros_like(cur[0])
            ref = if_multistep(cur + res, theta, v0, n0 if signed else None, signed, bound=bound)
            d = [t.to(device) for t in (cur, res, v0, n0, theta, neg, torch.tensor(1.0))]
            out, vv, _ = torch.ops.fastsnn_triton.if_steps(d[0], d[1], d[2], d[3] if signed else None, d[4], d[5], d[6],
                                                           float("inf") if bound is None else bound, signed, True)
            if not (torch.equal(out.cpu(), ref[0]) and torch.equal(vv.cpu(), ref[1])):
                return f"the Triton IF kernel disagrees with the reference loop on {device}"
        return None
    except BackendUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - compilation / launch failure
        return f"the Triton IF kernel failed on {device} ({type(e).__name__}: {str(e)[:300]})"


def run(cur, th, neg, signed, residual, v, n, state, sc, inplace, bound, out=None):
    if cur.dtype != torch.float32:
        raise BackendUnavailable(f"the Triton backend runs float32 only (got {cur.dtype})")
    check_device(cur.device)
    b = float("inf") if bound is None else float(bound)
    if out is not None:  # a given output buffer (CPU networks only reuse buffers): computed, then copied
        s, vo, no = torch.ops.fastsnn_triton.if_steps(cur, residual, v, n, th, neg, sc, b, bool(signed), bool(state))
        out.copy_(s)
    elif inplace:
        vo, no = torch.ops.fastsnn_triton.if_steps_inplace(cur, residual, v, n, th, neg, sc, b,
                                                           bool(signed), bool(state))
        out = cur
    else:
        out, vo, no = torch.ops.fastsnn_triton.if_steps(cur, residual, v, n, th, neg, sc, b,
                                                        bool(signed), bool(state))
    return out, (vo if state else None), (no if state and signed else None)


def run_const(current, th, t0, steps, T, sc, channels_last, out=None):
    if current.dtype != torch.float32:
        raise BackendUnavailable(f"the Triton backend runs float32 only (got {current.dtype})")
    check_device(current.device)
    s = torch.ops.fastsnn_triton.if_const(current, th, sc, int(t0), int(steps), int(T), bool(channels_last))
    if out is not None:
        out.copy_(s)
        return out
    return s
