"""Fused integrate-and-fire kernels: the whole time loop of one layer in one pass over memory.

The reference is :func:`snn.neuron.if_multistep` (a PyTorch loop: ~8 elementwise passes over the
layer per time step). The fused kernels read each step's input current once (plus, optionally, a
residual current that is added first -- ``v + (a + r)``, the order of the unfused network), keep the
membrane ``v`` and the net count ``n`` in registers / L1, and write the output once (optionally already
multiplied by ``theta``, the value the next layer consumes). Every float operation is the reference's,
in the reference's order, so the spike trains are **bit-identical** to :func:`~snn.neuron.if_multistep`.

Backends (``FASTSNN_KERNEL`` = ``auto`` | ``cpp`` | ``compile`` | ``triton`` | ``reference``):

* ``cpp``: a C / OpenMP kernel compiled once with the system compiler and called through ctypes
  (:func:`quant.fused.build_native`); CPU, float32 / float64. ~1 s to build, cached on disk.
* ``compile``: the reference loop, unrolled over T, compiled by ``torch.compile`` (inductor; C++ on
  CPU, Triton on GPU), dynamic in the number of neurons. Slow to compile (seconds per (T, signed,
  residual) variant), so only a fallback.
* ``triton``: a Triton kernel for CUDA tensors (float32); on CPU it runs under Triton's interpreter
  (``TRITON_INTERPRET=1``), which is how it is tested here.
* ``reference``: the PyTorch loop.

``auto`` (the default) picks, per call, ``cpp`` for CPU tensors and ``triton`` for CUDA tensors when
they are available, else ``reference``; a backend that fails to build is dropped with a one-time
warning. Unsupported inputs (other dtypes, tensors that need gradients) always take the reference
path. :class:`~snn.neuron.IFNeuron` uses this dispatcher by default (its ``backend`` hook overrides it),
so every converted network runs the fused loop; :func:`snn.optimize` adds the graph-level fusions.
"""
from __future__ import annotations

import ctypes
import os
import string
from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from quant.fused import (build_native, dense_same_layout, like_layout, native_ok, num_threads, ptr,
                         warn_once)

from .neuron import DEFAULT_NEG_TOL, IFNeuron, if_multistep, if_step

BACKENDS = ("auto", "cpp", "compile", "triton", "reference")

# ----------------------------------------------------------------------------------------------
# C / OpenMP kernels
# ----------------------------------------------------------------------------------------------
_IF_TEMPLATE = r"""
/* One layer over T steps (flags SIGNED / RES / VIN / VOUT substituted as literals per variant):
   out[t*N + i] = spike(t) * scale; V0 = theta/2 and n0 = 0 unless VIN. */
void fsnn_if_$S$V(const $R* cur, const $R* res, $R* out, int64_t N, int T, double theta_, double neg_,
                  const $R* vin, const $R* nin, $R* vout, $R* nout, double scale_, int nt) {
    const $R theta = ($R)theta_, neg = ($R)neg_, scale = ($R)scale_;
    const int64_t nb = (N + BLK - 1) / BLK;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t i0 = b * BLK, len = N - i0 < BLK ? N - i0 : BLK;
        $R v[BLK], n[BLK];
        const $R half = ($R)0.5 * theta;
        for (int64_t j = 0; j < len; j++) {
            v[j] = $VIN ? vin[i0 + j] : half;
            n[j] = ($VIN && $SIGNED) ? nin[i0 + j] : ($R)0;
        }
        for (int t = 0; t < T; t++) {
            const $R* a = cur + (int64_t)t * N + i0;
            const $R* r = $RES ? res + (int64_t)t * N + i0 : a;
            $R* o = out + (int64_t)t * N + i0;
#pragma omp simd
            for (int64_t j = 0; j < len; j++) {
                $R x = $RES ? a[j] + r[j] : a[j];
                $R vv = v[j] + x;                              /* V <- V + I (+ residual, added first) */
                const $R p = vv >= theta ? ($R)1 : ($R)0;      /* positive spike */
                vv = vv >= theta ? vv - theta : vv;            /* reset by subtraction */
                $R sp = p;
                if ($SIGNED) {
                    const $R nn = n[j];
                    const int ng = (vv < neg) & (nn > ($R)0);  /* negative spike, only if n > 0 */
                    vv = ng ? vv + theta : vv;
                    sp = p - (ng ? ($R)1 : ($R)0);
                    n[j] = nn + sp;
                }
                v[j] = vv;
                o[j] = sp * scale;
            }
        }
        if ($VOUT) {
            for (int64_t j = 0; j < len; j++) vout[i0 + j] = v[j];
            if ($SIGNED) for (int64_t j = 0; j < len; j++) nout[i0 + j] = n[j];
        }
    }
}
"""

