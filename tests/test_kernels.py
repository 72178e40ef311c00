"""Fused kernels: bit-identical to the reference loops; the optimised SNN / ANN equal the plain ones.

No test here measures time (benchmarks/ does that)."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import quant
import snn
from quant import fused
from quant.functional import act_levels, act_quant
from snn import kernels
from snn.neuron import if_constant, if_multistep
from snn.optimize import FusedIFNeuron

from test_snn import MLP, TinyDeepLab, TinyResNet, TinyYolo, _randomise_bn

needs_cpp = pytest.mark.skipif(not kernels.cpp_available(), reason="no C compiler: native kernels unavailable")


def _currents(T, shape, dtype, theta, seed):
    """Random currents with many exact ties: multiples of theta/4 land on the threshold exactly."""
    g = torch.Generator().manual_seed(seed)
    cur = torch.randn((T,) + shape, generator=g, dtype=dtype) * float(theta) * 0.8
    ties = torch.randint(-4, 5, cur.shape, generator=g).to(dtype) * (theta / 4)
    m = torch.rand(cur.shape, generator=g) < 0.4
    cur[m] = ties[m]
    return cur


def _reference(cur, theta, signed, v=None, n=None, neg_tol=1e-3):
    v = torch.full_like(cur[0], 0.5) * theta if v is None else v
    n = (torch.zeros_like(cur[0]) if n is None else n) if signed else None
    return if_multistep(cur, theta, v, n, signed, neg_tol)


# ------------------------------------------------------------------------------------- cpp kernel
@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("T", [1, 3, 7, 15])
def test_cpp_kernel_bit_identical(T, signed, dtype):
    theta = torch.tensor(1.3, dtype=dtype)
    cur = _currents(T, (3, 2100), dtype, theta, seed=T)  # > one 2048-neuron block, ragged tail
    ref, rv, rn = _reference(cur, theta, signed)
    s, v, n = kernels.if_steps(cur, theta, signed, backend="cpp")
    assert torch.equal(s, ref) and torch.equal(v, rv)
    assert (n is None and rn is None) if not signed else torch.equal(n, rn)
    # scaled output, residual current (added first), in place
    res = _currents(T, (3, 2100), dtype, theta, seed=100 + T) * 0.5
    ref2, _, _ = _reference(cur + res, theta, signed)
    buf = cur.clone()
    s2, v2, n2 = kernels.if_steps(buf, theta, signed, residual=res, scale=float(theta), out=buf, state=False,
                                  backend="cpp")
    assert s2.data_ptr() == buf.data_ptr() and v2 is None and n2 is None
    assert torch.equal(s2, ref2 * theta)


@needs_cpp
@pytest.mark.parametrize("signed", [True, False])
def test_cpp_kernel_state_carries_over_windows(signed):
    theta = torch.tensor(0.7)
    cur = _currents(7, (5000,), torch.float32, theta, seed=3)
    ref, rv, rn = _reference(cur, theta, signed)
    s1, v, n = kernels.if_steps(cur[:3], theta, signed, backend="cpp")
    s2, v, n = kernels.if_steps(cur[3:], theta, signed, v=v, n=n, backend="cpp")
    assert torch.equal(torch.cat([s1, s2]), ref) and torch.equal(v, rv)


@needs_cpp
def test_cpp_kernel_layouts_and_multithreading():
    """Channels-last currents, a residual in another layout, and enough neurons for several threads."""
    theta = torch.tensor(1.1)
    T, B = 3, 4
    cur = _currents(T, (B * 8, 16, 16), torch.float32, theta, seed=5).view(T * B, 8, 16, 16)
    cur_cl = cur.contiguous(memory_format=torch.channels_last)
    res = torch.randn(T * B, 8, 16, 16) * 0.2
    ref, _, _ = _reference((cur + res).view(T, B, 8, 16, 16), theta, True)
    with torch.no_grad():
        s, _, _ = kernels.if_steps(cur_cl.view(T, B, 8, 16, 16), theta, True, residual=res.view(T, B, 8, 16, 16),
                                   backend="cpp")
    assert torch.equal(s, ref)
    torch.set_num_threads(2)
    big = _currents(3, (70_000,), torch.float32, theta, seed=6)
    assert torch.equal(kernels.if_steps(big, theta, True, backend="cpp")[0], _reference(big, theta, True)[0])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_current_kernel_bit_identical(dtype):
    theta = torch.tensor(1.5, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 7, generator=g, dtype=dtype) * 2
    x.view(-1)[:60] = torch.arange(60, dtype=dtype) * theta / 14  # exact ties for T = 7
    for T in (1, 3, 7, 15):
        for t0, steps in ((0, T), (1, max(T - 1, 1)), (T - 1, 1)):
            ref = if_constant(x, theta, t0, steps)
            for cl in (False, True):
                got = kernels.if_const_steps(x, theta, t0, steps, scale=float(theta), channels_last=cl,
                                             backend="cpp")
                assert torch.equal(got, ref)
                assert not cl or got.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(kernels.if_const_steps(x, theta, t0, steps, backend="cpp"), ref / theta)


def test_reference_backend_and_env(monkeypatch):
    theta = torch.tensor(1.0)
    cur = _currents(3, (50,), torch.float32, theta, seed=1)
    monkeypatch.setenv("FASTSNN_KERNEL", "reference")
    assert kernels.default_backend() == "reference"
    s, _, _ = kernels.if_steps(cur, theta, True)
    assert torch.equal(s, _reference(cur, theta, True)[0])
    monkeypatch.setenv("FASTSNN_KERNEL", "bogus")
    from quant.fused import _WARNED
    _WARNED.discard("env:bogus")
    with pytest.warns(RuntimeWarning, match="unknown"):
        assert kernels.default_backend() == "auto"


def test_build_failure_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    from quant.fused import _LIBS, _WARNED
    _WARNED.discard("cc")
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert fused.build_native("fsnn_test_missing_cc", "int f(void) { return 1; }") is None
    _LIBS.pop("fsnn_test_missing_cc", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: silent
        assert fused.build_native("fsnn_test_missing_cc", "int f(void) { return 1; }") is None
    _LIBS.pop("fsnn_test_missing_cc", None)
    # the dispatcher then takes the reference loop
    monkeypatch.setattr(kernels, "_lib", lambda: None)
    monkeypatch.setattr(kernels, "_COMPILE_FAILED", True)
    theta = torch.tensor(1.0)
    cur = _currents(3, (40,), torch.float32, theta, seed=2)
    assert torch.equal(kernels.if_steps(cur, theta, False)[0], _reference(cur, theta, False)[0])


def test_broken_source_falls_back(monkeypatch):
    from quant.fused import _LIBS, _WARNED
    _WARNED.discard("build:fsnn_test_broken")
    with pytest.warns(RuntimeWarning, match="failed"):
        assert fused.build_native("fsnn_test_broken", "this is not C") is None
    _LIBS.pop("fsnn_test_broken", None)


def test_unsupported_dtype_takes_reference():
    theta = torch.tensor(1.0, dtype=torch.float16)
    cur = (torch.randn(3, 64) * 0.7).to(torch.float16)
    s, _, _ = kernels.if_steps(cur, theta, True, backend="cpp")
    assert torch.equal(s, _reference(cur, theta, True)[0])


# ------------------------------------------------------------------------------------- triton / compile
_TRITON_SCRIPT = r"""
import torch
from snn import kernels
from snn.neuron import if_multistep

