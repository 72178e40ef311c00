"""Fused inference kernels for the quantizer, and the native-kernel builder shared with ``snn.kernels``.

Native kernels are small C files compiled once with the system C compiler (``$CC``, default ``gcc``;
``-O3 -march=native -fopenmp``, no fast-math and ``-ffp-contract=off`` so every float operation is the
one PyTorch does, in the same order) into ``$FASTSNN_CACHE/kernels`` (default
``~/.cache/fast_snn/kernels``) and loaded with :mod:`ctypes`. They take raw data pointers, so a call
costs a few microseconds, and they run on PyTorch's own OpenMP runtime and thread count. Without a
compiler (or when the build fails) everything falls back to plain PyTorch, with one warning.

Quantizer inference (``torch.no_grad``): :func:`act_quant_infer` computes the quantized ReLU
``floor(clamp(x / alpha, 0, 1) * n + 1/2) * (alpha / n)`` in one pass over memory, bit-identical to
:func:`quant.functional.act_quant` (round half up). ``QuantAct`` uses it automatically when no gradient
is needed.

:func:`optimize_ann` returns an inference copy of a quantized ANN: quantized weights computed once,
eval-mode BatchNorm folded into the preceding conv / linear, a residual addition fused into the
quantizer that follows it, channels-last layout for the convolutions. It equals the ANN up to float
rounding (BN folding changes the last bit of a pre-activation; a level can differ only where the
pre-activation lies within ~1e-6 of a rounding boundary).
"""
from __future__ import annotations

import copy
import ctypes
import hashlib
import operator
import os
import platform
import shutil
import string
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .functional import FULL_PRECISION, act_levels, act_quant_levels, num_levels
from .layers import WEIGHT_LAYERS, QuantAct

# ----------------------------------------------------------------------------------------------
# native builder
# ----------------------------------------------------------------------------------------------
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=off",
          "-fno-math-errno", "-fno-trapping-math"]
_LIBS: Dict[str, Optional[ctypes.CDLL]] = {}
_LOCK = threading.Lock()
_WARNED = set()


def warn_once(key: str, msg: str):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def cache_dir() -> str:
    root = os.environ.get("FASTSNN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fast_snn")
    return os.path.join(root, "kernels")


def _host_id() -> str:
    """CPU model + flags (the library is built with -march=native) and the compiler's version."""
    parts = [platform.machine(), sys.platform]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    parts.append(line.strip())
                if len(parts) >= 4:
                    break
    except OSError:
        pass
    return "|".join(parts)


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC", "gcc")
    return shutil.which(cc)


def build_native(name: str, source: str) -> Optional[ctypes.CDLL]:
    """Compile ``source`` (C) into a shared library, cached by content, and load it; ``None`` (with
    one warning) when there is no compiler or the build fails."""
    with _LOCK:
        if name in _LIBS:
            return _LIBS[name]
        lib = None
        cc = _compiler()
        if cc is None:
            warn_once("cc", "fast-snn: no C compiler found ($CC / gcc): using the plain PyTorch kernels")
        else:
            try:
                lib = _build(cc, name, source)
            except Exception as e:  # noqa: BLE001 - any failure means: use the fallback
                warn_once("build:" + name, f"fast-snn: building native kernel '{name}' failed "
                          f"({type(e).__name__}: {str(e)[:500]}); using the plain PyTorch kernels")
                lib = None
        _LIBS[name] = lib
        return lib