_CONST_TEMPLATE = r"""
/* Constant current, closed form of snn.neuron.if_constant: out[t] = (n_{t0+t+1} - n_{t0+t}) * scale,
   n_k = floor(clamp(cur / theta, 0, 1) * k + 0.5). Same flat layout in and out. */
void fsnn_if_const_$S(const $R* cur, $R* out, int64_t N, int t0, int steps, double theta_, double scale_, int nt) {
    const $R theta = ($R)theta_, scale = ($R)scale_;
    int64_t nb = (N + BLK - 1) / BLK;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        int64_t i0 = b * BLK, len = N - i0 < BLK ? N - i0 : BLK;
        $R u[BLK], prev[BLK];
        const $R k0 = ($R)t0;
#pragma omp simd
        for (int64_t j = 0; j < len; j++) {
            $R x = cur[i0 + j] / theta;
            x = x < ($R)0 ? ($R)0 : (x > ($R)1 ? ($R)1 : x);
            u[j] = x;
            prev[j] = $FLOOR(x * k0 + ($R)0.5);
        }
        for (int t = 0; t < steps; t++) {
            const $R k = ($R)(t0 + t + 1);
            $R* o = out + (int64_t)t * N + i0;
#pragma omp simd
            for (int64_t j = 0; j < len; j++) {
                $R nx = $FLOOR(u[j] * k + ($R)0.5);
                o[j] = (nx - prev[j]) * scale;
                prev[j] = nx;
            }
        }
    }
}

/* The same from an NCHW current [B, C, HW] into a channels-last train: out[t*N + (b*HW + hw)*C + c]
   (tiles of hwb pixels x C channels are transposed in L1). */
void fsnn_if_const_cl_$S(const $R* cur, $R* out, int64_t B, int64_t C, int64_t HW, int t0, int steps,
                         double theta_, double scale_, int nt) {
    const $R theta = ($R)theta_, scale = ($R)scale_;
    const int64_t N = B * C * HW;
    int64_t hwb = BLK / C;
    if (hwb < 1) hwb = 1;
    if (hwb > HW) hwb = HW;
    const int64_t ntile = (HW + hwb - 1) / hwb;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t job = 0; job < B * ntile; job++) {
        const int64_t b = job / ntile, h0 = (job % ntile) * hwb;
        const int64_t len = HW - h0 < hwb ? HW - h0 : hwb, m = len * C;
        $R tile_u[m], tile_p[m];   /* [len][C], at most max(BLK, C) elements */
        const $R k0 = ($R)t0;
        for (int64_t c = 0; c < C; c++) {
            const $R* src = cur + (b * C + c) * HW + h0;
            for (int64_t h = 0; h < len; h++) {
                $R x = src[h] / theta;
                x = x < ($R)0 ? ($R)0 : (x > ($R)1 ? ($R)1 : x);
                tile_u[h * C + c] = x;
                tile_p[h * C + c] = $FLOOR(x * k0 + ($R)0.5);
            }
        }
        for (int t = 0; t < steps; t++) {
            const $R k = ($R)(t0 + t + 1);
            $R* o = out + (int64_t)t * N + (b * HW + h0) * C;
#pragma omp simd
            for (int64_t i = 0; i < m; i++) {
                $R nx = $FLOOR(tile_u[i] * k + ($R)0.5);
                o[i] = (nx - tile_p[i]) * scale;
                tile_p[i] = nx;
            }
        }
    }
}
"""

_TYPES = (("f32", "float", "floorf"), ("f64", "double", "floor"))
_VARIANTS = [(sg, rs, vi, vo) for sg in (0, 1) for rs in (0, 1) for vi in (0, 1) for vo in (0, 1)]


def _variant(signed, res, vin, vout) -> str:
    return f"_s{int(signed)}r{int(res)}i{int(vin)}o{int(vout)}"


