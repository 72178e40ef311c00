"""The C++ backend: CPU kernels registered as PyTorch custom operators (``torch.ops.fastsnn.*``).

The source is ``snn/csrc/fastsnn_ops.cpp`` (``TORCH_LIBRARY(fastsnn, ...)``). It is compiled on first
use by :func:`torch.utils.cpp_extension.load` (``is_python_module=False``: the library registers its
operators with the dispatcher when loaded) with ``-O3 -march=native``, without fast-math and with
``-ffp-contract=off`` so every float operation is the reference's, and with ``-fopenmp`` where PyTorch
itself runs on OpenMP (``torch._C.has_openmp``): ``at::parallel_for`` is a header template that runs
*serially* in code compiled without it. Nothing is linked: the OpenMP calls resolve to the runtime
PyTorch already loaded, so ``torch.set_num_threads`` governs the kernels too. The build goes into
``$FASTSNN_CACHE/torch_extensions/<id>`` (default ``~/.cache/fast_snn``; the id hashes the machine, the
flags, the source and its path, so two checkouts never rebuild each other's; ~15 s once per checkout).
This module adds what the dispatcher needs from Python: a fake (meta) implementation of every op, so
``torch.compile`` / ``torch.export`` can trace them, and the autograd formula of the IF op.

:func:`load` raises :class:`BackendUnavailable` with the reason (no C++ compiler, no ninja, a build
error, ``FASTSNN_NO_CPP=1``); the dispatcher in :mod:`snn.kernels` turns that into one warning and a
fallback for ``backend="auto"``.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
from typing import Optional

import torch

SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "fastsnn_ops.cpp")
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
# at::parallel_for spreads the kernels over torch's threads only when compiled with OpenMP (it is
# inline: without -fopenmp every op ran on one thread); the partitions of the chunked reductions depend
# on at::get_num_threads() alone, so the values are the same either way
if getattr(torch._C, "has_openmp", False):
    CFLAGS.append("-fopenmp")
# 64-byte vectors where the CPU has them (GCC's default on x86 prefers 32): the IF kernels' register blocks
# are four vectors wide; elementwise results are the same at any width
if platform.machine().lower() in ("x86_64", "amd64"):
    CFLAGS.append("-mprefer-vector-width=512")
CFLAGS += os.environ.get("FASTSNN_EXTRA_CFLAGS", "").split()  # benchmarks of other ISAs (e.g. -mno-avx512f)


class BackendUnavailable(RuntimeError):
    """A kernel backend cannot run here (the message says why and what to do)."""


_STATE = {"ops": None, "error": None}
_LOCK = threading.Lock()


def _host_id() -> str:
    parts = [platform.machine(), sys.platform, torch.__version__, sys.version.split()[0]]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    parts.append(line.strip())
                if len(parts) >= 6:
                    break
    except OSError:
        pass
    parts.append(" ".join(CFLAGS))  # a build with other flags (FASTSNN_EXTRA_CFLAGS) gets its own directory
    try:  # and one of other sources or another checkout (ninja's build file names the source's path):
        with open(SOURCE, "rb") as f:  # two never rebuild each other's
            parts.append(hashlib.sha256(f.read()).hexdigest())
    except OSError:
        pass
    parts.append(os.path.realpath(SOURCE))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def build_dir() -> str:
    root = os.environ.get("FASTSNN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fast_snn")
    return os.path.join(root, "torch_extensions", _host_id())


def compiler() -> Optional[str]:
    """The C++ compiler cpp_extension will use (``$CXX``, default ``c++``), or None."""
    return shutil.which(os.environ.get("CXX", "c++"))


def load():
    """``torch.ops.fastsnn`` with the native kernels loaded (built on first use); raises
    :class:`BackendUnavailable` when that is impossible here (remembered: later calls raise at once)."""
    if _STATE["ops"] is not None:
        return _STATE["ops"]
    with _LOCK:
        if _STATE["ops"] is not None:
            return _STATE["ops"]
        if _STATE["error"] is None:
            try:
                _build()
                _register_python_parts()
                _STATE["ops"] = torch.ops.fastsnn
            except BackendUnavailable as e:
                _STATE["error"] = str(e)
            except Exception as e:  # noqa: BLE001 - any build / load failure: the backend is unavailable
                lines = [ln for ln in str(e).splitlines() if "error" in ln.lower()] or str(e).splitlines()
                _STATE["error"] = f"building the C++ kernels failed ({type(e).__name__}: {' | '.join(lines[:3])[:600]})"
        if _STATE["ops"] is None:
            raise BackendUnavailable(_STATE["error"])
        return _STATE["ops"]


def available() -> bool:
    try:
        load()
        return True
    except BackendUnavailable:
        return False


def _build():
    if os.environ.get("FASTSNN_NO_CPP", "0") not in ("", "0"):
        raise BackendUnavailable("the C++ backend is disabled (FASTSNN_NO_CPP is set)")
    if hasattr(torch.ops, "fastsnn") and hasattr(torch.ops.fastsnn, "if_steps"):
        return  # already registered in this process
    if compiler() is None:
        raise BackendUnavailable(f"no C++ compiler found ({os.environ.get('CXX', 'c++')} is not on PATH): "
                                 "install g++ (or set CXX) to use the C++ kernels")
    import logging
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)  # its "no CUDA runtime found" note on CPU-only machines
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise BackendUnavailable("torch.utils.cpp_extension needs ninja: pip install ninja") from None
    d = build_dir()
    os.makedirs(d, exist_ok=True)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no CUDA runtime found" and similar notes of cpp_extension
        cpp_extension.load(name="fastsnn_ops", sources=[SOURCE], extra_cflags=CFLAGS, build_directory=d,
                           is_python_module=False, verbose=False)


def _register_python_parts():
    """Fake implementations (shapes / strides only) and the IF op's autograd formula."""
    if _STATE.get("python_parts"):
        return
    lib = torch.library

    def _state_like(cur, signed, state):
        if not state:
            return cur.new_empty(0), cur.new_empty(0)
        if cur.shape[0] == 0:
            return cur.new_empty(cur.shape[1:]), (cur.new_empty(cur.shape[1:]) if signed else cur.new_empty(0))
        c0 = cur[0]
        v = torch.empty_strided(c0.shape, c0.stride(), dtype=cur.dtype, device=cur.device)
        n = torch.empty_strided(c0.shape, c0.stride(), dtype=cur.dtype, device=cur.device) if signed \
            else cur.new_empty(0)
        return v, n

    @lib.register_fake("fastsnn::if_steps")
    def _(cur, res, v, n, theta, neg, scale, bound, signed, state):
        out = torch.empty_strided(cur.shape, cur.stride(), dtype=cur.dtype, device=cur.device)
        return (out,) + _state_like(cur, signed, state)

    @lib.register_fake("fastsnn::if_steps_inplace")
    def _(cur, res, v, n, theta, neg, scale, bound, signed, state):
        return _state_like(cur, signed, state)

    @lib.register_fake("fastsnn::if_steps_into")
    def _(cur, res, v, n, theta, neg, scale, bound, signed, state, out):
        return _state_like(cur, signed, state)

    @lib.register_fake("fastsnn::if_const_into")
    def _(cur, theta, scale, t0, steps, T, out):
        return None

    @lib.register_fake("fastsnn::if_const")
    def _(cur, theta, scale, t0, steps, T, channels_last):
        shape = (steps * cur.shape[0],) + tuple(cur.shape[1:])
        cl = cur.dim() == 4 and (channels_last or (cur.is_contiguous(memory_format=torch.channels_last)
                                                    and not cur.is_contiguous()))
        return torch.empty(shape, dtype=cur.dtype, device=cur.device,
                           memory_format=torch.channels_last if cl else torch.contiguous_format)

    @lib.register_fake("fastsnn::nonzero_per_position")
    def _(x):
        return x.new_empty(x.shape[2:], dtype=torch.int64)

    @lib.register_fake("fastsnn::act_quant")
    def _(x, r, alpha, n, step):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)

    @lib.register_fake("fastsnn::act_quant_inplace")
    def _(x, r, alpha, n, step):
        return None

    @lib.register_fake("fastsnn::act_quant_into")
    def _(x, r, alpha, n, step, out):
        return None

    @lib.register_fake("fastsnn::act_quant_bwd")
    def _(x, g, alpha, n, want_x, want_alpha):
        gx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device) if want_x else x.new_empty(0)
        return gx, x.new_empty((), dtype=torch.float64)

    @lib.register_fake("fastsnn::wq_fwd")
    def _(w, mu, s, alpha, mids, mags):
        return torch.empty_like(w, memory_format=torch.contiguous_format)

    @lib.register_fake("fastsnn::wq_bwd")
    def _(w, g, mu, s, sd, alpha, mids, mags, pass_outside, want_w):
        gw = torch.empty_like(w, memory_format=torch.contiguous_format) if want_w else w.new_empty(0)
        return gw, w.new_empty(3, dtype=torch.float64)

    # autograd of the IF layer: the spikes are piecewise constant in the currents (zero gradient); the
    # final membrane is v0 + sum_t x_t - theta * (#pos - #neg), so d v_T / d x_t = d v_T / d v0 = 1
    def setup_context(ctx, inputs, output):
        cur, res, v, n = inputs[:4]
        ctx.state = bool(inputs[9])
        ctx.shapes = (cur.shape, None if res is None else res.shape, None if v is None else v.shape,
                      None if n is None else n.shape)

    def backward(ctx, g_out, g_v, g_n):
        cur_s, res_s, v_s, n_s = ctx.shapes
        gv = g_v if ctx.state and g_v is not None and g_v.numel() > 0 else None
        g_cur = gv.unsqueeze(0).expand(cur_s).clone() if gv is not None else g_out.new_zeros(cur_s)
        g_res = None if res_s is None else g_cur.clone()
        g_v0 = None if v_s is None else (gv.clone() if gv is not None else g_out.new_zeros(v_s))
        g_n0 = None if n_s is None else g_out.new_zeros(n_s)
        return g_cur, g_res, g_v0, g_n0, None, None, None, None, None, None

    lib.register_autograd("fastsnn::if_steps", backward, setup_context=setup_context)
    _STATE["python_parts"] = True


# ------------------------------------------------------------------------------------------ wrappers
def run(cur, th, neg, signed, residual, v, n, state, sc, inplace, bound, out=None):
    """:func:`snn.kernels.if_steps` on the C++ op (operands already in ``cur``'s layout; ``th`` /
    ``neg`` / ``sc``: 0-dim tensors of ``cur``'s dtype; ``out``: write the result there)."""
    ops = load()
    b = float("inf") if bound is None else float(bound)
    if out is not None:
        vo, no = ops.if_steps_into(cur, residual, v, n, th, neg, sc, b, bool(signed), bool(state), out)
    elif inplace:
        vo, no = ops.if_steps_inplace(cur, residual, v, n, th, neg, sc, b, bool(signed), bool(state))
        out = cur
    else:
        out, vo, no = ops.if_steps(cur, residual, v, n, th, neg, sc, b, bool(signed), bool(state))
    return out, (vo if state else None), (no if state and signed else None)


def run_const(current, th, t0, steps, T, sc, channels_last, out=None):
    if out is not None:
        load().if_const_into(current, th, sc, int(t0), int(steps), int(T), out)
        return out
    return load().if_const(current, th, sc, int(t0), int(steps), int(T), bool(channels_last))