def _build(cc: str, name: str, source: str) -> ctypes.CDLL:
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except Exception:  # noqa: BLE001
        ver = ""
    key = hashlib.sha256("\0".join([source, " ".join(CFLAGS), ver, _host_id()]).encode()).hexdigest()[:16]
    d = cache_dir()
    try:
        os.makedirs(d, exist_ok=True)
        probe = os.path.join(d, ".w")
        open(probe, "a").close()
    except OSError:
        d = os.path.join(tempfile.gettempdir(), f"fast_snn_kernels_{os.getuid() if hasattr(os, 'getuid') else 0}")
        os.makedirs(d, exist_ok=True)
    so = os.path.join(d, f"{name}_{key}.so")
    if not os.path.exists(so):
        with tempfile.TemporaryDirectory(dir=d) as tmp:
            src = os.path.join(tmp, name + ".c")
            with open(src, "w") as f:
                f.write(source)
            out = os.path.join(tmp, name + ".so")
            r = subprocess.run([cc, *CFLAGS, src, "-o", out, "-lm"], capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(r.stderr.strip() or r.stdout.strip())
            os.replace(out, so)  # atomic: concurrent builders agree on the content
    return ctypes.CDLL(so)


_MALLOC_TUNED = False


def tune_malloc(threshold: int = 1 << 30) -> bool:
    """Keep freed large tensors in the process heap (glibc only; process-wide, opt-in).

    By default glibc returns freed blocks above a (dynamic) threshold to the OS and the next forward
    pass page-faults them back in -- for a ResNet-20 SNN at T = 3, batch 64, ~50 MB / 13k page
    faults per forward, ~15 % of its time. Raising ``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD`` keeps
    them (the resident size then stays at its peak). The same as ``MALLOC_MMAP_THRESHOLD_`` /
    ``MALLOC_TRIM_THRESHOLD_`` in the environment, or an allocator such as jemalloc / tcmalloc.
    Returns whether it was applied."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        ok = libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1 or \
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1  # older glibc caps it at 32 MB
        ok = ok and libc.mallopt(M_TRIM_THRESHOLD, 2 * int(threshold)) == 1
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = bool(ok)
    return _MALLOC_TUNED


def num_threads(numel: int) -> int:
    """OpenMP threads for an elementwise kernel over ``numel`` elements (1 for small tensors)."""
    return 1 if numel < 32768 else max(1, torch.get_num_threads())


def dense_same_layout(*ts: torch.Tensor) -> bool:
    """All tensors dense (non-overlapping, no gaps) with identical strides: one flat index fits all."""
    ref = ts[0]
    if not _dense(ref):
        return False
    return all(t.shape == ref.shape and _same_strides(t, ref) for t in ts[1:])


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides, ignoring size-1 dimensions (their stride is arbitrary)."""
    return all(sa == sb or n == 1 for sa, sb, n in zip(a.stride(), b.stride(), a.shape))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense in *some* dimension order (contiguous, channels-last, a [T, B, ...]
    view of either ...): the elements fill ``numel`` consecutive slots, so one flat index walks them."""
    if t.is_contiguous():
        return True
    expected = 1
    for st, n in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if st != expected:
            return False
        expected *= n
    return True


def like_layout(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` copied (if needed) into the memory layout (strides) of the dense tensor ``ref``."""
    if _same_strides(t, ref) or t.numel() <= 1:
        return t
    if ref.is_contiguous():
        return t.contiguous()
    out = torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def ptr(t: Optional[torch.Tensor]):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


# ----------------------------------------------------------------------------------------------
# activation quantizer kernel
# ----------------------------------------------------------------------------------------------
_ACT_SRC = r"""
#include <math.h>
#include <stdint.h>

/* out = floor(clamp((x [+ r]) / alpha, 0, 1) * n + 0.5) * step   -- the order of quant.act_levels */
#define DEFINE_ACT(SUF, REAL, FLOOR)                                                              \
static inline REAL act_##SUF(REAL v, REAL alpha, REAL n, REAL step) {                            \
    REAL u = v / alpha;                                                                           \
    u = u < (REAL)0 ? (REAL)0 : (u > (REAL)1 ? (REAL)1 : u);                                      \
    return FLOOR(u * n + (REAL)0.5) * step;                                                       \
}                                                                                                 \
void fsnn_act_quant_##SUF(const REAL* x, const REAL* r, REAL* out, int64_t N, double alpha_,      \
                          double n_, double step_, int nt) {                                      \
    const REAL alpha = (REAL)alpha_, n = (REAL)n_, step = (REAL)step_;                            \
    if (r) {                                                                                      \
        _Pragma("omp parallel for simd num_threads(nt) schedule(static)")                         \
        for (int64_t i = 0; i < N; i++) out[i] = act_##SUF(x[i] + r[i], alpha, n, step);          \
    } else {                                                                                      \
        _Pragma("omp parallel for simd num_threads(nt) schedule(static)")                         \
        for (int64_t i = 0; i < N; i++) out[i] = act_##SUF(x[i], alpha, n, step);                 \
    }                                                                                             \
}
DEFINE_ACT(f32, float, floorf)
DEFINE_ACT(f64, double, floor)

/* backward of the quantized ReLU (straight-through estimator, quant.functional._ActQuant):
   gx = g * (0 <= x <= alpha);  galpha = sum(g * (y > alpha ? 1 : level / n - y / alpha)), y = max(x, 0) */
#define DEFINE_ACT_BWD(SUF, REAL, FLOOR)                                                          \
double fsnn_act_bwd_##SUF(const REAL* x, const REAL* g, REAL* gx, int64_t N, double alpha_,       \
                          double n_, int want_alpha, int nt) {                                    \
    const REAL alpha = (REAL)alpha_, n = (REAL)n_, inv_n = (REAL)(1.0 / n_);                      \
    double acc = 0.0;                                                                             \
    if (!want_alpha) {                                                                            \
        _Pragma("omp parallel for simd num_threads(nt) schedule(static)")                         \
        for (int64_t i = 0; i < N; i++) {                                                         \
            REAL xv = x[i];                                                                       \
            gx[i] = g[i] * ((xv >= (REAL)0) & (xv <= alpha) ? (REAL)1 : (REAL)0);                 \
        }                                                                                         \
        return 0.0;                                                                               \
    }                                                                                             \
    _Pragma("omp parallel for simd num_threads(nt) schedule(static) reduction(+:acc)")            \
    for (int64_t i = 0; i < N; i++) {                                                             \
        REAL xv = x[i], gv = g[i];                                                                \
        if (gx) gx[i] = gv * ((xv >= (REAL)0) & (xv <= alpha) ? (REAL)1 : (REAL)0);               \
        REAL u = xv / alpha;                                                                      \
        u = u < (REAL)0 ? (REAL)0 : (u > (REAL)1 ? (REAL)1 : u);                                  \
        REAL level = FLOOR(u * n + (REAL)0.5);                                                    \
        /* y = max(x, 0); for y <= alpha, y / alpha is the clamped u (same division) */            \
        REAL d = (xv < (REAL)0 ? (REAL)0 : xv) > alpha ? (REAL)1 : level * inv_n - u;             \
        acc += (double)(gv * d);                                                                  \
    }                                                                                             \
    return acc;                                                                                   \
}
DEFINE_ACT_BWD(f32, float, floorf)
DEFINE_ACT_BWD(f64, double, floor)
"""

_WQ_TEMPLATE = r"""
/* weight quantizer (quant.functional.weight_quant): w_hat = (w - mu) / s (s = std + eps), r = w_hat / alpha,
   v = clamp(r, -1, 1), q = sign(v) * mags[#(mids < |v|)], out = q * alpha -- the reference's operations.
   mids: the L-1 midpoints, padded with +inf to 15 when L <= 16 (a fixed trip count vectorises). */
#define WQ_Q(NAME, TRIP)                                                                            \
static inline $R NAME($R r, const $R* mids, const $R* mags, int L) {                               \
    $R v = r < ($R)-1 ? ($R)-1 : (r > ($R)1 ? ($R)1 : r);                                          \
    $R a = v < ($R)0 ? -v : v;                                                                      \
    int k = 0;                                                                                      \
    for (int j = 0; j < (TRIP); j++) k += mids[j] < a;                                              \
    $R sg = (v > ($R)0) ? ($R)1 : ((v < ($R)0) ? ($R)-1 : ($R)0);                                   \
    return sg * mags[k];                                                                            \
}
WQ_Q(wq_q16_$S, 15)
WQ_Q(wq_qn_$S, L - 1)
#undef WQ_Q

#define WQ_FWD(Q)                                                                                   \
    _Pragma("omp parallel for simd num_threads(nt) schedule(static)")                               \
    for (int64_t i = 0; i < N; i++) {                                                               \
        $R r = ((w[i] - mu) / s) / alpha;                                                           \
        out[i] = Q(r, mids, mags, L) * alpha;                                                       \
    }
void fsnn_wq_fwd_$S(const $R* w, $R* out, int64_t N, double mu_, double s_, double alpha_, const $R* mids,
                    const $R* mags, int L, int nt) {
    const $R mu = ($R)mu_, s = ($R)s_, alpha = ($R)alpha_;
    if (L <= 16) { WQ_FWD(wq_q16_$S) } else { WQ_FWD(wq_qn_$S) }
}
#undef WQ_FWD

/* backward, pass 1: sums of gh = g * (inside or pass_outside), of gh * (w - mu), and the clip's gradient
   g * (outside ? sign(r) : q - r) */
#define WQ_SUMS(Q)                                                                                  \
    _Pragma("omp parallel for simd num_threads(nt) schedule(static) reduction(+:s_g, s_gc, s_a)")   \
    for (int64_t i = 0; i < N; i++) {                                                               \
        $R c = w[i] - mu;                                                                           \
        $R r = (c / s) / alpha;                                                                     \
        $R q = Q(r, mids, mags, L);                                                                 \
        int outside = (r < ($R)0 ? -r : r) > ($R)1;                                                 \
        $R gv = g[i];                                                                               \
        $R gh = gv * ((pass_outside | !outside) ? ($R)1 : ($R)0);                                   \
        $R d = outside ? ((r > ($R)0) ? ($R)1 : ($R)-1) : q - r;                                    \
        s_g += (double)gh;                                                                          \
        s_gc += (double)gh * (double)c;                                                             \
        s_a += (double)(gv * d);                                                                    \
    }
void fsnn_wq_sums_$S(const $R* w, const $R* g, int64_t N, double mu_, double s_, double alpha_, const $R* mids,
                     const $R* mags, int L, int pass_outside, double* sums, int nt) {
    const $R mu = ($R)mu_, s = ($R)s_, alpha = ($R)alpha_;
    double s_g = 0.0, s_gc = 0.0, s_a = 0.0;
    if (L <= 16) { WQ_SUMS(wq_q16_$S) } else { WQ_SUMS(wq_qn_$S) }
    sums[0] = s_g; sums[1] = s_gc; sums[2] = s_a;
}
#undef WQ_SUMS

/* pass 2: grad_w = gh / s + k0 + k1 * (w - mu)  (standardisation backward: mean and unbiased std) */
void fsnn_wq_grad_$S(const $R* w, const $R* g, $R* gw, int64_t N, double mu_, double s_, double alpha_,
                     const $R* mids, const $R* mags, int L, int pass_outside, double k0_, double k1_, int nt) {
    const $R mu = ($R)mu_, s = ($R)s_, alpha = ($R)alpha_, k0 = ($R)k0_, k1 = ($R)k1_;
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t i = 0; i < N; i++) {
        $R c = w[i] - mu;
        $R r = (c / s) / alpha;
        int outside = (r < ($R)0 ? -r : r) > ($R)1;
        $R gh = g[i] * ((pass_outside | !outside) ? ($R)1 : ($R)0);
        gw[i] = gh / s + k0 + k1 * c;
    }
}
"""
_ACT_SRC += "".join(string.Template(_WQ_TEMPLATE).substitute(S=s_, R=r_) for s_, r_ in (("f32", "float"),
                                                                                        ("f64", "double")))

_ACT_FN = {torch.float32: "fsnn_act_quant_f32", torch.float64: "fsnn_act_quant_f64"}
_FUSED_ENABLED = os.environ.get("FASTSNN_KERNEL", "auto").lower() != "reference"


def _act_lib():
    lib = build_native("fsnn_act", _ACT_SRC)
    if lib is not None and not getattr(lib, "_typed", False):
        for fn in _ACT_FN.values():
            f = getattr(lib, fn)
            f.restype = None
            f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double,
                          ctypes.c_double, ctypes.c_double, ctypes.c_int]
            b = getattr(lib, fn.replace("quant", "bwd"))
            b.restype = ctypes.c_double
            b.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double,
                          ctypes.c_double, ctypes.c_int, ctypes.c_int]
        V, I64, I, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
        for suf in ("f32", "f64"):
            f = getattr(lib, "fsnn_wq_fwd_" + suf)
            f.restype, f.argtypes = None, [V, V, I64, D, D, D, V, V, I, I]
            f = getattr(lib, "fsnn_wq_sums_" + suf)
            f.restype, f.argtypes = None, [V, V, I64, D, D, D, V, V, I, I, V, I]
            f = getattr(lib, "fsnn_wq_grad_" + suf)
            f.restype, f.argtypes = None, [V, V, V, I64, D, D, D, V, V, I, I, D, D, I]
        lib._typed = True
    return lib