_IF_SRC = "#include <math.h>\n#include <stdint.h>\n#define BLK 2048\n" + "".join(
    string.Template(_IF_TEMPLATE).substitute(S=s, R=r, V=_variant(*fl), SIGNED=fl[0], RES=fl[1], VIN=fl[2],
                                             VOUT=fl[3])
    for s, r, _ in _TYPES for fl in _VARIANTS) + "".join(
    string.Template(_CONST_TEMPLATE).substitute(S=s, R=r, FLOOR=f) for s, r, f in _TYPES)

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_LIB = None
_LIB_TRIED = False


def _lib():
    """The compiled kernels as a dict: ``("if", suffix, variant)``, ``("const", suffix)``,
    ``("const_cl", suffix)`` -> ctypes function; ``None`` without a compiler."""
    global _LIB, _LIB_TRIED
    if not _LIB_TRIED:
        _LIB_TRIED = True
        lib = build_native("fsnn_if", _IF_SRC)
        fns = None
        if lib is not None:
            V, I64, I, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
            fns = {}
            for suf in _SUFFIX.values():
                for fl in _VARIANTS:
                    f = getattr(lib, "fsnn_if_" + suf + _variant(*fl))
                    f.restype = None
                    f.argtypes = [V, V, V, I64, I, D, D, V, V, V, V, D, I]
                    fns[("if", suf, _variant(*fl))] = f
                g = getattr(lib, "fsnn_if_const_" + suf)
                g.restype = None
                g.argtypes = [V, V, I64, I, I, D, D, I]
                fns[("const", suf)] = g
                h = getattr(lib, "fsnn_if_const_cl_" + suf)
                h.restype = None
                h.argtypes = [V, V, I64, I64, I64, I, I, D, D, I]
                fns[("const_cl", suf)] = h
            fns["_lib"] = lib  # keep the library loaded
        _LIB = fns
    return _LIB


def cpp_available() -> bool:
    return _lib() is not None


# ----------------------------------------------------------------------------------------------
# torch.compile backend
# ----------------------------------------------------------------------------------------------
def _loop(cur, res, v, n, theta, neg_level, scale, signed: bool):
    """The reference loop on ``[T, N]`` (+ residual), output multiplied by ``scale`` (0-dim tensors)."""
    outs = []
    for t in range(cur.shape[0]):
        s, v, n = if_step(v, n, cur[t] + res[t] if res is not None else cur[t], theta, neg_level, signed)
        outs.append(s * scale)
    return torch.stack(outs), v, n


def _loop_fresh(cur, res, theta, neg_level, scale, signed: bool):
    """:func:`_loop` from V0 = theta/2, n0 = 0, returning only the output train."""
    v = torch.zeros_like(cur[0]) + theta * 0.5
    return _loop(cur, res, v, torch.zeros_like(v), theta, neg_level, scale, signed)[0]


_COMPILED = {}
_COMPILE_FAILED = False


def _compiled(fresh: bool):
    if fresh not in _COMPILED:
        _COMPILED[fresh] = torch.compile(_loop_fresh if fresh else _loop, dynamic=True, fullgraph=True)
    return _COMPILED[fresh]


# ----------------------------------------------------------------------------------------------
# Triton backend (CUDA; CPU under TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------
_TRITON = {}
tl = None  # triton.language, imported on first use


