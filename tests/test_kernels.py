"""IF kernel backends: bit-identical to the reference dynamics (snn.kernels.reference.if_step), the
optimised SNN / ANN equal the plain ones, the native ops behave as PyTorch custom operators.

No test here measures time (benchmarks/ does that)."""
import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import quant
import snn
from quant import fused
from quant.functional import act_levels, act_quant
from snn import kernels
from snn.kernels import BackendUnavailable
from snn.kernels import cpp as kcpp
from snn.neuron import IFNeuron, if_constant, if_multistep
from snn.optimize import channels_last_4d

from test_snn import MLP, TinyDeepLab, TinyResNet, TinyYolo, _randomise_bn

HAVE_CPP = kernels.cpp_available()
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason="no C++ compiler: native kernels unavailable")
NO_CC = os.environ.get("FASTSNN_TEST_HIDDEN_CC") == "1"  # this file re-run with the compiler hidden


def _compile_ok():
    try:
        import torch._inductor  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    try:
        kernels.if_steps(torch.zeros(1, 4), torch.tensor(1.0), False, backend="compile")
        return True
    except BackendUnavailable:
        return False


HAVE_COMPILE = _compile_ok()
needs_compile = pytest.mark.skipif(not HAVE_COMPILE, reason="torch.compile unusable here (no C++ compiler?)")
NATIVE = [pytest.param("cpp", marks=needs_cpp), pytest.param("compile", marks=needs_compile)]


def _currents(T, shape, dtype, theta, seed, bias=0.0):
    """Random currents with many exact ties: multiples of theta/4 land on the threshold exactly."""
    g = torch.Generator().manual_seed(seed)
    cur = (torch.randn((T,) + shape, generator=g, dtype=dtype) + bias) * float(theta) * 0.8
    ties = torch.randint(-4, 5, cur.shape, generator=g).to(dtype) * (theta / 4)
    m = torch.rand(cur.shape, generator=g) < 0.4
    cur[m] = ties[m]
    return cur


def _reference(cur, theta, signed, v=None, n=None, neg_tol=1e-3, bound=None):
    v = torch.full_like(cur[0], 0.5) * theta if v is None else v
    n = (torch.zeros_like(cur[0]) if n is None else n) if signed else None
    return if_multistep(cur, theta, v, n, signed, neg_tol, bound=bound)


def _same(got, ref, signed):
    s, v, n = got
    rs, rv, rn = ref
    return torch.equal(s, rs) and torch.equal(v, rv) and ((n is None and rn is None) if not signed
                                                          else torch.equal(n, rn))


# ------------------------------------------------------------------------------------- the dynamics
def _scalar_bounded(currents, theta, T, tol=1e-3):
    """Plain-Python model of the bounded signed neuron."""
    v, n, out = theta / 2, 0, []
    for z in currents:
        v += z
        s = 0
        if v >= theta and n < T:
            v -= theta
            n += 1
            s = 1
        elif v < -tol * theta and n > 0:
            v += theta
            n -= 1
            s = -1
        out.append(s)
    return out


def test_bounded_reference_keeps_count_in_range_and_matches_scalar_model():
    T = 3
    cur = _currents(12, (400,), torch.float64, 1.0, seed=0, bias=0.8)  # strongly driven: the bound binds
    s, _, n = _reference(cur, torch.tensor(1.0, dtype=torch.float64), True, bound=T)
    counts = s.cumsum(0)
    assert counts.min() >= 0 and counts.max() <= T and bool((counts == T).any())
    for j in range(0, 400, 37):
        assert _scalar_bounded(cur[:, j].tolist(), 1.0, T) == [int(x) for x in s[:, j].tolist()]
    unb, _, _ = _reference(cur, torch.tensor(1.0, dtype=torch.float64), True)
    assert unb.cumsum(0).max() > T  # without the bound the count exceeds T on this input
    with pytest.raises(ValueError, match="signed"):
        _reference(cur, torch.tensor(1.0, dtype=torch.float64), False, bound=T)


def test_constant_input_is_switched_off_after_T():
    theta = torch.tensor(1.5)
    x = torch.rand(4, 3, 5, 5) * 2
    full = if_constant(x, theta, 0, 3, T=3)
    assert torch.equal(full, if_constant(x, theta, 0, 3))  # steps < T: unchanged
    settle = if_constant(x, theta, 0, 7, T=3)
    assert torch.equal(settle[:12], full) and not settle[12:].any()
    assert not if_constant(x, theta, 3, 4, T=3).any()