def native_ok(*ts: torch.Tensor) -> bool:
    """The native CPU kernels apply: CPU float32 / float64 tensors, no autograd needed."""
    t = ts[0]
    return (t.device.type == "cpu" and t.dtype in _ACT_FN and all(u.dtype == t.dtype and u.device == t.device
                                                                  for u in ts[1:])
            and not (torch.is_grad_enabled() and any(u.requires_grad for u in ts)))


def act_floats(alpha: torch.Tensor, n: int, dtype: torch.dtype):
    """``(alpha, alpha / n)`` as the floats the kernel uses, rounded as the reference does in ``dtype``."""
    a = alpha.detach().to(dtype)
    return a.item(), (a / n).item()


def act_quant_infer(x: torch.Tensor, alpha: torch.Tensor, n: int, residual: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None, floats: Optional[tuple] = None) -> torch.Tensor:
    """Quantized ReLU of ``x (+ residual)`` onto ``n`` levels of ``[0, alpha]``, in one pass, no autograd.
    Bit-identical to ``act_quant_levels(x + residual, alpha, n)``. ``out`` may be ``x`` (in place);
    ``floats``: :func:`act_floats` if already known."""
    alpha = alpha.detach()
    lib = _act_lib() if _FUSED_ENABLED else None
    if residual is not None and residual.shape != x.shape:
        x = x + residual  # broadcasting: not fused
        residual = None
    ok = lib is not None and native_ok(x, alpha) and (residual is None or native_ok(x, residual)) \
        and not torch.compiler.is_compiling()
    if ok:
        if not _dense(x):
            x = x.contiguous()
        if residual is not None:
            residual = like_layout(residual, x)
        if out is None or not dense_same_layout(x, out) or out.dtype != x.dtype:
            out = torch.empty_like(x)
        a, step = floats if floats is not None else act_floats(alpha, n, x.dtype)  # step: the reference's alpha / n
        getattr(lib, _ACT_FN[x.dtype])(ptr(x), ptr(residual), ptr(out), x.numel(), a, float(n), step,
                                       num_threads(x.numel()))
        return out
    v = x if residual is None else x + residual
    return act_levels(v, alpha, n) * (alpha / n)