def triton_kernel():
    """Build (once) the Triton IF kernel. With ``TRITON_INTERPRET=1`` set before Triton is first
    imported, it runs on CPU tensors under Triton's interpreter (that is how the tests check it)."""
    if "k" in _TRITON:
        return _TRITON["k"]
    global tl  # the interpreter patches the kernel's *global* `tl`
    import triton
    import triton.language as tl

    @triton.jit
    def _if_triton(cur, res, out, vin, nin, vout, nout, N, theta, neg_level, scale,
                   T: tl.constexpr, SIGNED: tl.constexpr, RES: tl.constexpr, VIN: tl.constexpr,
                   VOUT: tl.constexpr, BLOCK: tl.constexpr):
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
    _TRITON["k"] = _if_triton
    return _if_triton


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _run_triton(kernel, cur, res, out, vin, nin, vout, nout, N, T, theta, neg_level, scale, signed):
    BLOCK = 1024
    grid = (max(1, (N + BLOCK - 1) // BLOCK),)
    dummy = cur  # unused pointer arguments still need a tensor
    kernel[grid](cur, res if res is not None else dummy, out, vin if vin is not None else dummy,
                 nin if nin is not None else dummy, vout if vout is not None else dummy,
                 nout if nout is not None else dummy, N, float(theta), float(neg_level), float(scale),
                 T=T, SIGNED=bool(signed), RES=res is not None, VIN=vin is not None, VOUT=vout is not None,
                 BLOCK=BLOCK)


# ----------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------
def default_backend() -> str:
    name = os.environ.get("FASTSNN_KERNEL", "auto").lower()
    if name not in BACKENDS:
        warn_once("env:" + name, f"FASTSNN_KERNEL={name!r} is unknown (use one of {BACKENDS}): using 'auto'")
        name = "auto"
    return name


def neg_level_of(theta: torch.Tensor, neg_tol: float) -> torch.Tensor:
    """The negative-spike level exactly as the reference computes it."""
    return -neg_tol * theta


def _resolve(name: str, cur: torch.Tensor) -> str:
    if name == "auto":  # torch.compile is never picked automatically: it needs the same compiler as cpp
        if cur.device.type == "cpu" and cpp_available():
            return "cpp"
        if cur.device.type == "cuda" and _triton_ok():
            return "triton"
        return "reference"
    return name


def if_steps(cur: torch.Tensor, theta: torch.Tensor, signed: bool, neg_tol: float = DEFAULT_NEG_TOL,
             residual: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
             n: Optional[torch.Tensor] = None, state: bool = True, scale: Optional[float] = None,
             out: Optional[torch.Tensor] = None, backend: Optional[str] = None, levels: Optional[tuple] = None
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fused IF layer over ``T = cur.shape[0]`` steps.

    ``cur``: input currents ``[T, ...]``; ``residual``: a second current of the same shape, added to
    ``cur`` first; ``v`` / ``n``: initial membrane / net count ``[...]`` (``None``: ``theta/2`` / 0);
    ``state``: also return the final ``v`` / ``n`` (else ``None``); ``scale``: multiply the spikes
    (``None``: 1 -> spikes in {-1, 0, 1}; ``theta`` -> the layer's output train); ``out``: a buffer
    for the result (may be ``cur``: in place; the compile backend then returns a new tensor instead).
    Returns ``(spikes * scale, v, n)``; ``n`` is ``None`` for unsigned neurons. ``levels``:
    ``threshold_floats(theta, cur.dtype, neg_tol)``, if already known.
    """
    name = _resolve(backend or default_backend(), cur)
    theta = theta.detach()
    if name == "cpp":
        done = _run_cpp(cur, theta, signed, neg_tol, residual, v, n, state, scale, out, levels)
        if done is not None:
            return done
    elif name == "triton":
        done = _run_triton_checked(cur, theta, signed, neg_tol, residual, v, n, state, scale, out)
        if done is not None:
            return done
    elif name == "compile":
        done = _run_compiled(cur, theta, signed, neg_tol, residual, v, n, state, scale, out)
        if done is not None:
            return done
    return _run_reference(cur, theta, signed, neg_tol, residual, v, n, state, scale, out)


def _init_state(cur, theta, signed, v, n):
    if v is None:
        v = torch.full_like(cur[0], 0.5) * theta
        n = torch.zeros_like(cur[0]) if signed else None
    elif signed and n is None:
        n = torch.zeros_like(cur[0])
    return v, n


def _run_reference(cur, theta, signed, neg_tol, residual, v, n, state, scale, out):
    v, n = _init_state(cur, theta, signed, v, n)
    x = cur if residual is None else cur + residual
    s, v, n = if_multistep(x, theta, v, n if signed else None, signed, neg_tol)
    if scale is not None:
        s = s * scale
    if out is not None:
        out.copy_(s)
        s = out
    return s, (v if state else None), (n if state and signed else None)


def _prepare(cur, residual, v, n, out, signed):
    """Bring every operand into ``cur``'s dense layout (copies only where they differ)."""
    if not dense_same_layout(cur):
        cur = cur.contiguous()
    if residual is not None:
        residual = like_layout(residual, cur)
    if out is not None and not dense_same_layout(cur, out):
        out = None
    if v is not None:
        v = like_layout(v, cur[0])
        if signed and n is not None:
            n = like_layout(n, cur[0])
    return cur, residual, v, n, out


def threshold_floats(theta: torch.Tensor, dtype: torch.dtype, neg_tol: float) -> Tuple[float, float]:
    """``(theta, -neg_tol * theta)`` as the Python floats the kernels get, rounded exactly as the
    reference computes them in ``dtype``."""
    th = theta.detach().to(dtype)
    return th.item(), neg_level_of(th, neg_tol).item()


def _buffers(cur, residual, v, n, out, signed, state):
    """The native backends' operands: contiguous inputs, a zero net count for a carried signed state
    without one, the output and (``state``) final-state buffers, ``T`` and neurons per step ``N``."""
    cur, residual, v, n, out = _prepare(cur, residual, v, n, out, signed)
    if signed and v is not None and n is None:
        n = torch.zeros_like(v)
    T = cur.shape[0]
    N = cur[0].numel() if T > 0 else 0
    out = torch.empty_like(cur) if out is None else out
    vout = torch.empty_like(cur[0]) if state else None
    nout = torch.empty_like(cur[0]) if state and signed else None
    return cur, residual, v, n, out, vout, nout, T, N


def _run_cpp(cur, theta, signed, neg_tol, residual, v, n, state, scale, out, levels=None):
    lib = _lib()
    ops = [cur, theta] + [t for t in (residual, v, n, out) if t is not None]
    if lib is None or not native_ok(*ops) or torch.compiler.is_compiling() or cur.dim() < 1:
        return None
    cur, residual, v, n, out, vout, nout, T, N = _buffers(cur, residual, v, n, out, signed, state)
    th, neg = levels if levels is not None else threshold_floats(theta, cur.dtype, neg_tol)
    sc = 1.0 if scale is None else float(scale)
    if N > 0 and T > 0:
        fn = lib[("if", _SUFFIX[cur.dtype], _variant(signed, residual is not None, v is not None, state))]
        fn(ptr(cur), ptr(residual), ptr(out), N, T, th, neg, ptr(v), ptr(n if signed else None),
           ptr(vout), ptr(nout), sc, num_threads(N * T))
    elif state:
        vi, ni = _init_state(cur, theta.to(cur.dtype), signed, v, n)
        vout.copy_(vi)
        if signed:
            nout.copy_(ni)
    return out, vout, nout


def cpp_if_fast(current: torch.Tensor, residual: Optional[torch.Tensor], steps: int, signed: bool,
                levels: Tuple[float, float], inplace: bool, backend: Optional[str] = None) -> Optional[torch.Tensor]:
    """The C kernel on a folded ``[steps*B, ...]`` current from a fresh state, output ``theta * spikes``
    in the current's layout (in place if asked), no final state; ``None`` when it does not apply (then
    use :func:`if_steps`)."""
    if current.device.type != "cpu" or current.dtype not in _SUFFIX or (backend or default_backend()) not in (
            "auto", "cpp"):
        return None
    lib = _LIB if _LIB_TRIED else _lib()
    if lib is None or (torch.is_grad_enabled() and (
            current.requires_grad or (residual is not None and residual.requires_grad))):
        return None
    if not (current.is_contiguous() or (current.dim() == 4 and current.is_contiguous(
            memory_format=torch.channels_last))):
        return None
    if residual is not None and (residual.dtype != current.dtype or residual.shape != current.shape
                                 or residual.stride() != current.stride()):
        return None
    N = current.numel() // steps
    if N * steps != current.numel() or N == 0 or torch.compiler.is_compiling():
        return None
    out = current if inplace else torch.empty_like(current)
    fn = lib[("if", _SUFFIX[current.dtype], _variant(signed, residual is not None, False, False))]
    fn(current.data_ptr(), residual.data_ptr() if residual is not None else None, out.data_ptr(), N, steps,
       levels[0], levels[1], None, None, None, None, levels[0], num_threads(N * steps))
    return out


def _run_compiled(cur, theta, signed, neg_tol, residual, v, n, state, scale, out):
    global _COMPILE_FAILED
    if _COMPILE_FAILED or (torch.is_grad_enabled() and cur.requires_grad) or cur.dim() < 1 or cur.shape[0] == 0:
        return None
    cur, residual, v, n, _ = _prepare(cur, residual, v, n, None, signed)
    T, N = cur.shape[0], cur[0].numel()
    flat = lambda t, shape: t.as_strided(shape, (shape[1], 1) if len(shape) == 2 else (1,))  # noqa: E731
    th = theta.to(cur.dtype)
    sc = th.new_tensor(1.0 if scale is None else float(scale))
    neg = neg_level_of(th, neg_tol)
    res = flat(residual, (T, N)) if residual is not None else None
    try:
        if v is None and not state:  # fresh state, no state out: the lean variant
            s = _compiled(True)(flat(cur, (T, N)), res, th, neg, sc, bool(signed))
            v2 = n2 = None
        else:
            v, n = _init_state(cur, th, signed, v, n)
            s, v2, n2 = _compiled(False)(flat(cur, (T, N)), res, flat(v, (N,)), flat(n if signed else v, (N,)),
                                         th, neg, sc, bool(signed))
    except Exception as e:  # noqa: BLE001 - no compiler, unsupported platform ...
        _COMPILE_FAILED = True
        warn_once("compile", f"fast-snn: torch.compile of the IF kernel failed ({type(e).__name__}: "
                  f"{str(e)[:300]}); using the reference loop")
        return None
    # the flat [T, N] result has cur's memory order: view it with cur's strides (no copy)
    s = s.as_strided(cur.size(), cur.stride())
    if out is not None and out.data_ptr() != cur.data_ptr():
        out.copy_(s)
        s = out
    if state:
        v2 = v2.as_strided(cur[0].size(), cur[0].stride())
        n2 = n2.as_strided(cur[0].size(), cur[0].stride()) if signed else None
    return s, v2, n2


_TRITON_OK = {}  # device -> passed the one-time self-check


def _triton_selfcheck(kernel, device) -> bool:
    """Once per device: the Triton kernel against the reference loop on random currents with exact
    ties (signed and unsigned, with state and residual); a mismatch or a failure disables it."""
    key = str(device)
    if key not in _TRITON_OK:
        _TRITON_OK[key] = False
        try:
            g = torch.Generator().manual_seed(0)
            theta = torch.tensor(0.75)
            cur = torch.randn(5, 3001, generator=g) * 0.6
            m = torch.rand(cur.shape, generator=g) < 0.3
            cur[m] = (torch.randint(-4, 5, cur.shape, generator=g).float() * 0.1875)[m]
            res = torch.randn(cur.shape, generator=g) * 0.2
            ok = True
            for signed in (True, False):
                v0 = torch.full_like(cur[0], 0.375)
                n0 = torch.zeros_like(cur[0])
                ref = if_multistep(cur + res, theta, v0, n0 if signed else None, signed)
                d = [t.to(device) if t is not None else None for t in (cur, res, v0, n0)]
                out, vv, nn_ = torch.empty_like(d[0]), torch.empty_like(d[2]), torch.empty_like(d[3])
                _run_triton(kernel, d[0], d[1], out, d[2], d[3] if signed else None, vv, nn_ if signed else None,
                            d[0][0].numel(), 5, 0.75, float(neg_level_of(theta, DEFAULT_NEG_TOL)), 1.0, signed)
                ok = ok and torch.equal(out.cpu(), ref[0]) and torch.equal(vv.cpu(), ref[1])
            _TRITON_OK[key] = bool(ok)
            if not ok:
                warn_once("triton-mismatch", f"fast-snn: the Triton IF kernel disagrees with the reference on {key}; "
                          "using the reference loop there")
        except Exception as e:  # noqa: BLE001 - compilation / launch failure: use the fallback
            warn_once("triton-fail", f"fast-snn: the Triton IF kernel failed on {key} ({type(e).__name__}: "
                      f"{str(e)[:300]}); using the reference loop there")
    return _TRITON_OK[key]


def _run_triton_checked(cur, theta, signed, neg_tol, residual, v, n, state, scale, out):
    if cur.dtype != torch.float32 or (torch.is_grad_enabled() and cur.requires_grad) or cur.dim() < 1:
        return None
    if cur.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return None
    try:
        kernel = triton_kernel()
    except Exception as e:  # noqa: BLE001
        warn_once("triton", f"fast-snn: Triton IF kernel unavailable ({type(e).__name__}: {e}); falling back")
        return None
    if not _triton_selfcheck(kernel, cur.device):
        return None
    cur, residual, v, n, out, vout, nout, T, N = _buffers(cur, residual, v, n, out, signed, state)
    th = theta.to(cur.dtype)
    neg = neg_level_of(th, neg_tol).item()
    if N > 0:
        _run_triton(kernel, cur, residual, out, v, n if signed else None, vout, nout, N, T, th.item(), neg,
                    1.0 if scale is None else float(scale), signed)
    return out, vout, nout


def if_const_steps(current: torch.Tensor, theta: torch.Tensor, t0: int, steps: int,
                   scale: Optional[float] = None, channels_last: bool = False,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Closed form of a constant-current IF layer (:func:`snn.neuron.if_constant`) in one pass:
    returns the folded train ``[steps*B, ...]`` of ``spikes * scale`` (``scale=None``: spikes), in
    channels-last layout if asked (4-D), bit-identical to ``if_constant(...) / theta * scale``."""
    name = _resolve(backend or default_backend(), current)
    theta = theta.detach()
    lib = _lib() if name == "cpp" else None
    B = current.shape[0]
    if lib is not None and native_ok(current, theta) and not torch.compiler.is_compiling():
        cl = torch.channels_last
        shape = (steps * B,) + tuple(current.shape[1:])
        suf = _SUFFIX[current.dtype]
        th = float(theta.to(current.dtype))
        sc = 1.0 if scale is None else float(scale)
        N = current.numel()
        nt = num_threads(N * steps)
        if current.dim() == 4 and (channels_last or (current.is_contiguous(memory_format=cl)
                                                     and not current.is_contiguous())):
            out = torch.empty(shape, dtype=current.dtype, device=current.device, memory_format=cl)
            if N > 0 and steps > 0:
                if current.is_contiguous():  # NCHW in, channels-last out: transposed in the kernel
                    C = current.shape[1]
                    lib[("const_cl", suf)](ptr(current), ptr(out), B, C, N // max(B * C, 1), int(t0), int(steps),
                                           th, sc, nt)
                else:
                    cur = current.contiguous(memory_format=cl)
                    lib[("const", suf)](ptr(cur), ptr(out), N, int(t0), int(steps), th, sc, nt)
            return out
        cur = current.contiguous()
        out = torch.empty(shape, dtype=cur.dtype, device=cur.device)
        if N > 0 and steps > 0:
            lib[("const", suf)](ptr(cur), ptr(out), N, int(t0), int(steps), th, sc, nt)
        return out
    from .neuron import if_constant
    s = if_constant(current, theta, t0, steps)
    s = s / theta if scale is None else (s if _is_theta(scale, theta) else s / theta * scale)
    if channels_last and s.dim() == 4:
        s = s.contiguous(memory_format=torch.channels_last)
    return s


def _is_theta(scale, theta) -> bool:
    return float(scale) == float(theta)


# ----------------------------------------------------------------------------------------------
# the IFNeuron.backend hook
# ----------------------------------------------------------------------------------------------
def reference_backend(cur, theta, v, n, signed, neg_tol=DEFAULT_NEG_TOL):
    """The plain PyTorch loop, as an :attr:`IFNeuron.backend`."""
    return if_multistep(cur, theta, v, n, signed, neg_tol)


def make_backend(name: Optional[str] = None) -> Callable:
    """A function for :attr:`snn.neuron.IFNeuron.backend`: ``(cur, theta, v, n, signed, neg_tol) ->
    (spikes in {-1, 0, 1}, v, n)`` through kernel ``name`` (``None``: ``FASTSNN_KERNEL`` / auto)."""
    if name == "reference":
        return reference_backend

    def backend(cur, theta, v, n, signed, neg_tol=DEFAULT_NEG_TOL):
        return if_steps(cur, theta, signed, neg_tol, v=v, n=n, state=True, backend=name)
    backend.kernel = name or "auto"
    return backend


def enable(net: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Pin every IF neuron of ``net`` (a :class:`~snn.SpikingNetwork` or any module) to one backend
    (``"reference"``: the PyTorch loop). Without it neurons use the ``FASTSNN_KERNEL`` dispatcher."""
    for m in net.modules():
        if isinstance(m, IFNeuron):
            m.backend = make_backend(backend)
    return net


def disable(net: nn.Module) -> nn.Module:
    """Back to the default dispatcher (``FASTSNN_KERNEL``, auto)."""
    for m in net.modules():
        if isinstance(m, IFNeuron):
            m.backend = None
    return net


# ----------------------------------------------------------------------------------------------
# statistics: non-zero inputs per spatial position (the Monitor's exact SOP count)
# ----------------------------------------------------------------------------------------------
_NZ_TEMPLATE = r"""
/* out[j] = number of non-zero x over all rows at spatial position j.
   NCHW: x = [rows = N*C][hw];  NHWC: x = [n][hw][c]. Per-thread int32 partial counts. */
void fsnn_nz_nchw_$S(const $R* x, int64_t rows, int64_t hw, int64_t* out, int nt) {
    for (int64_t j = 0; j < hw; j++) out[j] = 0;
#pragma omp parallel num_threads(nt)
    {
        int32_t* acc = (int32_t*)calloc((size_t)hw, sizeof(int32_t));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const $R* p = x + r * hw;
#pragma omp simd
            for (int64_t j = 0; j < hw; j++) acc[j] += p[j] != ($R)0;
        }
#pragma omp critical
        for (int64_t j = 0; j < hw; j++) out[j] += acc[j];
        free(acc);
    }
}
void fsnn_nz_nhwc_$S(const $R* x, int64_t n, int64_t hw, int64_t c, int64_t* out, int nt) {
    for (int64_t j = 0; j < hw; j++) out[j] = 0;
#pragma omp parallel num_threads(nt)
    {
        int32_t* acc = (int32_t*)calloc((size_t)hw, sizeof(int32_t));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n; b++) {
            for (int64_t j = 0; j < hw; j++) {
                const $R* p = x + (b * hw + j) * c;
                int32_t k = 0;
#pragma omp simd reduction(+:k)
                for (int64_t q = 0; q < c; q++) k += p[q] != ($R)0;
                acc[j] += k;
            }
        }
#pragma omp critical
        for (int64_t j = 0; j < hw; j++) out[j] += acc[j];
        free(acc);
    }
}
"""
_NZ_SRC = "#include <stdint.h>\n#include <stdlib.h>\n" + "".join(
    string.Template(_NZ_TEMPLATE).substitute(S=s, R=r) for s, r, _ in _TYPES)
_NZ = {}


def _nz_lib():
    if "lib" not in _NZ:
        lib = build_native("fsnn_nz", _NZ_SRC)
        if lib is not None:
            V, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            for suf in _SUFFIX.values():
                getattr(lib, "fsnn_nz_nchw_" + suf).argtypes = [V, I64, I64, V, I]
                getattr(lib, "fsnn_nz_nhwc_" + suf).argtypes = [V, I64, I64, I64, V, I]
        _NZ["lib"] = lib
    return _NZ["lib"]


def nonzero_per_position(x: torch.Tensor) -> torch.Tensor:
    """Count of non-zero entries of a 4-d ``[N, C, H, W]`` tensor at each spatial position, summed
    over N and C (int64 ``[H, W]``): one pass (C / OpenMP kernel on CPU float tensors, contiguous or
    channels-last), else ``torch.count_nonzero``."""
    N, C, H, W = x.shape
    lib = _nz_lib() if default_backend() != "reference" and x.device.type == "cpu" and x.dtype in _SUFFIX else None
    if lib is not None and x.numel() > 0:
        out = torch.empty(H, W, dtype=torch.int64)
        suf = _SUFFIX[x.dtype]
        if x.is_contiguous():
            getattr(lib, "fsnn_nz_nchw_" + suf)(ptr(x), N * C, H * W, ptr(out), num_threads(x.numel()))
            return out
        if x.is_contiguous(memory_format=torch.channels_last):
            getattr(lib, "fsnn_nz_nhwc_" + suf)(ptr(x), N, H * W, C, ptr(out), num_threads(x.numel()))
            return out
    return torch.count_nonzero(x, dim=(0, 1))


__all__ = ["BACKENDS", "if_steps", "if_const_steps", "make_backend", "reference_backend", "enable", "disable",
           "cpp_available", "nonzero_per_position",
           "triton_kernel", "default_backend"]