def ref(cur, theta, signed, v=None, n=None):
    v = torch.full_like(cur[0], 0.5) * theta if v is None else v
    n = (torch.zeros_like(cur[0]) if n is None else n) if signed else None
    return if_multistep(cur, theta, v, n, signed)

g = torch.Generator().manual_seed(0)
theta = torch.tensor(0.9)
for T, signed in ((1, True), (3, True), (7, False), (3, False)):
    cur = torch.randn(T, 1500, generator=g) * 0.7
    m = torch.rand(cur.shape, generator=g) < 0.4
    cur[m] = (torch.randint(-4, 5, cur.shape, generator=g).float() * theta / 4)[m]  # exact ties
    res = torch.randn(cur.shape, generator=g) * 0.3
    r, rv, rn = ref(cur + res, theta, signed)
    s, v, n = kernels.if_steps(cur, theta, signed, residual=res, backend="triton")
    assert torch.equal(s, r) and torch.equal(v, rv), (T, signed)
    assert (not signed) or torch.equal(n, rn)
    s1, _, _ = kernels.if_steps(cur, theta, signed, residual=res, v=rv, n=rn, scale=float(theta), backend="triton")
    r1, _, _ = ref(cur + res, theta, signed, rv.clone(), rn.clone() if signed else None)
    assert torch.equal(s1, r1 * theta), (T, signed)