class _FusedActQuant(torch.autograd.Function):
    """``quant.functional._ActQuant`` with one-pass native forward / backward kernels: the same
    values and input gradient bit for bit; the clip's gradient is the same sum, accumulated in double
    (so it equals the reference up to float summation order). Saves ``x`` only (not the levels)."""

    @staticmethod
    def forward(ctx, x, alpha, n):
        lib = _act_lib()
        out = torch.empty_like(x)
        a = alpha.detach().to(x.dtype)
        getattr(lib, _ACT_FN[x.dtype])(ptr(x), ptr(None), ptr(out), x.numel(), a.item(), float(n),
                                       (a / n).item(), num_threads(x.numel()))
        ctx.save_for_backward(x, alpha)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, g):
        x, alpha = ctx.saved_tensors
        need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_a):
            return None, None, None
        lib = _act_lib()
        g = like_layout(g, x)
        if g.dtype != x.dtype:
            g = g.to(x.dtype)
        gx = torch.empty_like(x) if need_x else None
        a = alpha.detach().to(x.dtype)
        fn = getattr(lib, _ACT_FN[x.dtype].replace("quant", "bwd"))
        acc = fn(ptr(x), ptr(g), ptr(gx), x.numel(), a.item(), float(ctx.n), int(need_a), num_threads(x.numel()))
        ga = torch.tensor(acc, dtype=alpha.dtype, device=alpha.device).reshape(alpha.shape) if need_a else None
        return gx, ga, None