# ------------------------------------------------------------------------------------- per backend
@pytest.mark.parametrize("T", [1, 3, 7, 15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@needs_cpp
def test_cpp_bit_identical_all_variants(T, dtype):
    theta = torch.tensor(1.3, dtype=dtype)
    for signed, bound in ((True, None), (False, None), (True, T)):
        cur = _currents(T, (3, 2100), dtype, theta, seed=T, bias=0.3 if bound else 0.0)  # > 1 block, ragged
        assert _same(kernels.if_steps(cur, theta, signed, backend="cpp", bound=bound),
                     _reference(cur, theta, signed, bound=bound), signed)
        # scaled output, residual current (added first), in place, no state
        res = _currents(T, (3, 2100), dtype, theta, seed=100 + T) * 0.5
        ref2 = _reference(cur + res, theta, signed, bound=bound)[0]
        buf = cur.clone()
        s2, v2, n2 = kernels.if_steps(buf, theta, signed, residual=res, scale=float(theta), inplace=True,
                                      state=False, backend="cpp", bound=bound)
        assert s2.data_ptr() == buf.data_ptr() and v2 is None and n2 is None
        assert torch.equal(s2, ref2 * theta)


_STREAM_SCRIPT = r"""
import torch
from snn import kernels
from snn.kernels import cpp
assert cpp.load().stream_min_bytes() == 0
g = torch.Generator().manual_seed(0)
for threads in (1, 2):
    torch.set_num_threads(threads)
    for dtype in (torch.float32, torch.float64):
        theta = torch.tensor(0.9, dtype=dtype)
        # rows of whole cache lines (streamed) and not (6300 neurons: plain stores), > 1 block, ragged tail
        for shape in ((4, 3, 1024), (4, 3, 2100), (4, 2, 8, 8)):
            for T, signed, bound in ((3, True, None), (7, False, None), (3, True, 3)):
                cur = (torch.rand((T,) + shape, generator=g, dtype=dtype) - 0.3) * 1.5 * theta
                res = (torch.rand((T,) + shape, generator=g, dtype=dtype) - 0.5) * theta
                v0 = torch.rand(shape, generator=g, dtype=dtype) * theta
                n0 = torch.randint(0, 2, shape, generator=g).to(dtype) if signed else None
                ref = kernels.if_steps(cur, theta, signed, residual=res, v=v0, n=n0, scale=theta, bound=bound,
                                       backend="reference")
                got = kernels.if_steps(cur, theta, signed, residual=res, v=v0, n=n0, scale=theta, bound=bound,
                                       backend="cpp")
                assert all(torch.equal(a, b) for a, b in zip(got, ref) if a is not None), (shape, T, signed)
                ref = kernels.if_steps(cur, theta, signed, residual=res, scale=theta, bound=bound, backend="reference")
                for alias in ("out", "cur", "res"):
                    c, r = cur.clone(), res.clone()
                    dst = {"out": torch.empty_like(cur), "cur": c, "res": r}[alias]
                    o = kernels.if_steps(c, theta, signed, residual=r, scale=theta, bound=bound, state=False,
                                         backend="cpp", out=dst)[0]
                    assert o.data_ptr() == dst.data_ptr() and torch.equal(o, ref[0]), (shape, alias)
        # the analog input's closed form: flat, and NCHW current into a channels-last train
        for shape in ((2, 16, 16, 16), (2, 3, 10, 10), (1, 32, 9, 9)):
            x = torch.randn(shape, generator=g, dtype=dtype) * theta
            for t0, steps, T in ((0, 3, 3), (0, 7, 3), (2, 5, 7)):
                for cl in (False, True):
                    ref = kernels.if_const_steps(x, theta, t0, steps, T=T, scale=theta, channels_last=cl,
                                                 backend="reference")
                    got = kernels.if_const_steps(x, theta, t0, steps, T=T, scale=theta, channels_last=cl,
                                                 backend="cpp")
                    assert torch.equal(got, ref), (shape, t0, steps, T, cl)
print("STREAM-OK")
"""


@needs_cpp
def test_cpp_streamed_stores_bit_identical():
    """Large trains are written with non-temporal stores (a quarter of the last-level cache or more; the
    threshold is FASTSNN_STREAM_MIN when set): with it at 0 every train whose rows are whole cache lines
    streams, and the results equal the reference bit for bit (state, residual, bound, aliased outputs,
    float64, two threads, the analog input's closed form in both layouts); rows that are not whole lines
    take the plain stores."""
    assert kcpp.load().stream_min_bytes() > 0 or os.environ.get("FASTSNN_STREAM_MIN") == "0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FASTSNN_STREAM_MIN="0", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                       cwd=root)
    assert r.returncode == 0 and "STREAM-OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("signed, bounded", [(True, False), (False, False), (True, True)])
def test_backend_bit_identical(backend, signed, bounded):
    """Every backend, the spikes / state of the reference: ties, residual, carried state, in place."""
    T = 3
    theta = torch.tensor(1.2)
    bound = T if bounded else None
    cur = _currents(T, (2, 300), torch.float32, theta, seed=9, bias=0.5 if bounded else 0.0)
    res = torch.randn_like(cur) * 0.3
    ref = _reference(cur + res, theta, signed, bound=bound)
    assert _same(kernels.if_steps(cur, theta, signed, residual=res, backend=backend, bound=bound), ref, signed)
    # another batch size: no recompilation needed (dynamic), same result
    cur2 = _currents(T, (5, 77), torch.float32, theta, seed=10)
    res2 = torch.zeros_like(cur2)
    assert _same(kernels.if_steps(cur2, theta, signed, residual=res2, backend=backend, bound=bound),
                 _reference(cur2, theta, signed, bound=bound), signed)
    # carried state: two windows (the second starts from the first's state) == one
    c7 = _currents(7, (1000,), torch.float32, theta, seed=3, bias=0.3)
    r7 = _reference(c7, theta, signed, bound=bound)
    s1, v, n = kernels.if_steps(c7[:4], theta, signed, backend=backend, bound=bound)
    s2, v, n = kernels.if_steps(c7[4:], theta, signed, v=v, n=n, backend=backend, bound=bound)
    assert torch.equal(torch.cat([s1, s2]), r7[0]) and torch.equal(v, r7[1])
    # fresh state, no state out, scaled, in place into a channels-last [T, B, C, H, W] view
    c4 = _currents(T, (2 * 4, 5, 6), torch.float32, theta, seed=11).view(6, 4, 5, 6)
    c4 = c4.contiguous(memory_format=torch.channels_last)
    ref4 = _reference(c4.contiguous().view(3, 2, 4, 5, 6), theta, signed, bound=bound)[0] * theta
    s4, v4, n4 = kernels.if_steps(c4.view(3, 2, 4, 5, 6), theta, signed, state=False, scale=float(theta),
                                  inplace=True, backend=backend, bound=bound)
    assert v4 is None and n4 is None and s4.data_ptr() == c4.data_ptr()
    assert torch.equal(s4, ref4)


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
def test_constant_input_closed_form_per_backend(backend):
    theta = torch.tensor(1.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 7, generator=g) * 2
    x.view(-1)[:60] = torch.arange(60, dtype=torch.float32) * theta / 14  # exact ties for T = 7
    for T, t0, steps in ((3, 0, 3), (7, 0, 7), (7, 1, 6), (3, 0, 5), (3, 2, 4)):  # the last two: settle steps
        ref = if_constant(x, theta, t0, steps, T)
        for cl in (False, True):
            got = kernels.if_const_steps(x, theta, t0, steps, T=T, scale=float(theta), channels_last=cl,
                                         backend=backend)
            assert torch.equal(got, ref), (T, t0, steps, cl)
            assert not cl or got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(kernels.if_const_steps(x, theta, t0, steps, T=T, backend=backend), ref / theta)
        # a channels-last current in
        xcl = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(kernels.if_const_steps(xcl, theta, t0, steps, T=T, scale=float(theta),
                                                  backend=backend), ref)
    # NCHW in, channels-last out: the transpose's 8 x 8 blocks and both ragged edges (channels, pixels)
    for shape in ((2, 24, 13, 11), (2, 19, 9, 9), (1, 8, 4, 2), (1, 40, 17, 3)):
        xs = torch.randn(shape, generator=g) * 2
        got = kernels.if_const_steps(xs, theta, 0, 3, T=3, scale=float(theta), channels_last=True, backend=backend)
        assert torch.equal(got, if_constant(xs, theta, 0, 3, 3)), shape
    # several kernel blocks and register blocks with a ragged tail (16 x 33 x 33 per sample), both layouts
    xl = torch.randn(3, 16, 33, 33, generator=g) * 2
    xl.view(-1)[::5] = torch.randint(-2, 17, ((xl.numel() + 4) // 5,), generator=g).float() * theta / 14
    ref = if_constant(xl, theta, 0, 7, 7)
    for cl in (False, True):
        got = kernels.if_const_steps(xl, theta, 0, 7, T=7, scale=float(theta), channels_last=cl, backend=backend)
        assert torch.equal(got, ref), cl


@needs_cpp
def test_cpp_float64_layouts_and_threads():
    theta = torch.tensor(1.1, dtype=torch.float64)
    T, B = 3, 4
    cur = _currents(T, (B * 8, 16, 16), torch.float64, theta, seed=5).view(T * B, 8, 16, 16)
    cur_cl = cur.contiguous(memory_format=torch.channels_last)
    res = torch.randn(T * B, 8, 16, 16, dtype=torch.float64) * 0.2  # another layout: copied to cur's
    ref = _reference((cur + res).view(T, B, 8, 16, 16), theta, True)
    got = kernels.if_steps(cur_cl.view(T, B, 8, 16, 16), theta, True, residual=res.view(T, B, 8, 16, 16),
                           backend="cpp")
    assert _same(got, ref, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        big = _currents(3, (70_000,), torch.float32, torch.tensor(1.1), seed=6)
        assert torch.equal(kernels.if_steps(big, torch.tensor(1.1), True, backend="cpp")[0],
                           _reference(big, torch.tensor(1.1), True)[0])
    finally:
        torch.set_num_threads(threads)


@needs_cpp
@pytest.mark.skipif(not getattr(torch._C, "has_openmp", False), reason="this PyTorch has no OpenMP")
def test_cpp_kernels_are_built_with_openmp_and_equal_across_thread_counts():
    # at::parallel_for is inline: compiled without -fopenmp the kernels ran on one thread whatever
    # torch.set_num_threads said. The library must call into the OpenMP runtime ...
    assert "-fopenmp" in kcpp.CFLAGS
    libs = [os.path.join(r, f) for r, _, fs in os.walk(kcpp.build_dir()) for f in fs if f.endswith(".so")]
    assert libs, kcpp.build_dir()
    with open(libs[0], "rb") as f:
        assert b"GOMP_parallel" in f.read()
    # ... and give the same values on 1 and 2 threads (the reductions' partition too)
    theta = torch.tensor(0.9)
    cur = _currents(3, (80_000,), torch.float32, theta, seed=7)
    x = torch.randn(40, 16, 32, 32)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            s, v, nn_ = kernels.if_steps(cur, theta, True, backend="cpp")
            outs.append((s, v, nn_, kernels.nonzero_per_position(torch.relu(x - 1)),
                         fused.act_quant_infer(x, torch.tensor(2.0), 3)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


_TRITON_SCRIPT = r"""
import torch
from snn import kernels
from snn.kernels import triton_backend
from snn.kernels.reference import if_multistep, if_constant

def ref(cur, theta, signed, v=None, n=None, bound=None):
    v = torch.full_like(cur[0], 0.5) * theta if v is None else v
    n = (torch.zeros_like(cur[0]) if n is None else n) if signed else None
    return if_multistep(cur, theta, v, n, signed, bound=bound)

g = torch.Generator().manual_seed(0)
theta = torch.tensor(0.9)
for T, signed, bound in ((1, True, None), (3, True, None), (7, False, None), (3, False, None), (3, True, 3)):
    cur = torch.randn(T, 1500, generator=g) * 0.7 + (0.4 if bound else 0.0)
    m = torch.rand(cur.shape, generator=g) < 0.4
    cur[m] = (torch.randint(-4, 5, cur.shape, generator=g).float() * theta / 4)[m]  # exact ties
    res = torch.randn(cur.shape, generator=g) * 0.3
    r, rv, rn = ref(cur + res, theta, signed, bound=bound)
    s, v, n = kernels.if_steps(cur, theta, signed, residual=res, backend="triton", bound=bound)
    assert torch.equal(s, r) and torch.equal(v, rv), (T, signed)
    assert (not signed) or torch.equal(n, rn)
    buf = cur.clone()
    s1, _, _ = kernels.if_steps(buf, theta, signed, residual=res, v=rv, n=rn, scale=float(theta), inplace=True,
                                state=False, backend="triton", bound=bound)
    r1, _, _ = ref(cur + res, theta, signed, rv.clone(), rn.clone() if signed else None, bound=bound)
    assert s1.data_ptr() == buf.data_ptr() and torch.equal(s1, r1 * theta), (T, signed)
x = torch.rand(4, 3, 5, 5, generator=g) * 2
for T, t0, steps in ((3, 0, 3), (3, 0, 6), (7, 2, 5)):
    for cl in (False, True):
        got = kernels.if_const_steps(x, theta, t0, steps, T=T, scale=float(theta), channels_last=cl, backend="triton")
        assert torch.equal(got, if_constant(x, theta, t0, steps, T)), (T, t0, steps, cl)
assert triton_backend._CHECKED.get("cpu", "x") is None  # the Triton kernel ran, its self-check passed
print("TRITON-OK")
"""


def test_triton_backend_interpreter_bit_identical():
    """The CUDA kernels' code, run on CPU by Triton's interpreter (a fresh process: the mode is fixed
    when Triton is first imported)."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0 and "TRITON-OK" in r.stdout, r.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["triton", pytest.param("compile", marks=needs_compile)])
def test_cuda_backends_bit_identical(backend):
    """On a GPU (benchmarks/gpu_check.sh): CUDA tensors through Triton / torch.compile equal the
    reference loop run on the CPU."""
    theta = torch.tensor(0.9)
    for T, signed, bound in ((3, True, None), (7, False, None), (3, True, 3), (15, True, None)):
        cur = _currents(T, (4, 3000), torch.float32, theta, seed=T, bias=0.3 if bound else 0.0)
        res = torch.randn_like(cur) * 0.3
        ref = _reference(cur + res, theta, signed, bound=bound)
        s, v, n = kernels.if_steps(cur.cuda(), theta.cuda(), signed, residual=res.cuda(), backend=backend, bound=bound)
        assert _same((s.cpu(), v.cpu(), n.cpu() if n is not None else None), ref, signed)
    x = torch.rand(4, 3, 5, 5) * 2
    got = kernels.if_const_steps(x.cuda(), theta.cuda(), 0, 5, T=3, scale=float(theta), channels_last=True,
                                 backend=backend)
    assert torch.equal(got.cpu(), if_constant(x, theta, 0, 5, 3))
    assert kernels.resolve("auto", cur.cuda()) == "triton"


# ------------------------------------------------------------------------------------- dispatch
def test_auto_resolution_and_env_override(monkeypatch):
    x = torch.zeros(3, 4)
    monkeypatch.delenv("FASTSNN_KERNEL", raising=False)
    assert kernels.resolve("auto", x) == ("cpp" if HAVE_CPP else "compile" if HAVE_COMPILE else "reference")
    assert kernels.resolve("auto", x.half()) == "reference"  # a dtype no native kernel takes
    assert kernels.resolve("auto", x, grad=True) == "reference"
    assert kernels.resolve("compile", x) == "compile"  # explicit: as asked
    monkeypatch.setenv("FASTSNN_KERNEL", "reference")
    assert kernels.resolve("auto", x) == "reference"
    assert kernels.resolve("cpp", x) == "cpp"  # the override only changes what auto picks
    theta = torch.tensor(1.0)
    cur = _currents(3, (50,), torch.float32, theta, seed=1)
    assert torch.equal(kernels.if_steps(cur, theta, True)[0], _reference(cur, theta, True)[0])
    monkeypatch.setenv("FASTSNN_KERNEL", "bogus")
    from quant.fused import _WARNED
    _WARNED.discard("env:bogus")
    with pytest.warns(RuntimeWarning, match="unknown"):
        assert kernels.default_backend() == "auto"
    with pytest.raises(ValueError, match="unknown IF backend"):
        IFNeuron(torch.tensor(1.0), 3, 2, backend="cuda")


def test_neuron_backend_argument_and_supported_list():
    assert IFNeuron.supported_backends == ["reference", "compile", "cpp", "triton"]
    ann = _randomise_bn(TinyResNet(bit=2))
    x = torch.randn(3, 3, 16, 16)
    ref = kernels.set_backend(snn.convert(ann), "reference")
    assert all(m.backend == "reference" for m in ref.neurons().values())
    y = ref(x, per_step=True)
    for b in ["auto"] + (["cpp"] if HAVE_CPP else []):
        net = kernels.set_backend(snn.convert(ann), b)
        assert torch.equal(net(x, per_step=True), y), b
    with pytest.raises(ValueError, match="signed"):
        IFNeuron(torch.tensor(1.0), 3, 2, signed=False, bounded=True)


def test_explicit_unavailable_backend_raises_and_auto_falls_back_once(monkeypatch):
    theta = torch.tensor(1.0)
    cur = _currents(3, (40,), torch.float32, theta, seed=2)
    ref = _reference(cur, theta, False)[0]
    monkeypatch.setitem(kcpp._STATE, "ops", None)
    monkeypatch.setitem(kcpp._STATE, "error", "no C++ compiler found (test)")
    with pytest.raises(BackendUnavailable, match="no C\\+\\+ compiler"):
        kernels.if_steps(cur, theta, False, backend="cpp")
    from quant.fused import _WARNED
    _WARNED.discard("drop:cpp")
    monkeypatch.setattr(kernels, "_DROPPED", set())
    monkeypatch.setattr(kernels, "AUTO_ORDER", {"cpu": ("cpp", "reference")})
    with pytest.warns(RuntimeWarning, match="'cpp' is unavailable"):
        assert torch.equal(kernels.if_steps(cur, theta, False)[0], ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        assert torch.equal(kernels.if_steps(cur, theta, False)[0], ref)
    assert "cpp" in kernels._DROPPED


def _t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


@needs_cpp
def test_native_ops_check_inputs():
    ops = kcpp.load()
    cur = torch.zeros(3, 10)
    th, neg, one, inf = _t(1.0), _t(-1e-3), _t(1.0), float("inf")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.if_steps(cur.half(), None, None, None, th.half(), neg.half(), one.half(), inf, True, False)
    with pytest.raises(RuntimeError, match="time dimension"):
        ops.if_steps(torch.zeros(10, 3).t(), None, None, None, th, neg, one, inf, True, False)
    with pytest.raises(RuntimeError, match="residual"):
        ops.if_steps(cur, torch.zeros(3, 10, dtype=torch.float64), None, None, th, neg, one, inf, True, False)
    with pytest.raises(RuntimeError, match="theta must be a one-element CPU tensor of dtype Float"):
        ops.if_steps(cur, None, None, None, th.double(), neg, one, inf, True, False)
    with pytest.raises(RuntimeError, match="bounded neuron must be signed"):
        ops.if_steps(cur, None, None, None, th, neg, one, 3.0, False, False)
    with pytest.raises(BackendUnavailable, match="CPU"):
        kernels.if_steps(cur.to("meta"), torch.tensor(1.0), True, backend="cpp")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        kernels.if_steps(cur.half(), torch.tensor(1.0).half(), True, backend="cpp")
    # auto takes the reference loop for what no kernel runs
    theta = torch.tensor(1.0, dtype=torch.float16)
    c16 = (torch.randn(3, 64) * 0.7).to(torch.float16)
    assert torch.equal(kernels.if_steps(c16, theta, True)[0], _reference(c16, theta, True)[0])


@needs_cpp
def test_native_ops_opcheck():
    """The custom operators' schemas, fake implementations and autograd registration are consistent
    (torch.library.opcheck), and they trace under torch.compile."""
    ops = kcpp.load()
    g = torch.Generator().manual_seed(0)
    cur = torch.randn(3, 2, 40, generator=g)
    res = torch.randn(3, 2, 40, generator=g)
    v = torch.full((2, 40), 0.6)
    n = torch.zeros(2, 40)
    th, neg, one = _t(1.2), _t(-1.2e-3), _t(1.0)
    torch.library.opcheck(ops.if_steps, (cur, res, v, n, th, neg, th, 3.0, True, True))
    torch.library.opcheck(ops.if_steps, (cur, None, None, None, th, neg, one, float("inf"), False, False))
    torch.library.opcheck(ops.if_steps_inplace, (cur.clone(), res, v, n, th, neg, th, float("inf"), True, True))
    torch.library.opcheck(ops.if_const, (torch.rand(2, 3, 4, 4, generator=g), th, th, 0, 5, 3, True))
    torch.library.opcheck(ops.act_quant, (torch.randn(4, 50, generator=g), None, 1.5, 3.0, 0.5))
    torch.library.opcheck(ops.act_quant_into, (torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g), 1.5,
                                               3.0, 0.5, torch.empty(4, 50)))
    # autograd: the membrane is v0 + sum x - theta * (net spikes): d v_T / d x_t = 1, spikes have no gradient
    c = cur.clone().requires_grad_(True)
    s, vT, _ = ops.if_steps(c, None, None, None, th, neg, one, float("inf"), True, True)
    (vT.sum() + s.sum()).backward()
    assert torch.equal(c.grad, torch.ones_like(c))

    # a neuron on the C++ op traces into one torch.compile graph (fake implementation)
    neuron = IFNeuron(torch.tensor(1.2), 3, 2, backend="cpp")
    x = torch.randn(6, 4, 5)
    expect = neuron(x)
    torch._dynamo.reset()
    got = torch.compile(neuron, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(got, expect)


# ------------------------------------------------------------------------------------- the neuron
@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
def test_neuron_settle_steps_and_bounded(backend):
    """Windows past T: a constant-input neuron emits nothing after T, any other continues its state;
    a bounded neuron's count stays in [0, T]; chunked == one window."""
    T, B = 3, 4
    theta = torch.tensor(0.8)
    x = torch.rand(B, 6) * 1.2
    const = IFNeuron(theta, T, 2, constant_input=True, backend=backend)
    const.t0, const.steps = 0, T + 4
    out = const(x).view(T + 4, B, 6)
    assert torch.equal(out[:T].flatten(0, 1), if_constant(x, theta, 0, T)) and not out[T:].any()
    cur = _currents(T + 4, (B, 6), torch.float32, theta, seed=4, bias=0.6)
    for bounded in (True,) if backend == "compile" else (False, True):  # compile: fewer variants to build
        whole = IFNeuron(theta, T, 2, bounded=bounded, backend=backend)
        whole.steps = T + 4
        y = whole(cur.flatten(0, 1)).view(T + 4, B, 6) / theta
        ref = _reference(cur, theta, True, bound=T if bounded else None)[0]
        assert torch.equal(y, ref)
        if bounded:
            c = y.cumsum(0)
            assert c.min() >= 0 and c.max() <= T
        # in windows of 2 steps with the horizon set to the last step
        part = IFNeuron(theta, T, 2, bounded=bounded, backend=backend)
        part.horizon = T + 4
        outs = []
        for t0 in range(0, T + 4, 2):
            part.t0, part.steps = t0, min(2, T + 4 - t0)
            outs.append(part(cur[t0:t0 + part.steps].flatten(0, 1)).view(part.steps, B, 6))
        assert torch.equal(torch.cat(outs) / theta, ref)
        assert part.v is None  # the last window drops the state
    if backend == "compile":
        return
    lost = IFNeuron(theta, T, 2, backend=backend)
    lost.t0, lost.steps = 0, 3
    lost(cur[:3].flatten(0, 1))  # ends at T: no state kept
    lost.t0, lost.steps = 3, 2
    with pytest.raises(RuntimeError, match="horizon"):
        lost(cur[3:5].flatten(0, 1))


def test_neuron_record_and_gradient_paths():
    theta = torch.tensor(0.9)
    cur = _currents(3, (4, 10), torch.float32, theta, seed=7)
    neuron = IFNeuron(theta, 3, 2)
    neuron.record = True
    y = neuron(cur.flatten(0, 1))
    ref = _reference(cur, theta, True)[0]
    assert torch.equal(y.view(3, 4, 10), ref * theta)
    assert torch.equal(neuron.count, ref.sum(0)) and torch.equal(neuron.events, ref.abs().sum(0))
    neuron.record = False
    neuron.act_alpha.requires_grad_(True)
    y = neuron(cur.flatten(0, 1))
    y.sum().backward()  # d(theta * spikes) / d theta = spikes
    assert torch.allclose(neuron.act_alpha.grad, ref.sum())


@needs_cpp
@pytest.mark.parametrize("mode", ["plain", "inplace", "pooled"])
@pytest.mark.parametrize("signed,bounded", [(True, False), (False, False), (True, True)])
def test_neuron_fast_path_equals_general_path(mode, signed, bounded):
    """The cached fast path of an inference call makes the general path's C++ call: equal bit for bit,
    with and without a residual; a changed threshold, flag, layout, hook or recording is seen at once."""
    from snn.neuron import BufferPool
    T, theta = 3, torch.tensor(0.7)

    def make():
        m = IFNeuron(theta, T, 2, signed=signed, bounded=bounded)
        m.inplace = mode == "inplace"
        if mode == "pooled":
            m.pool, m.pool_slot = BufferPool(1), 0
        return m

    fast, slow = make(), make()
    for seed, res in [(1, False), (2, True), (3, True), (4, False)]:
        cur = _currents(T, (5, 6, 4, 4), torch.float32, theta, seed=seed).flatten(0, 1)
        cur = cur.contiguous(memory_format=torch.channels_last) if seed == 3 else cur
        r = torch.randn_like(cur) * 0.3 if res else None
        with torch.no_grad():
            want = slow._forward(cur.clone(), None if r is None else r.clone()).clone()
            got = fast(cur.clone(), None if r is None else r.clone()).clone()
        assert fast._plan is not None and fast._plan[1] is not None  # the fast path was taken
        assert torch.equal(got, want)
        assert fast.v is None and fast.n is None  # a run that ends here keeps no state
        fast.v = torch.zeros(1)  # a stale state from an earlier windowed run is dropped as well
    with torch.no_grad():
        fast.act_alpha.mul_(1.5)  # in place: the plan's threshold levels must follow
        slow.act_alpha.mul_(1.5)
        assert torch.equal(fast(cur.clone()), slow._forward(cur.clone()))
        fast.act_alpha.data = torch.tensor(0.6)  # a new tensor behind the parameter, too
        slow.act_alpha.data = torch.tensor(0.6)
        assert torch.equal(fast(cur.clone()), slow._forward(cur.clone()))
        fast.signed = slow.signed = not signed
        fast.bounded = slow.bounded = False
        assert torch.equal(fast(cur.clone()), slow._forward(cur.clone()))
        seen = []
        h = fast.register_forward_hook(lambda m, i, o: seen.append(o))
        fast(cur.clone())
        h.remove()
        assert len(seen) == 1
        fast.record = True
        fast(cur.clone())
        assert fast.count is not None and tuple(fast.count.shape) == (5, 6, 4, 4)
    assert copy.deepcopy(fast)._plan is None
    fast.record = False
    fast.act_alpha.requires_grad_(True)  # a gradient is needed: the general (differentiable) path
    y = fast(cur.clone())
    assert y.requires_grad


# ------------------------------------------------------------------------------------- networks
def _spike_trains(net, x):
    got = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: got.__setitem__(k, o.detach().clone()))
             for k, m in net.neurons().items()]
    try:
        y = net(x, per_step=True)
    finally:
        for h in hooks:
            h.remove()
    return y, got


def test_network_identical_across_backends():
    """The whole converted network: every backend's spike trains equal the reference's."""
    torch.manual_seed(0)
    ann = _randomise_bn(TinyResNet(bit=2))
    x = torch.randn(4, 3, 16, 16)
    backends = [b for b, ok in (("cpp", HAVE_CPP), ("compile", HAVE_COMPILE)) if ok]
    for signed in (True, False):
        y, s = _spike_trains(kernels.set_backend(snn.convert(ann, signed=signed), "reference"), x)
        for b in backends + ["auto"]:
            y2, s2 = _spike_trains(kernels.set_backend(snn.convert(ann, signed=signed), b), x)
            assert torch.equal(y, y2) and all(torch.equal(s[k], s2[k]) for k in s), (b, signed)
        if HAVE_COMPILE and signed:  # the optimised network through torch.compile == through auto
            assert torch.equal(snn.optimize(snn.convert(ann), backend="compile")(x), snn.optimize(snn.convert(ann))(x))


@pytest.mark.parametrize("model_fn, bit", [
    (lambda b: TinyResNet(b), 2), (lambda b: TinyResNet(b), 3), (lambda b: TinyYolo(b), 2),
    (lambda b: TinyDeepLab(b), 2), (lambda b: MLP(b), 3),
])
def test_optimized_network_equals_plain(model_fn, bit):
    torch.manual_seed(1)
    ann = _randomise_bn(model_fn(bit))
    x = torch.randn(5, 20) if isinstance(ann, MLP) else torch.randn(5, 3, 16, 16)
    for signed in (True, False):
        net = snn.convert(ann, signed=signed)
        before = copy.deepcopy(net.state_dict())
        opt = snn.optimize(net)
        assert isinstance(opt, snn.SpikingNetwork) and opt is not net and opt.optimized
        assert any(m.inplace for m in opt.neurons().values()) or all(m.constant_input for m in opt.neurons().values())
        assert not any(m.inplace for m in net.neurons().values())  # original untouched
        y_ref, s_ref = _spike_trains(net, x)
        y_opt, s_opt = _spike_trains(opt, x)
        assert sorted(s_ref) == sorted(s_opt)
        first = next(iter(net.neurons()))
        assert torch.equal(s_ref[first], s_opt[first])  # the static prefix is untouched: exact
        total = sum(v.numel() for v in s_ref.values())
        same = sum(int((s_ref[k] == s_opt[k]).sum()) for k in s_ref)
        assert same / total >= 0.999
        if same == total:
            assert torch.allclose(y_ref, y_opt, atol=1e-4, rtol=1e-4)
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
        # without hooks the in-place path runs, through the neurons' cached fast path; same result
        assert torch.equal(opt(x, per_step=True), y_opt)
        if HAVE_CPP and kernels.resolve("auto", x) == "cpp":
            assert all(m._plan is not None and m._plan[1] is not None
                       for m in opt.neurons().values() if not m.constant_input)


@pytest.mark.parametrize("backend", ["reference"] + NATIVE)
def test_if_steps_out_buffer_and_aliases(backend):
    """``out=``: the same values as a new tensor, also when ``out`` is the residual or the current itself
    (every element is read before it is written), channels-last included."""
    theta = torch.tensor(0.75)
    cur = _currents(3, (4, 6, 5, 5), torch.float32, 0.75, seed=7).reshape(12, 6, 5, 5)
    cur = cur.contiguous(memory_format=torch.channels_last).view(3, 4, 6, 5, 5)
    res = _currents(3, (4, 6, 5, 5), torch.float32, 0.75, seed=8).reshape(12, 6, 5, 5)
    res = res.contiguous(memory_format=torch.channels_last).view(3, 4, 6, 5, 5)
    for signed in (True, False):
        ref, v_ref, n_ref = kernels.if_steps(cur, theta, signed, residual=res, scale=theta, backend="reference")
        buf = torch.empty_like(cur)
        got, v, n = kernels.if_steps(cur, theta, signed, residual=res, scale=theta, backend=backend, out=buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(got, ref) and torch.equal(v, v_ref)
        for alias in ("res", "cur"):
            c, r = cur.clone(), res.clone()
            dst = r if alias == "res" else c
            got, v, _ = kernels.if_steps(c, theta, signed, residual=r, scale=theta, backend=backend, out=dst)
            assert got.data_ptr() == dst.data_ptr() and torch.equal(got, ref) and torch.equal(v, v_ref), alias
    x = torch.randn(4, 6, 5, 5) * 0.8
    ref = kernels.if_const_steps(x, theta, 0, 3, T=3, scale=theta, channels_last=True, backend="reference")
    for cl in (True, False):
        buf = torch.empty(12, 6, 5, 5, memory_format=torch.channels_last if cl else torch.contiguous_format)
        got = kernels.if_const_steps(x, theta, 0, 3, T=3, scale=theta, backend=backend, out=buf)
        assert got.data_ptr() == buf.data_ptr() and torch.equal(got, ref)
    with pytest.raises(ValueError):
        kernels.if_const_steps(x, theta, 0, 3, T=3, backend=backend, out=torch.empty(11, 6, 5, 5))


@pytest.mark.parametrize("model_fn", [lambda: TinyResNet(2), lambda: TinyYolo(2), lambda: TinyDeepLab(2)])
def test_optimized_network_reuses_buffers(model_fn):
    """``snn.optimize`` plans reused output buffers (no spike train allocated per forward); results equal
    ``reuse_buffers=False`` bit for bit, over repeated forwards, batch changes, chunks and every backend;
    a neuron with a hook or recording writes a fresh tensor; the network's outputs never alias a buffer."""
    torch.manual_seed(3)
    ann = _randomise_bn(model_fn())
    x = torch.randn(4, 3, 16, 16)
    net = snn.convert(ann)
    plain = snn.optimize(net, reuse_buffers=False)
    assert all(m.pool is None for m in plain.neurons().values())
    opt = snn.optimize(net)
    pooled = [m for m in opt.neurons().values() if m.pool is not None]
    assert pooled and len({id(m.pool) for m in pooled}) == 1
    pool = pooled[0].pool
    assert pool.slots < len(pooled)  # slots are shared
    backends = ["auto", "reference"] + [b for b, ok in (("cpp", HAVE_CPP), ("compile", HAVE_COMPILE)) if ok]
    with torch.no_grad():
        for xx in (x, torch.randn(2, 3, 16, 16), x):
            want = plain(xx, per_step=True)
            for b in backends:
                kernels.set_backend(opt, b)
                y1 = opt(xx, per_step=True)
                y2 = opt(xx, per_step=True)
                assert torch.equal(y1, want) and torch.equal(y2, want), b
                bufs = {t.untyped_storage().data_ptr() for t in pool.bufs if t is not None}
                assert bufs and not (_storages(y1) & bufs)
        kernels.set_backend(opt, "auto")
        # the same buffers from one forward to the next
        opt(x)
        ptrs = [t.data_ptr() if t is not None else None for t in pool.bufs]
        opt(x)
        assert ptrs == [t.data_ptr() if t is not None else None for t in pool.bufs]
        # chunked windows
        opt.chunk = plain.chunk = 1
        assert torch.equal(opt(x, per_step=True), plain(x, per_step=True))
        opt.chunk = plain.chunk = None
        # hooks: the hooked neuron's output is a new tensor each forward (what a hook keeps stays valid)
        name, m = next((k, v) for k, v in opt.neurons().items() if v.pool is not None and not v.constant_input)
        kept = []
        h = m.register_forward_hook(lambda mod, i, o: kept.append(o))
        opt(x)
        opt(torch.randn(4, 3, 16, 16))
        h.remove()
        assert kept[0].data_ptr() != kept[1].data_ptr()
        assert not ({kept[0].untyped_storage().data_ptr()} & {t.untyped_storage().data_ptr()
                                                             for t in pool.bufs if t is not None})
    # copies start with an empty pool of the same plan
    c = copy.deepcopy(opt)
    cp = next(m.pool for m in c.neurons().values() if m.pool is not None)
    assert cp is not pool and cp.slots == pool.slots and all(b is None for b in cp.bufs)


def _storages(y):
    if isinstance(y, torch.Tensor):
        return {y.untyped_storage().data_ptr()}
    if isinstance(y, (list, tuple)):
        return set().union(*(_storages(v) for v in y)) if y else set()
    if isinstance(y, dict):
        return set().union(*(_storages(v) for v in y.values())) if y else set()
    return set()


@pytest.mark.parametrize("model_fn", [lambda: TinyYolo(bit=2), lambda: TinyDeepLab(bit=2)])
def test_optimized_static_bn_in_place_is_bit_exact(model_fn):
    """The static prefix's BN writes over its convolution's output, with the module's values bit for bit:
    the first (constant-input) neurons' trains equal the plain network's."""
    from snn.optimize import InplaceBatchNorm2d
    torch.manual_seed(6)
    net = snn.convert(_randomise_bn(model_fn()))
    opt = snn.optimize(net)
    assert any(type(m) is InplaceBatchNorm2d for m in opt.net.modules())
    assert not any(type(m) is InplaceBatchNorm2d for m in snn.optimize(net, inplace=False).net.modules())
    x = torch.randn(3, 3, 16, 16)
    got = {}
    for tag, n in (("plain", net), ("opt", opt)):
        first = [m for m in n.neurons().values() if m.constant_input]
        hooks = [m.register_forward_hook(lambda m, i, o, k=k, tag=tag: got.__setitem__((tag, k), o.clone()))
                 for k, m in enumerate(first)]
        with torch.no_grad():
            n(x)
        for h in hooks:
            h.remove()
    assert got and all(torch.equal(got[("plain", k)], got[("opt", k)]) for _, k in got)
    bn = _randomise_bn(nn.Sequential(nn.BatchNorm2d(5)))[0]
    for y in (torch.randn(2, 5, 7, 9), torch.randn(2, 5, 7, 9).contiguous(memory_format=torch.channels_last)):
        ref = bn(y)
        bn2 = copy.deepcopy(bn)
        bn2.__class__ = InplaceBatchNorm2d
        with torch.no_grad():
            out = bn2(y)
        assert out.data_ptr() == y.data_ptr() and torch.equal(out, ref)


def test_buffer_plan_never_shares_a_live_train():
    """Liveness of the plan: two trains alive at the same node never share a slot; a train read by the
    graph's output gets none."""
    from snn.optimize import plan_buffers  # noqa: F401 - public helper
    torch.manual_seed(0)
    ann = _randomise_bn(TinyDeepLab(2))
    opt = snn.optimize(snn.convert(ann))
    _check_plan(opt.net.graph, dict(opt.net.named_modules()), IFNeuron)


def _check_plan(graph, mods, writer):
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    slot = {n: mods[n.target].pool_slot for n in nodes if n.op == "call_module" and isinstance(mods[n.target], writer)
            and mods[n.target].pool is not None}
    assert slot

    def last_use(n, seen=None):
        seen = seen or set()
        end = pos[n]
        for u in n.users:
            end = max(end, pos[u])
            if u.op == "call_module" and isinstance(mods[u.target], (nn.Conv2d, nn.Linear, writer)):
                continue
            if u not in seen:
                seen.add(u)
                end = max(end, last_use(u, seen))
        return end
    for a in slot:
        for b in slot:
            if a is not b and slot[a] == slot[b]:
                lo, hi = (a, b) if pos[a] < pos[b] else (b, a)
                # hi may take lo's slot only if lo's last reader is hi itself (written over as it is read)
                assert last_use(lo) < pos[hi] or (last_use(lo) == pos[hi] and lo in hi.args[:2]), (lo, hi)
    out = next(n for n in nodes if n.op == "output")
    assert not any(n in out.all_input_nodes for n in slot)


def test_optimized_network_folds_and_fuses():
    ann = _randomise_bn(TinyResNet(bit=2))
    net = snn.convert(ann)
    opt = snn.optimize(net)
    mods = dict(opt.net.named_modules())
    called = {n.target for n in opt.net.graph.nodes if n.op == "call_module"}
    assert "stem.bn" in called  # the static prefix keeps its BN (bit-exact first layer)
    assert not called & {"b1.bn1", "b1.bn2", "b2.bn1", "b2.bn2", "b2.downsample.1"}  # temporal BNs folded
    assert type(mods["b1.conv1"]) is fused.PooledConv2d and mods["b1.conv1"].bias is not None  # folded, pooled
    assert not any(isinstance(m, fused.Conv2dAdd) for m in mods.values())  # no residual post-op by default
    plain = snn.optimize(net, reuse_buffers=False)  # no pooled outputs: no private op at all
    assert not any(isinstance(m, (fused.Conv2dAdd, fused.PooledConv2d)) for m in plain.modules())
    assert not any(fused.is_add(n) for n in opt.net.graph.nodes)  # residual sums moved into the neurons
    assert mods["b1.act2"].inplace and not mods["stem.act"].inplace
    assert snn.optimize(opt) is opt
    # opt-in: the oneDNN post-op (private op), and its fallback where the op is missing
    x = torch.randn(3, 3, 16, 16)
    post = snn.optimize(net, conv_add_postop=True)
    assert isinstance(post.net.get_submodule("b1.conv2"), fused.Conv2dAdd)
    y_post = post(x)
    spk = lambda m: _spike_trains(m, x)[1]  # noqa: E731
    a, b = spk(opt), spk(post)
    assert sum(int((a[k] == b[k]).sum()) for k in a) / sum(v.numel() for v in a.values()) >= 0.999
    orig = fused._MKLDNN
    try:
        fused._MKLDNN = False
        y_fb = post(x)
    finally:
        fused._MKLDNN = orig
    assert torch.allclose(y_post, y_fb, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunk", [1, 2])
def test_optimized_chunked_equals_unchunked(chunk):
    ann = _randomise_bn(TinyYolo(bit=3))
    x = torch.randn(2, 3, 16, 16)
    full = snn.optimize(snn.convert(ann))
    part = snn.optimize(snn.convert(ann, chunk=chunk))
    assert torch.equal(full(x, per_step=True), part(x, per_step=True))


def test_monitor_and_batch_sizes_on_optimized_network():
    torch.manual_seed(2)
    ann = _randomise_bn(TinyResNet(bit=2))
    net = snn.convert(ann)
    opt = snn.optimize(net)
    x = torch.randn(6, 3, 16, 16)
    with snn.Monitor(ann, net) as m1:
        m1.run(x)
        a = m1.summary()
    with snn.Monitor(ann, opt) as m2:
        m2.run(x)
        b = m2.summary()
    assert [la["name"] for la in a["layers"]] == [lb["name"] for lb in b["layers"]]
    assert b["layers"][0]["agreement"] == 1.0
    for la, lb in zip(a["layers"], b["layers"]):
        assert abs(la["firing_rate"] - lb["firing_rate"]) < 1e-3
    assert abs(a["sops"] - b["sops"]) <= 1e-3 * a["sops"]
    for B in (1, 3, 6):  # any batch size, no recompilation
        assert opt(x[:B]).shape == (B, 10)


# ------------------------------------------------------------------------------------- quantizer
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 3, 7, 15])
def test_fused_act_quant_bit_identical(n, dtype):
    alpha = torch.tensor(1.7, dtype=dtype)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(50_001, generator=g, dtype=dtype) * 2
    k = torch.randint(-2, 2 * n + 3, (2000,), generator=g).to(dtype)
    x[:2000] = k / 2 / n * alpha  # exact ties (round half up)
    x[2000:2006] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1.7, -1e-30], dtype=dtype)
    ref = act_levels(x, alpha, n) * (alpha / n)
    got = fused.act_quant_infer(x, alpha, n)
    same = (ref == got) | (ref.isnan() & got.isnan())
    assert bool(same.all())
    r = torch.randn_like(x)
    ref2 = act_levels(x + r, alpha, n) * (alpha / n)
    buf = x.clone()
    got2 = fused.act_quant_infer(buf, alpha, n, residual=r, out=buf)
    assert bool(((ref2 == got2) | (ref2.isnan() & got2.isnan())).all())
    assert not HAVE_CPP or got2.data_ptr() == buf.data_ptr()  # in place


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns (so -0.0 != +0.0), or NaN in both."""
    nan = a.isnan() & b.isnan()
    ia, ib = a.view(torch.int32 if a.dtype == torch.float32 else torch.int64), b.view(torch.int32 if
                                                                                         b.dtype == torch.float32
                                                                                         else torch.int64)
    return bool(((ia == ib) | nan).all())


def _near_boundaries(alpha: torch.Tensor, n: int, ulps: int = 3) -> torch.Tensor:
    """Inputs at and a few ulps around every rounding boundary (j + 1/2) * alpha / n, 0 and alpha."""
    mids = (torch.arange(-1, n + 2, dtype=torch.float64) + 0.5) * float(alpha) / n
    base = torch.cat([mids, torch.tensor([0.0, float(alpha)], dtype=torch.float64)]).to(torch.float32)
    out, up, down = [base], base.clone(), base.clone()
    for _ in range(ulps):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.full_like(down, -float("inf")))
        out += [up, down]
    return torch.cat(out)


@needs_cpp
@settings(max_examples=300, deadline=None)
@given(alpha=st.one_of(st.floats(2.0 ** -100, 2.0 ** 100, width=32), st.floats(0.0625, 16.0, width=32),
                       st.sampled_from([1.0, 1.7, 6.0, 2.0 ** -126, 1e-45, 3.4e38, 0.0, -1.5,
                                        float("inf"), float("nan")])),
       bit=st.integers(1, 8),
       xs=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=40),
       scale=st.floats(2.0 ** -7, 128.0, width=32), residual=st.booleans())
def test_act_quant_kernel_exact_property(alpha, bit, xs, scale, residual):
    """The native float32 quantizer (level thresholds instead of the division where it applies) gives the
    bit patterns of the formula ``floor(clamp(x / alpha, 0, 1) * n + 1/2) * (alpha / n)`` for any input
    (rounding boundaries and a few ulps around them, negatives, above alpha, +-0, +-inf, NaN, subnormals)
    and any alpha (tiny, huge, subnormal, 0, negative, inf, NaN), on tails and full vector blocks, with and
    without a residual, in place or not."""
    ops = kcpp.load()
    n = 2 ** bit - 1
    a = torch.tensor(alpha, dtype=torch.float32)
    g = torch.Generator().manual_seed(bit)
    parts = [torch.tensor(xs, dtype=torch.float32).reshape(-1), torch.randn(37, generator=g) * scale,
             torch.tensor([0.0, -0.0, 1e-45, -1e-45, float("inf"), -float("inf"), float("nan")])]
    if math.isfinite(alpha) and alpha > 0:
        parts.append(_near_boundaries(a, n))
    x = torch.cat(parts)
    x = x[torch.randperm(x.numel(), generator=g)]  # boundaries in every position of a vector block
    r = torch.randn(x.shape, generator=g) * scale if residual else None
    step = (a / n).item()
    ref = act_levels(x if r is None else x + r, a, n) * (a / n)
    assert _same_bits(ops.act_quant(x, r, float(alpha), float(n), step), ref)
    buf = x.clone()
    ops.act_quant_inplace(buf, r, float(alpha), float(n), step)
    assert _same_bits(buf, ref)


@needs_cpp
@pytest.mark.parametrize("bit", [1, 2, 3, 4])
def test_act_quant_kernel_every_float_near_the_boundaries(bit):
    """Every float32 within 64 ulps of every rounding boundary, for alphas over 60 orders of magnitude."""
    ops = kcpp.load()
    n = 2 ** bit - 1
    for alpha in (1.0, 0.3, 1.7, 6.0, 1e-20, 1e20, 2.0 ** -120, 7.3e37):
        a = torch.tensor(alpha, dtype=torch.float32)
        x = _near_boundaries(a, n, ulps=64)
        ref = act_levels(x, a, n) * (a / n)
        assert _same_bits(ops.act_quant(x, None, alpha, float(n), (a / n).item()), ref), alpha


def test_quant_act_uses_fused_path_only_without_grad():
    act = quant.QuantAct(2, 2.5)
    x = torch.linspace(-3, 6, 1001).view(1, 1, 7, 143)
    with torch.no_grad():
        y0 = act(x)
    x.requires_grad_(True)
    y1 = act(x)
    assert y1.requires_grad and torch.equal(y0, y1.detach())
    assert torch.equal(y0, act_quant(x.detach(), act.act_alpha.detach(), 2))
    assert torch.equal(act(torch.tensor([0.5 * 2.5 / 3, 1.5 * 2.5 / 3])).detach(),
                       torch.tensor([2.5 / 3, 2 * 2.5 / 3]))


def test_optimized_ann_matches_ann():
    torch.manual_seed(3)
    for model in (TinyResNet(bit=2), TinyYolo(bit=3), MLP(bit=3)):
        ann = _randomise_bn(model)
        x = torch.randn(8, 20) if isinstance(ann, MLP) else torch.randn(8, 3, 16, 16)
        for postop in (False, True):
            fast = fused.optimize_ann(ann, conv_add_postop=postop)
            with torch.no_grad():
                a, b = ann(x), fast(x)
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
            assert not any(fused.is_add(n) for n in fast.graph.nodes)
            called = [fast.get_submodule(n.target) for n in fast.graph.nodes if n.op == "call_module"]
            assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in called)
            assert postop or not any(isinstance(m, fused.Conv2dAdd) for m in called)


@pytest.mark.parametrize("model_fn", [lambda: TinyResNet(bit=2), lambda: TinyYolo(bit=3),
                                      lambda: TinyDeepLab(bit=2)])
def test_optimized_ann_reuses_buffers(model_fn):
    """The quantizers of the ANN's inference copy write into reused buffers: the same values as without
    them, bit for bit, in every forward; two values alive at once never share a slot; what reaches the
    output has none."""
    torch.manual_seed(5)
    ann = _randomise_bn(model_fn())
    x = torch.randn(4, 3, 16, 16)
    for cl in (True, False):
        plain = fused.optimize_ann(ann, channels_last=cl, reuse_buffers=False)
        fast = fused.optimize_ann(ann, channels_last=cl)
        acts = [m for m in fast.modules() if isinstance(m, fused.FusedQuantAct)]
        assert any(m.pool is not None for m in acts)
        assert not any(m.pool is not None for m in plain.modules() if isinstance(m, fused.FusedQuantAct))
        with torch.no_grad():
            ref = plain(x)
            for _ in range(3):
                assert torch.equal(fast(x), ref)
            assert torch.equal(fast(x[:2]), plain(x[:2]))  # another batch size: buffers regrow
        assert not HAVE_CPP or any(m.pool.nbytes() > 0 for m in acts if m.pool is not None)  # written there
        _check_plan(fast.graph, dict(fast.named_modules()), fused.FusedQuantAct)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_act_quant_training_matches_reference(dtype):
    """QuantAct's training path (native forward / backward) against quant.functional's autograd."""
    torch.manual_seed(4)
    for bit in (2, 3, 4):
        n = 2 ** bit - 1
        x1 = torch.randn(8, 16, 9, 9, dtype=dtype) * 3
        x1.view(-1)[:500] = torch.randint(-2, 2 * n + 3, (500,)).to(dtype) / 2 / n * 2.5  # ties
        x1.requires_grad_(True)
        x2 = x1.detach().clone().requires_grad_(True)
        a1 = torch.tensor(2.5, dtype=dtype, requires_grad=True)
        a2 = a1.detach().clone().requires_grad_(True)
        g = torch.randn(8, 16, 9, 9, dtype=dtype)
        y1 = fused.act_quant_fused(x1, a1, n)
        y2 = act_quant(x2, a2, bit)
        assert y1.grad_fn is not None and type(y1.grad_fn).__name__.startswith("_FusedActQuant")
        assert torch.equal(y1, y2)
        y1.backward(g)
        y2.backward(g)
        assert torch.equal(x1.grad, x2.grad)
        assert torch.allclose(a1.grad, a2.grad, rtol=1e-5, atol=1e-5)
    # a tensor of several chunks (one per thread), each summed by the vectorised loop
    x1 = (torch.randn(4, 16, 40, 40, dtype=dtype) * 2).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    a1 = torch.tensor(1.7, dtype=dtype, requires_grad=True)
    a2 = a1.detach().clone().requires_grad_(True)
    g = torch.randn_like(x1)
    fused.act_quant_fused(x1, a1, 3).backward(g)
    act_quant(x2, a2, 2).backward(g)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.allclose(a1.grad, a2.grad, rtol=1e-5, atol=1e-4)
    # only the clip needs a gradient; channels-last input; non-contiguous incoming gradient
    act = quant.QuantAct(2, 2.5).to(dtype)
    x = torch.randn(2, 4, 5, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = act(x)
    y.backward(torch.ones(5, 5, 4, 2, dtype=dtype).permute(3, 2, 0, 1))
    a = act.act_alpha.detach().clone().requires_grad_(True)
    act_quant(x, a, 2).backward(torch.ones_like(x))
    assert torch.allclose(act.act_alpha.grad, a.grad)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bit, mode", [(2, None), (3, None), (4, None), (3, "uniform"), (5, None)])
def test_fused_weight_quant_matches_reference(bit, mode, dtype):
    from quant.functional import weight_quant
    torch.manual_seed(bit)
    w1 = (torch.randn(128, 64, 3, 3, dtype=dtype) * 0.2).requires_grad_(True)   # several chunks
    w2 = w1.detach().clone().requires_grad_(True)
    a1 = torch.tensor(1.3, dtype=dtype, requires_grad=True)
    a2 = a1.detach().clone().requires_grad_(True)
    y1 = fused.weight_quant_fused(w1, a1, bit, mode)
    y2 = weight_quant(w2, a2, bit, mode)
    assert type(y1.grad_fn).__name__.startswith("_FusedWeightQuant")
    assert torch.equal(y1, y2)  # bit-identical values: conversion sees the same weights
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-4, atol=1e-6 * float(w2.grad.abs().max()))
    assert torch.allclose(a1.grad, a2.grad, rtol=1e-4, atol=1e-4)
    # the layers use it, with the reference's values
    conv = quant.QuantConv2d(8, 8, 3, wbit=bit, wmode=mode).to(dtype)
    assert type(conv.quantized_weight().grad_fn).__name__.startswith("_FusedWeightQuant")
    assert torch.equal(conv.quantized_weight(), weight_quant(conv.weight, conv.wgt_alpha, bit, mode))


@pytest.mark.parametrize("layout", [False, "auto"])
def test_optimized_layouts(layout):
    torch.manual_seed(5)
    ann = _randomise_bn(TinyResNet(bit=2))
    x = torch.randn(4, 3, 16, 16)
    net = snn.convert(ann)
    opt = snn.optimize(net, channels_last=layout, example=x)
    assert opt.layout in ("channels_last", "contiguous")
    if layout is False:
        assert opt.layout == "contiguous"
    y_ref, s_ref = _spike_trains(net, x)
    y_opt, s_opt = _spike_trains(opt, x)
    same = sum(int((s_ref[k] == s_opt[k]).sum()) for k in s_ref)
    assert same / sum(v.numel() for v in s_ref.values()) >= 0.999
    assert torch.equal(opt(x, per_step=True), y_opt)
    fast = fused.optimize_ann(ann, channels_last=layout, example=x)
    with torch.no_grad():
        assert torch.allclose(fast(x), ann(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "float64", "strided"])
def test_nonzero_per_position_matches_count_nonzero(layout):
    """The Monitor's SOP count: non-zeros per spatial position, for every layout the SNN produces."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(12, 5, 7, 9, generator=g) < 0.3).float() * torch.randn(12, 5, 7, 9, generator=g).sign()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "float64":
        x = x.double()
    elif layout == "strided":
        x = x[:, :, :, ::2]
    got = kernels.nonzero_per_position(x)
    assert got.dtype == torch.int64 and torch.equal(got, torch.count_nonzero(x, dim=(0, 1)))


# ------------------------------------------------------------------------------------- no compiler
def _hidden_compiler_env(tmp_path):
    """PATH with only the Python interpreter (no cc / gcc / c++ / ninja), a fresh kernel cache."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "python").symlink_to(sys.executable)
    env = dict(os.environ, PATH=str(bindir), FASTSNN_CACHE=str(tmp_path / "cache"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), FASTSNN_TEST_HIDDEN_CC="1")
    env.pop("CXX", None)
    env.pop("CC", None)
    env.pop("FASTSNN_KERNEL", None)
    return env


_NO_CC_SCRIPT = r"""
import warnings, torch, snn, quant
from snn import kernels
from snn.kernels import BackendUnavailable
from quant import fused
from test_snn import TinyResNet, _randomise_bn
assert not kernels.cpp_available()
try:
    kernels.if_steps(torch.zeros(3, 4), torch.tensor(1.0), True, backend="cpp")
    raise SystemExit("explicit cpp did not raise")
except BackendUnavailable as e:
    assert "no C++ compiler" in str(e), e
ann = _randomise_bn(TinyResNet(bit=2))
x = torch.randn(2, 3, 16, 16)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    y = snn.convert(ann)(x, per_step=True)            # auto: falls back (cpp, then compile) to the loop
    y2 = snn.optimize(snn.convert(ann))(x, per_step=True)
    with torch.no_grad():
        a = fused.optimize_ann(ann)(x)
msgs = [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]
drops = [m for m in msgs if "is unavailable" in m]
assert len(drops) == len(set(drops)) and any("'cpp'" in m for m in drops), msgs  # once each
ref = kernels.set_backend(snn.convert(ann), "reference")(x, per_step=True)
assert torch.equal(y, ref)
assert fused._MALLOC_TUNED is False   # no allocator tuning as a side effect
print("NO-CC-OK", kernels.available_backends("cpu"))
"""


@pytest.mark.skipif(NO_CC, reason="already running with the compiler hidden")
def test_without_compiler_everything_falls_back(tmp_path):
    """A process whose PATH has no C / C++ compiler: explicit 'cpp' raises a clear error, auto falls back
    once with a warning, results equal the reference."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = _hidden_compiler_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _NO_CC_SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                       cwd=root)
    assert r.returncode == 0 and "NO-CC-OK" in r.stdout, (r.stdout[-2000:], r.stderr[-3000:])
    assert "['reference']" in r.stdout


@pytest.mark.skipif(NO_CC, reason="already running with the compiler hidden")
def test_kernel_suite_green_without_compiler(tmp_path):
    """This whole file, run with the compiler hidden (native tests skip, the rest passes)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = _hidden_compiler_env(tmp_path)
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W",
                        "ignore::RuntimeWarning", os.path.join(root, "tests", "test_kernels.py")],
                       env=env, capture_output=True, text=True, timeout=900, cwd=root)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    progress = "".join(ch for ch in r.stdout.split("[100%]")[0] if ch in ".sF")
    assert progress.count(".") >= 20 and "s" in progress, r.stdout[-2000:]  # ran, with the native tests skipped


# ------------------------------------------------------------------------------------- settle networks
def test_settle_network_per_backend_and_optimized():
    """The settle mode (bounded neurons, steps past T) on the native kernel and optimised:
    the same output as the reference backend, equal to the quantized ANN."""
    from test_dense_core import _settle_model
    torch.manual_seed(0)
    m = _settle_model()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        a = m(x)
        ref = kernels.set_backend(snn.convert(m, T=3, settle=21, neg_tol=1e-9), "reference")(x)
        torch.testing.assert_close(ref, a, rtol=0, atol=1e-12)
        for b in ["auto"] + (["cpp"] if HAVE_CPP else []):
            net = snn.convert(m, T=3, settle=21, neg_tol=1e-9, chunk=2, backend=b)
            assert torch.equal(net(x), ref), b
            assert all(n.bounded for n in net.neurons().values())
        opt = snn.optimize(snn.convert(m, T=3, settle=21, neg_tol=1e-9))
        torch.testing.assert_close(opt(x), a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ["deeplabv1_vgg9", "deeplabv3_r34"])
def test_output_upsampling_buffer_reused_only_when_released(arch):
    """The dense models' final upsampling writes into a buffer kept between forwards (ANN and SNN): values
    equal ``reuse_buffers=False`` bit for bit in both layouts; an output the caller still holds (or a view
    of it) is never overwritten; a released one is reused. The channels-last SNN resizes channels-last."""
    from segmentation.models import get_model
    torch.manual_seed(0)
    ann = _randomise_bn(get_model(arch, 5, bit=2, width=0.125))
    x = torch.randn(2, 3, 41, 41)
    for cl in (True, False):
        nets = [(fused.optimize_ann(ann, channels_last=cl), fused.optimize_ann(ann, channels_last=cl,
                                                                               reuse_buffers=False))]
        conv = snn.convert(ann, T=3)
        nets.append((snn.optimize(conv, channels_last=cl), snn.optimize(conv, channels_last=cl, reuse_buffers=False)))
        for fast, plain in nets:
            assert any(isinstance(m, fused.ReusedResize) for m in fast.modules())
            assert not any(isinstance(m, fused.ReusedResize) for m in plain.modules())
            with torch.no_grad():
                want = plain(x)
                a = fast(x)
                b = fast(x)  # a is held: b must be new memory
                assert torch.equal(a, want) and torch.equal(b, want) and a.shape[-1] > 20  # upsampled
                assert a.data_ptr() != b.data_ptr() and a.stride() == want.stride()
                ptr = b.data_ptr()
                del a, b
                c = fast(x)
                assert c.data_ptr() == ptr and torch.equal(c, want)  # released: reused
                row = c[0, 1]
                del c
                d = fast(x)
                assert d.data_ptr() != row.data_ptr() and torch.equal(row, want[0, 1])  # a view kept it alive
                assert torch.equal(fast(x[:1]), plain(x[:1]))  # another batch size
        # the optimised SNN resizes in its convolutions' layout, as the optimised ANN does; values within an ulp
        # or so of the converted network's (PyTorch's two bilinear kernels round differently)
        with torch.no_grad():
            ref, got = conv(x), nets[1][0](x)
        assert got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
        assert any(n.target is channels_last_4d for n in nets[1][0].head.graph.nodes) == cl


@pytest.mark.parametrize("mode,align", [("bilinear", True), ("bilinear", False), ("nearest", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reused_resize_equals_interpolate(mode, align, dtype):
    """``ReusedResize`` is ``F.interpolate`` (same values, layout) for both layouts, int / tuple sizes; with a
    gradient it is the plain call."""
    torch.manual_seed(1)
    kw = {"mode": mode} if align is None else {"mode": mode, "align_corners": align}
    r = fused.ReusedResize(**kw)
    for x in (torch.randn(2, 3, 7, 9, dtype=dtype), torch.randn(2, 3, 7, 9, dtype=dtype).to(
            memory_format=torch.channels_last)):
        for size in ((20, 17), 13):
            want = torch.nn.functional.interpolate(x, size=size, **kw)
            with torch.no_grad():
                got = r(x, size=size)
            assert torch.equal(got, want) and got.stride() == want.stride()
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    r(x, size=(9, 9)).sum().backward()
    assert x.grad is not None
    assert copy.deepcopy(r)._buf is None


def test_pooled_conv_outputs_equal_plain_and_never_overwrite_a_held_output(monkeypatch):
    """``PooledConv2d``: the plain module's values (channels-last output from a contiguous input too); the
    buffer comes back only once its output is dropped; a shape whose pooled values differ from the
    plain module's (checked once on a random probe) runs the plain module; deepcopy / pickle start empty."""
    import pickle
    monkeypatch.setattr(fused, "POOL_MIN_BYTES", 0)  # pool these small outputs too
    monkeypatch.setattr(fused, "_MALLOC_TUNED", False)
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 16, 3, padding=1).eval()
    for cl in (False, True):
        m = copy.deepcopy(plain)
        fused.pool_conv_outputs(fx.symbolic_trace(nn.Sequential(m)), channels_last=cl)
        pool = m.out_pool
        with torch.no_grad():
            xs = [torch.randn(2, 3, 17, 17) for _ in range(3)]
            y0 = m(xs[0])
            if not fused._MKLDNN or not m._pool_ok[(tuple(xs[0].shape), xs[0].stride(), cl)]:
                pytest.skip("no oneDNN post-op here: the plain module runs")
            assert y0.is_contiguous(memory_format=torch.channels_last) == cl
            y1 = m(xs[1])  # y0 still held: a second buffer
            assert y0.data_ptr() != y1.data_ptr()
            assert torch.equal(y0, plain(xs[0])) and torch.equal(y1, plain(xs[1]))
            p0 = y0.data_ptr()
            del y0
            y2 = m(xs[2])  # y0's buffer is free again
            assert y2.data_ptr() == p0 and torch.equal(y2, plain(xs[2])) and torch.equal(y1, plain(xs[1]))
            assert len(pool._bufs) == 2
            assert copy.deepcopy(m).out_pool._bufs == [] and pickle.loads(pickle.dumps(m)).out_pool._bufs == []
    # a pooled path that differs from the plain module: found on the probe, the plain module runs
    m = copy.deepcopy(plain)
    fused.pool_conv_outputs(fx.symbolic_trace(nn.Sequential(m)))
    orig = fused.PooledConv2d._conv_into
    try:
        fused.PooledConv2d._conv_into = lambda self, out, x, w: (orig(self, out, x, w), out.add_(1e-3))
        with torch.no_grad():
            x = torch.randn(2, 3, 9, 9)
            assert torch.equal(m(x), plain(x)) and m.out_pool._bufs == []
    finally:
        fused.PooledConv2d._conv_into = orig


def test_pooled_conv_only_where_it_pays(monkeypatch):
    """Small outputs (reused by the heap anyway) and a heap that keeps large blocks (``tune_malloc``) take
    the plain module; a contiguous input into a channels-last output is pooled either way (it saves
    oneDNN's reorders)."""
    monkeypatch.setattr(fused, "_MALLOC_TUNED", False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    x = torch.randn(1, 3, 17, 17)
    for cl, big, tuned, pooled in ((False, False, False, False), (False, True, False, True), (False, True, True, False),
                                   (True, False, True, True)):
        monkeypatch.setattr(fused, "POOL_MIN_BYTES", 0 if big else 1 << 40)
        monkeypatch.setattr(fused, "_MALLOC_TUNED", tuned)
        m = nn.Conv2d(3, 16, 3, padding=1).eval()
        fused.pool_conv_outputs(fx.symbolic_trace(nn.Sequential(m)), channels_last=cl)
        with torch.no_grad():
            y = m(x)
        tried = bool(m.__dict__.get("_pool_ok"))  # the pooled path was considered (and checked once)
        assert tried == (pooled and fused._MKLDNN), (cl, big, tuned)
        if tried and all(m._pool_ok.values()):  # oneDNN gave the plain values here: the output is pooled
            assert len(m.out_pool._bufs) == 1 and y.is_contiguous(memory_format=torch.channels_last) == cl
        else:
            assert m.out_pool._bufs == [] and torch.equal(y, nn.Conv2d.forward(m, x))


def test_kernel_build_folder_differs_per_checkout(tmp_path, monkeypatch):
    """Two checkouts of the same source never share a build folder: ninja's build file names the source's
    path, so a shared folder would be rebuilt by each checkout in turn."""
    import shutil

    from snn.kernels import cpp as kcpp
    here = kcpp.build_dir()
    other = tmp_path / "checkout" / "snn" / "csrc" / "fastsnn_ops.cpp"
    other.parent.mkdir(parents=True)
    shutil.copyfile(kcpp.SOURCE, other)
    monkeypatch.setattr(kcpp, "SOURCE", str(other))
    assert kcpp.build_dir() != here