assert "k" in kernels._TRITON and kernels._TRITON_OK.get("cpu") is True  # the Triton kernel ran, self-check passed
print("TRITON-OK")
"""


def test_triton_kernel_interpreter_bit_identical():
    """The CUDA kernel's code, run on CPU by Triton's interpreter (a fresh process: the mode is fixed
    when Triton is first imported)."""
    pytest.importorskip("triton")
    pytest.importorskip("numpy")
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "TRITON-OK" in r.stdout, r.stderr[-3000:]


def test_compile_backend_bit_identical():
    pytest.importorskip("torch._inductor")
    theta = torch.tensor(1.2)
    cur = _currents(3, (2, 300), torch.float32, theta, seed=9)
    res = torch.randn_like(cur) * 0.3
    ref, rv, rn = _reference(cur + res, theta, True)
    s, v, n = kernels.if_steps(cur, theta, True, residual=res, backend="compile")
    if kernels._COMPILE_FAILED:
        pytest.skip("torch.compile is not usable here (the reference loop was used)")
    assert torch.equal(s, ref) and torch.equal(v, rv) and torch.equal(n, rn)
    # another batch size: no recompilation needed (dynamic), same result
    cur2 = _currents(3, (5, 77), torch.float32, theta, seed=10)
    res2 = torch.zeros_like(cur2)
    assert torch.equal(kernels.if_steps(cur2, theta, True, residual=res2, backend="compile")[0],
                       _reference(cur2, theta, True)[0])
    # fresh state, no state out, scaled, channels-last [T, B, C, H, W] view: the lean variant
    c4 = _currents(3, (2 * 4, 5, 6), torch.float32, theta, seed=11).view(6, 4, 5, 6)
    c4 = c4.contiguous(memory_format=torch.channels_last).view(3, 2, 4, 5, 6)
    s4, v4, n4 = kernels.if_steps(c4, theta, True, state=False, scale=float(theta), backend="compile")
    assert v4 is None and n4 is None
    assert torch.equal(s4, _reference(c4.contiguous(), theta, True)[0] * theta)
    # a whole optimised network through the compiled kernel equals the C kernel's
    ann = _randomise_bn(TinyResNet(bit=2))
    x = torch.randn(3, 3, 16, 16)
    net = snn.convert(ann)
    assert torch.equal(snn.optimize(net, kernel="compile")(x), snn.optimize(net)(x))


# ------------------------------------------------------------------------------------- networks
def test_backend_hook_gives_identical_network():
    torch.manual_seed(0)
    ann = _randomise_bn(TinyResNet(bit=3))
    x = torch.randn(4, 3, 16, 16)
    for signed in (True, False):
        ref = kernels.enable(snn.convert(ann, signed=signed), "reference")
        assert all(m.backend is kernels.reference_backend for m in ref.neurons().values())
        y = ref(x, per_step=True)
        fast = kernels.enable(snn.convert(ann, signed=signed), "cpp" if kernels.cpp_available() else None)
        assert torch.equal(y, fast(x, per_step=True))
        kernels.disable(fast)
        assert all(m.backend is None for m in fast.neurons().values())
        assert torch.equal(y, fast(x, per_step=True))  # the default dispatcher (auto)


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
        assert all(isinstance(m, FusedIFNeuron) for m in opt.neurons().values())
        assert not any(isinstance(m, FusedIFNeuron) for m in net.neurons().values())  # original untouched
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
        # without hooks the in-place path runs; same result
        assert torch.equal(opt(x, per_step=True), y_opt)


def test_optimized_network_folds_and_fuses():
    ann = _randomise_bn(TinyResNet(bit=2))
    opt = snn.optimize(snn.convert(ann))
    mods = dict(opt.net.named_modules())
    called = {n.target for n in opt.net.graph.nodes if n.op == "call_module"}
    assert "stem.bn" in called  # the static prefix keeps its BN (bit-exact first layer)
    assert not called & {"b1.bn1", "b1.bn2", "b2.bn1", "b2.bn2", "b2.downsample.1"}  # temporal BNs folded
    assert type(mods["b1.conv1"]) is nn.Conv2d and mods["b1.conv1"].bias is not None
    assert isinstance(mods["b1.conv2"], fused.Conv2dAdd)  # the residual sum is the conv's post-op
    assert not any(fused.is_add(n) for n in opt.net.graph.nodes)  # residual sums moved into the neurons
    assert mods["b1.act2"].inplace and not mods["stem.act"].inplace
    assert snn.optimize(opt) is opt


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
    assert [l["name"] for l in a["layers"]] == [l["name"] for l in b["layers"]]
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
    got2 = fused.act_quant_infer(x.clone(), alpha, n, residual=r)
    assert bool(((ref2 == got2) | (ref2.isnan() & got2.isnan())).all())


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
        fast = fused.optimize_ann(ann)
        with torch.no_grad():
            a, b = ann(x), fast(x)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
        assert not any(fused.is_add(n) for n in fast.graph.nodes)
        called = [fast.get_submodule(n.target) for n in fast.graph.nodes if n.op == "call_module"]
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in called)


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
    # only the clip needs a gradient; channels-last input; non-contiguous incoming gradient
    act = quant.QuantAct(2, 2.5).to(dtype)
    x = torch.randn(2, 4, 5, 5, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = act(x)
    y.backward(torch.ones(5, 5, 4, 2, dtype=dtype).permute(3, 2, 0, 1))
    a = act.act_alpha.detach().clone().requires_grad_(True)
    act_quant(x, a, 2).backward(torch.ones_like(x))
    assert torch.allclose(act.act_alpha.grad, a.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bit, mode", [(2, None), (3, None), (4, None), (3, "uniform"), (5, None)])
def test_fused_weight_quant_matches_reference(bit, mode, dtype):
    from quant.functional import weight_quant
    torch.manual_seed(bit)
    w1 = (torch.randn(64, 32, 3, 3, dtype=dtype) * 0.2).requires_grad_(True)
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
        assert isinstance(opt.net.get_submodule("b1.conv2"), fused.Conv2dAdd)
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