def act_quant_fused(x: torch.Tensor, alpha: torch.Tensor, n: int) -> torch.Tensor:
    """The quantized ReLU onto ``n`` levels as fast as available: no autograd -> one-pass inference
    kernel; CPU float32 / float64 with autograd -> :class:`_FusedActQuant`; else the reference
    :func:`quant.functional.act_quant_levels`."""
    if not (torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad)):
        return act_quant_infer(x, alpha, n)
    lib = _act_lib() if _FUSED_ENABLED else None
    if lib is not None and x.device.type == "cpu" and x.dtype in _ACT_FN and alpha.dtype == x.dtype \
            and alpha.numel() == 1 and _dense(x) and not torch.compiler.is_compiling():
        return _FusedActQuant.apply(x, alpha, int(n))
    return act_quant_levels(x, alpha, n)


class _FusedWeightQuant(torch.autograd.Function):
    """``weight_quant`` (standardise, clip, project, straight-through estimator) with native kernels:
    the forward is bit-identical to the reference (mean / std from the same torch reductions, then one
    elementwise pass); the backward is the same formula in two passes (sums accumulated in double)."""

    @staticmethod
    def forward(ctx, w, alpha, mags, pass_outside):
        lib = _act_lib()
        suf = _SUF[w.dtype]
        mu = w.mean()
        sd = w.std()
        s = sd + 1e-12
        mids = (mags[1:] + mags[:-1]) * 0.5
        if mids.numel() < 15:  # the kernel reads 15 midpoints when there are <= 16 levels
            mids = torch.cat([mids, mids.new_full((15 - mids.numel(),), float("inf"))])
        mids, mags = mids.contiguous(), mags.contiguous()
        a = float(alpha.reshape(()))
        out = torch.empty_like(w, memory_format=torch.contiguous_format)
        getattr(lib, "fsnn_wq_fwd_" + suf)(ptr(w), ptr(out), w.numel(), mu.item(), s.item(), a, ptr(mids), ptr(mags),
                                           mags.numel(), num_threads(w.numel()))
        ctx.save_for_backward(w, alpha, mids, mags)
        ctx.stats = (mu.item(), s.item(), sd.item())
        ctx.pass_outside = bool(pass_outside)
        return out

    @staticmethod
    def backward(ctx, g):
        w, alpha, mids, mags = ctx.saved_tensors
        lib = _act_lib()
        suf = _SUF[w.dtype]
        mu, s, sd = ctx.stats
        a = float(alpha.reshape(()))
        g = g.contiguous().to(w.dtype)
        N = w.numel()
        sums = (ctypes.c_double * 3)()
        nt = num_threads(N)
        getattr(lib, "fsnn_wq_sums_" + suf)(ptr(w), ptr(g), N, mu, s, a, ptr(mids), ptr(mags), mags.numel(),
                                            int(ctx.pass_outside), ctypes.cast(sums, ctypes.c_void_p), nt)
        s_g, s_gc, s_a = sums[0], sums[1], sums[2]
        grad_w = None
        if ctx.needs_input_grad[0]:
            dlds = -s_gc / (s * s)                      # d loss / d (std + eps)
            k1 = dlds / ((N - 1) * sd) if N > 1 else float("nan")  # d std / d w = (w - mu) / ((N - 1) std)
            k0 = -(s_g / N) / s                          # through w - mean(w)
            grad_w = torch.empty_like(w, memory_format=torch.contiguous_format)
            getattr(lib, "fsnn_wq_grad_" + suf)(ptr(w), ptr(g), ptr(grad_w), N, mu, s, a, ptr(mids), ptr(mags),
                                                mags.numel(), int(ctx.pass_outside), k0, k1, nt)
        grad_a = torch.tensor(s_a, dtype=alpha.dtype).reshape(alpha.shape) if ctx.needs_input_grad[1] else None
        return grad_w, grad_a, None, None


_SUF = {torch.float32: "f32", torch.float64: "f64"}


def weight_quant_fused(w: torch.Tensor, alpha: Optional[torch.Tensor], bit: int, mode: Optional[str] = None):
    """:func:`quant.functional.weight_quant` through the native kernels where they apply (CPU float32 /
    float64, contiguous weight); the values are bit-identical, the gradients equal up to rounding."""
    from .functional import default_weight_mode, weight_magnitudes, weight_quant
    if bit >= FULL_PRECISION:
        return w
    lib = _act_lib() if _FUSED_ENABLED else None
    if lib is None or w.device.type != "cpu" or w.dtype not in _SUF or not w.is_contiguous() or w.numel() < 2 \
            or alpha is None or alpha.numel() != 1 or alpha.dtype != w.dtype or torch.compiler.is_compiling():
        return weight_quant(w, alpha, bit, mode)
    mode = mode or default_weight_mode(bit)
    mags = weight_magnitudes(bit, mode).to(w.dtype)
    return _FusedWeightQuant.apply(w, alpha, mags, mode == "ternary")


# ----------------------------------------------------------------------------------------------
# inference copy of a quantized ANN
# ----------------------------------------------------------------------------------------------
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantAct,) + WEIGHT_LAYERS):
            return True
        return super().is_leaf_module(m, qualname)


class FusedQuantAct(nn.Module):
    """Inference quantized ReLU, optionally of a sum ``x + residual`` (fused), optionally in place."""

    def __init__(self, act: QuantAct, inplace: bool = False):
        super().__init__()
        self.bit = act.bit
        self.act_alpha = nn.Parameter(act.act_alpha.detach().clone(), requires_grad=False)
        self.inplace = inplace
        self._cache = None

    def forward(self, x, residual=None):
        n = num_levels(self.bit)
        a = self.act_alpha
        key = (id(a), a._version, a.data_ptr(), x.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, act_floats(a, n, x.dtype))
        ip = self.inplace and not (self._forward_hooks or self._forward_pre_hooks)
        return act_quant_infer(x, a, n, residual, out=x if ip else None, floats=self._cache[1])

    def extra_repr(self):
        return f"bit={self.bit}, inplace={self.inplace}"


def frozen_weight_layer(mod: nn.Module, bn: Optional[nn.Module] = None, channels_last: bool = False) -> nn.Module:
    """A plain ``nn.Conv{1,2,3}d`` / ``nn.Linear`` holding ``mod``'s quantized weight (computed once) with
    an eval-mode BatchNorm ``bn`` folded in (``w * g/sqrt(var+eps)``, ``b' = (b - mean) g/sqrt(var+eps) + beta``)."""
    with torch.no_grad():
        w = (mod.quantized_weight() if hasattr(mod, "quantized_weight") else mod.weight).detach().clone()
        b = mod.bias.detach().clone() if getattr(mod, "bias", None) is not None else None
        if bn is not None:
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
                1.0 / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias.detach() if bn.affine else 0.0) - bn.running_mean * scale
            w = w * scale.view(-1, *([1] * (w.dim() - 1)))
            b = shift if b is None else b * scale + shift
        if isinstance(mod, nn.Linear):
            new = nn.Linear(mod.in_features, mod.out_features, bias=b is not None)
        else:
            cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[w.dim() - 2]
            new = cls(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                      dilation=mod.dilation, groups=mod.groups, bias=b is not None, padding_mode=mod.padding_mode)
        new = new.to(device=w.device, dtype=w.dtype)
        if channels_last and w.dim() == 4:
            w = w.contiguous(memory_format=torch.channels_last)
        new.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            new.bias = nn.Parameter(b.to(w.dtype), requires_grad=False)
    return new.eval()


class Conv2dAdd(nn.Conv2d):
    """``nn.Conv2d`` whose ``forward(x, residual)`` returns ``conv(x) + residual``. On CPU (oneDNN,
    float32, all channels-last or all contiguous) the sum is the convolution's post-op and is written **into the
    residual's buffer**, so the residual must not be read afterwards (:func:`fuse_conv_add` checks
    that); otherwise it is a plain ``conv(x) + residual``. Same rounding either way: the conv result
    is rounded to float once, then added."""

    def forward(self, x, residual=None):
        if residual is None:
            return super().forward(x)
        if self._fast(x, residual):
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                residual, x, self.weight, self.bias, list(self.padding), list(self.stride), list(self.dilation),
                self.groups, "add", None, None, [], None)
        return super().forward(x) + residual

    def _fast(self, x, r) -> bool:
        if not (_MKLDNN and x.device.type == "cpu" and x.dtype == torch.float32 and r.dtype == torch.float32
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple) and x.dim() == 4
                and not (torch.is_grad_enabled() and (x.requires_grad or r.requires_grad))):
            return False
        cl = torch.channels_last
        same = (x.is_contiguous(memory_format=cl) and r.is_contiguous(memory_format=cl)
                and self.weight.is_contiguous(memory_format=cl)) or \
            (x.is_contiguous() and r.is_contiguous() and self.weight.is_contiguous())
        if not same:
            return False
        n, _, h, w = x.shape
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return tuple(r.shape) == (n, self.out_channels, oh, ow)


_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")


def fuse_conv_add(gm: fx.GraphModule, consumer: fx.Node, modules) -> bool:
    """``consumer(a, b)`` with ``a`` a plain conv2d node read only here and ``b`` a fresh tensor whose
    last reader is ``consumer``: make it ``consumer(conv_add(x, b))`` (the sum goes into ``b``)."""
    if len(consumer.args) != 2:
        return False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for a, b in (consumer.args, consumer.args[::-1]):
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == "call_module"):
            continue
        conv = modules.get(a.target)
        if type(conv) not in (nn.Conv2d, Conv2dAdd) or len(a.users) != 1 or len(a.args) != 1 or a.kwargs:
            continue
        if b.op in ("placeholder", "get_attr") or not _produces_fresh(b, modules):
            continue
        if any(u is not consumer and order[u] > order[consumer] for u in b.users) or \
                any(u.op == "output" for u in b.users):
            continue
        if type(conv) is nn.Conv2d:
            new = Conv2dAdd(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                            bias=conv.bias is not None, padding_mode=conv.padding_mode)
            new.weight, new.bias = conv.weight, conv.bias
            set_module(gm, a.target, new.eval())
            modules[a.target] = new
        if order[b] > order[a]:
            b.append(a)  # the conv now reads b: run it after b (its own input is older than a)
        a.args = (a.args[0], b)
        consumer.args = (a,)
        return True
    return False


def _produces_fresh(node: fx.Node, modules) -> bool:
    """The node's value is a new tensor owned by the graph (a layer's output, not a view or input)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) or hasattr(m, "act_alpha")
    return False


def is_eval_bn(m) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.track_running_stats \
        and m.running_mean is not None


def is_weight_layer(m) -> bool:
    return isinstance(m, WEIGHT_LAYERS + (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and \
        not isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in (operator.add, torch.add):
        return len(node.args) == 2 and not node.kwargs
    if node.op == "call_method" and node.target == "add":
        return len(node.args) == 2 and not node.kwargs
    return False


def set_module(root: nn.Module, path: str, new: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def fold_weight_layers(gm: fx.GraphModule, nodes=None, channels_last: bool = True) -> int:
    """Replace weight layers (restricted to ``nodes`` if given) by frozen plain layers, folding a
    following eval-mode BN that is their only user. Returns the number of folded BNs."""
    modules = dict(gm.named_modules())
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not is_weight_layer(modules.get(node.target)):
            continue
        if (nodes is not None and node not in nodes) or calls[node.target] != 1:
            continue  # outside the region, or a module called more than once: leave it alone
        mod = modules[node.target]
        users = list(node.users)
        bn = None
        if len(users) == 1 and users[0].op == "call_module" and is_eval_bn(modules.get(users[0].target)) \
                and len(users[0].args) == 1 and not users[0].kwargs and calls[users[0].target] == 1:
            bn = modules[users[0].target]
        set_module(gm, node.target, frozen_weight_layer(mod, bn, channels_last))
        if bn is not None:
            bn_node = users[0]
            bn_node.replace_all_uses_with(node)
            gm.graph.erase_node(bn_node)
            folded += 1
    return folded


def _to_channels_last(x):
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _contiguous(x):
    return x.contiguous() if isinstance(x, torch.Tensor) else x


def guard_views(gm: fx.GraphModule, nodes=None):
    """Insert ``.contiguous()`` before ``view`` calls (a view of a channels-last tensor may not exist)."""
    added = []
    for node in list(gm.graph.nodes):
        if node.op == "call_method" and node.target == "view" and (nodes is None or node in nodes):
            src = node.args[0]
            with gm.graph.inserting_before(node):
                c = gm.graph.call_function(_contiguous, (src,))
            node.replace_input_with(src, c)
            added.append(c)
    return added


def pick_layout(build, example, repeats: int = 5):
    """``build(channels_last)`` for both layouts; the one whose forward on ``example`` is faster
    (each timed ``repeats`` times, alternating, after one warm-up; the minima are compared)."""
    import time
    cands = {cl: build(cl) for cl in (True, False)}
    best = {cl: float("inf") for cl in cands}
    with torch.no_grad():
        for m in cands.values():
            m(example)
        for _ in range(repeats):
            for cl, m in cands.items():
                t = time.perf_counter()
                m(example)
                best[cl] = min(best[cl], time.perf_counter() - t)
    return cands[min(best, key=best.get)]


def optimize_ann(model: nn.Module, channels_last="auto", inplace: bool = True,
                 example: Optional[torch.Tensor] = None) -> fx.GraphModule:
    """Inference copy of a quantized ANN (see the module docstring). The model is not modified.
    ``channels_last``: True / False, or ``"auto"``: the faster of both on ``example`` (channels-last
    without an example)."""
    if channels_last == "auto":
        if example is None:
            channels_last = True
        else:
            return pick_layout(lambda cl: optimize_ann(model, cl, inplace), example)
    model = copy.deepcopy(model).eval()
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Fused")
    fold_weight_layers(gm, channels_last=channels_last)
    modules = dict(gm.named_modules())
    fresh = set()  # nodes whose value is a new tensor nobody else reads
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), (nn.Conv2d, nn.Linear, nn.Conv1d,
                                                                              nn.Conv3d)):
            fresh.add(node)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), QuantAct):
            continue
        act = modules[node.target]
        if act.bit >= FULL_PRECISION:
            continue
        src = node.args[0]
        args = (src,)
        if isinstance(src, fx.Node) and is_add(src) and len(src.users) == 1 and \
                all(isinstance(a, fx.Node) for a in src.args):
            a, b = src.args
            if b in fresh and a not in fresh:
                a, b = b, a
            args = (a, b)
        node.args = args
        if len(args) == 2:
            gm.graph.erase_node(src)
            if inplace and fuse_conv_add(gm, node, modules):
                fresh.add(node.args[0])
        first = node.args[0]
        ip = inplace and isinstance(first, fx.Node) and first in fresh and len(first.users) == 1
        set_module(gm, node.target, FusedQuantAct(act, inplace=ip))
        modules[node.target] = gm.get_submodule(node.target)
    if channels_last:
        guard_views(gm)
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                with gm.graph.inserting_after(node):
                    c = gm.graph.call_function(_to_channels_last, (node,))
                node.replace_all_uses_with(c)
                c.args = (node,)
                break
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)
    gm.layout = "channels_last" if channels_last else "contiguous"
    return gm.eval()


__all__ = ["act_quant_infer", "act_quant_fused", "weight_quant_fused", "optimize_ann", "Conv2dAdd", "fuse_conv_add", "tune_malloc", "FusedQuantAct", "frozen_weight_layer", "build_native",
           "fold_weight_layers"]
