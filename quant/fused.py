"""Fused inference kernels for the quantizer, and the layout helpers shared with ``snn.kernels``.

The quantizer's native kernels are PyTorch custom operators of the same C++ library as the IF
kernels (``torch.ops.fastsnn.act_quant`` / ``act_quant_bwd`` / ``wq_fwd`` / ``wq_bwd``,
``snn/csrc/fastsnn_ops.cpp``, built on first use by :mod:`snn.kernels.cpp` through
``torch.utils.cpp_extension``): they check devices, dtypes and layouts, have fake implementations for
torch.compile, and every float operation is the reference's (no fast-math, ``-ffp-contract=off``).
Without a C++ compiler (or ``FASTSNN_KERNEL=reference``) everything runs the plain PyTorch reference,
after one warning.

Quantizer inference (``torch.no_grad``): :func:`act_quant_infer` computes the quantized ReLU
``floor(clamp(x / alpha, 0, 1) * n + 1/2) * (alpha / n)`` in one pass over memory, bit-identical to
:func:`quant.functional.act_quant` (round half up). The float32 kernel does it without the division
where the CPU has AVX-512 (up to 15 levels, alpha > 0): with alpha > 0 every operation of that chain is
correctly rounded and monotone, so the level is a step function of ``x`` with exact thresholds, found once
per call by bisection over the floats; a multiply-add guesses the level (biased to be exact or one low)
and one comparison with the next threshold corrects it. ``QuantAct`` uses it automatically when no gradient
is needed; in training, :class:`_FusedActQuant` / :class:`_FusedWeightQuant` are one-pass forward /
backward kernels with the reference's values.

:func:`optimize_ann` returns an inference copy of a quantized ANN: quantized weights computed once,
eval-mode BatchNorm folded into the preceding conv / linear, a residual addition fused into the
quantizer that follows it, channels-last layout for the convolutions, the quantizers' and the
convolutions' outputs in reused buffers. It equals the ANN up to float
rounding (BN folding changes the last bit of a pre-activation; a level can differ only where the
pre-activation lies within ~1e-6 of a rounding boundary). The oneDNN convolution with a post-op sum (a
private op, ``torch.ops.mkldnn._convolution_pointwise_``) writes a convolution into a reused, zeroed
buffer (:class:`PooledConv2d`: used only where it gives the plain module's values bit for bit, checked
once per input shape; ``reuse_buffers=False`` turns it off); as the fusion of a residual sum
(``conv(x) + r`` into ``r``) it is used only on request (``conv_add_postop=True``), with a plain
``conv(x) + r`` fallback.

:func:`tune_malloc` (glibc allocator thresholds) is never applied implicitly: a script or benchmark
calls it on an explicit flag.
"""
from __future__ import annotations

import copy
import ctypes
import math
import operator
import os
import warnings
from typing import Dict, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .functional import FULL_PRECISION, act_levels, act_quant_levels, num_levels
from .layers import WEIGHT_LAYERS, QuantAct
from .utils import set_module

# ----------------------------------------------------------------------------------------------
# native ops (the C++ library of snn.kernels.cpp)
# ----------------------------------------------------------------------------------------------
_WARNED = set()


def warn_once(key: str, msg: str):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


_OPS = {}


def native_ops():
    """``torch.ops.fastsnn`` with the native kernels, or ``None`` (one warning) where they cannot be
    built; ``None`` without a warning under ``FASTSNN_KERNEL=reference``."""
    if os.environ.get("FASTSNN_KERNEL", "auto").lower() == "reference":
        return None
    if "ops" not in _OPS:
        from snn.kernels import cpp  # lazy: snn imports quant
        try:
            _OPS["ops"] = cpp.load()
        except cpp.BackendUnavailable as e:
            warn_once("quant-native", f"fast-snn: native quantizer kernels unavailable ({e}); using plain PyTorch")
            _OPS["ops"] = None
    return _OPS["ops"]


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


_FLOATS = (torch.float32, torch.float64)


def native_ok(*ts: torch.Tensor) -> bool:
    """The native CPU kernels apply: CPU float32 / float64 tensors, no autograd needed."""
    t = ts[0]
    return (t.device.type == "cpu" and t.dtype in _FLOATS and all(u.dtype == t.dtype and u.device == t.device
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
    if residual is not None and residual.shape != x.shape:
        x = x + residual  # broadcasting: not fused
        residual = None
    ops = native_ops() if native_ok(x, alpha) and (residual is None or native_ok(x, residual)) else None
    if ops is not None:
        if not _dense(x):
            x = x.contiguous()
        if residual is not None:
            residual = like_layout(residual, x)
        a, step = floats if floats is not None else act_floats(alpha, n, x.dtype)  # step: the reference's alpha / n
        if out is not None and out.data_ptr() == x.data_ptr() and dense_same_layout(x, out):
            ops.act_quant_inplace(x, residual, a, float(n), step)
            return x
        if out is not None and dense_same_layout(x, out) and out.dtype == x.dtype and out.device == x.device:
            ops.act_quant_into(x, residual, a, float(n), step, out)  # out may be the residual
            return out
        y = ops.act_quant(x, residual, a, float(n), step)
        if out is not None and out.shape == y.shape and out.dtype == y.dtype:
            return out.copy_(y)
        return y
    v = x if residual is None else x + residual
    return act_levels(v, alpha, n) * (alpha / n)


class _FusedActQuant(torch.autograd.Function):
    """``quant.functional._ActQuant`` with one-pass native forward / backward kernels: the same
    values and input gradient bit for bit; the clip's gradient is the same sum, accumulated in double
    (so it equals the reference up to float summation order). Saves ``x`` only (not the levels)."""

    @staticmethod
    def forward(ctx, x, alpha, n):
        ops = native_ops()
        a = alpha.detach().to(x.dtype)
        out = ops.act_quant(x.detach(), None, a.item(), float(n), (a / n).item())
        ctx.save_for_backward(x, alpha)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, g):
        x, alpha = ctx.saved_tensors
        need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_a):
            return None, None, None
        ops = native_ops()
        x = x.detach()
        g = like_layout(g, x)
        if g.dtype != x.dtype:
            g = g.to(x.dtype)
        a = alpha.detach().to(x.dtype)
        gx, acc = ops.act_quant_bwd(x, g, a.item(), float(ctx.n), bool(need_x), bool(need_a))
        ga = acc.to(alpha.dtype).reshape(alpha.shape) if need_a else None
        return (gx if need_x else None), ga, None


def act_quant_fused(x: torch.Tensor, alpha: torch.Tensor, n: int) -> torch.Tensor:
    """The quantized ReLU onto ``n`` levels as fast as available: no autograd -> one-pass inference
    kernel; CPU float32 / float64 with autograd -> :class:`_FusedActQuant`; else the reference
    :func:`quant.functional.act_quant_levels`."""
    if not (torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad)):
        return act_quant_infer(x, alpha, n)
    if x.device.type == "cpu" and x.dtype in _FLOATS and alpha.dtype == x.dtype and alpha.numel() == 1 \
            and _dense(x) and not torch.compiler.is_compiling() and native_ops() is not None:
        return _FusedActQuant.apply(x, alpha, int(n))
    return act_quant_levels(x, alpha, n)


class _FusedWeightQuant(torch.autograd.Function):
    """``weight_quant`` (standardise, clip, project, straight-through estimator) with native kernels:
    the forward is bit-identical to the reference (mean / std from the same torch reductions, then one
    elementwise pass); the backward is the same formula in two passes (sums accumulated in double)."""

    @staticmethod
    def forward(ctx, w, alpha, mags, pass_outside):
        ops = native_ops()
        w = w.detach()
        mu = w.mean()
        sd = w.std()
        s = sd + 1e-12
        mids = (mags[1:] + mags[:-1]) * 0.5
        if mids.numel() < 15:  # the kernel reads 15 midpoints when there are <= 16 levels
            mids = torch.cat([mids, mids.new_full((15 - mids.numel(),), float("inf"))])
        mids, mags = mids.contiguous(), mags.contiguous()
        a = float(alpha.reshape(()))
        out = ops.wq_fwd(w, mu.item(), s.item(), a, mids, mags)
        ctx.save_for_backward(w, alpha, mids, mags)
        ctx.stats = (mu.item(), s.item(), sd.item())
        ctx.pass_outside = bool(pass_outside)
        return out

    @staticmethod
    def backward(ctx, g):
        w, alpha, mids, mags = ctx.saved_tensors
        ops = native_ops()
        mu, s, sd = ctx.stats
        a = float(alpha.reshape(()))
        g = g.contiguous().to(w.dtype)
        want_w = bool(ctx.needs_input_grad[0])
        grad_w, sums = ops.wq_bwd(w.detach(), g, mu, s, sd, a, mids, mags, ctx.pass_outside, want_w)
        grad_a = sums[2].to(alpha.dtype).reshape(alpha.shape) if ctx.needs_input_grad[1] else None
        return (grad_w if want_w else None), grad_a, None, None


def weight_quant_fused(w: torch.Tensor, alpha: Optional[torch.Tensor], bit: int, mode: Optional[str] = None):
    """:func:`quant.functional.weight_quant` through the native kernels where they apply (CPU float32 /
    float64, contiguous weight); the values are bit-identical, the gradients equal up to rounding."""
    from .functional import default_weight_mode, weight_magnitudes, weight_quant
    if bit >= FULL_PRECISION:
        return w
    if w.device.type != "cpu" or w.dtype not in _FLOATS or not w.is_contiguous() or w.numel() < 2 \
            or alpha is None or alpha.numel() != 1 or alpha.dtype != w.dtype or torch.compiler.is_compiling() \
            or native_ops() is None:
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
    """Inference quantized ReLU, optionally of a sum ``x + residual`` (fused), optionally in place, or into
    a reused buffer (``pool`` / ``pool_slot``: a :class:`snn.neuron.BufferPool` slot planned by
    :func:`optimize_ann`; CPU only, never while the module has hooks)."""

    def __init__(self, act: QuantAct, inplace: bool = False):
        super().__init__()
        self.bit = act.bit
        self.act_alpha = nn.Parameter(act.act_alpha.detach().clone(), requires_grad=False)
        self.inplace = inplace
        self.pool, self.pool_slot = None, -1
        self._cache = None

    def forward(self, x, residual=None):
        n = num_levels(self.bit)
        a = self.act_alpha
        key = (id(a), a._version, a.data_ptr(), x.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, act_floats(a, n, x.dtype))
        hooked = bool(self._forward_hooks or self._forward_pre_hooks)
        out = x if self.inplace and not hooked else None
        if self.pool is not None and not hooked and x.device.type == "cpu" and _dense(x) \
                and (residual is None or residual.shape == x.shape):
            out = self.pool.get(self.pool_slot, x.shape, x.stride(), x)
        return act_quant_infer(x, a, n, residual, out=out, floats=self._cache[1])

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
        return tuple(r.shape) == _conv2d_out_shape(self, x)


def _conv2d_out_shape(conv: nn.Conv2d, x: torch.Tensor) -> tuple:
    """The output shape of ``conv`` (tuple padding) on a 4-d input ``x``."""
    n, _, h, w = x.shape
    return (n, conv.out_channels,
            (h + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1,
            (w + 2 * conv.padding[1] - conv.dilation[1] * (conv.kernel_size[1] - 1) - 1) // conv.stride[1] + 1)


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


def _storage_users(t: torch.Tensor) -> int:
    """How many tensors share ``t``'s storage (``-1``: unknown on this PyTorch)."""
    try:
        return int(torch._C._storage_Use_Count(t.untyped_storage()._cdata))
    except (AttributeError, RuntimeError):
        return -1


class OutputPool:
    """Output buffers kept from one forward to the next and shared by a network's convolutions
    (:class:`PooledConv2d`). A buffer is handed out only while no tensor but the pool refers to its
    storage (:func:`_storage_users`), so an output still read downstream -- or kept by the caller -- is
    never overwritten; otherwise a new one is allocated. At most ``max_buffers`` are kept (the least
    recently used free one goes first)."""

    def __init__(self, max_buffers: int = 16):
        self.max_buffers = max_buffers
        self._bufs: list = []  # [tensor, users when free, last use]
        self._clock = 0

    def take(self, shape, dtype, memory_format) -> torch.Tensor:
        self._clock += 1
        for e in self._bufs:
            b = e[0]
            if tuple(b.shape) == shape and b.dtype == dtype and b.is_contiguous(memory_format=memory_format) \
                    and _storage_users(b) == e[1]:
                e[2] = self._clock
                return b
        b = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        users = _storage_users(b)
        if users > 0:  # users countable: keep it
            if len(self._bufs) >= self.max_buffers:
                free = [e for e in self._bufs if _storage_users(e[0]) == e[1]]
                if free:
                    self._bufs.remove(min(free, key=lambda e: e[2]))
            if len(self._bufs) < self.max_buffers:
                self._bufs.append([b, users, self._clock])
        return b

    def clear(self):
        self._bufs = []

    @property
    def nbytes(self) -> int:
        return sum(e[0].numel() * e[0].element_size() for e in self._bufs)

    def __deepcopy__(self, memo):
        return OutputPool(self.max_buffers)

    def __getstate__(self):
        return {"max_buffers": self.max_buffers, "_bufs": [], "_clock": 0}


# glibc's largest dynamic mmap threshold (64-bit): a block at least this large is mmap'ed fresh, and
# page-faulted in, on every allocation unless the heap keeps it (tune_malloc); smaller ones are reused
POOL_MIN_BYTES = 32 << 20


def _heap_keeps_large() -> bool:
    return _MALLOC_TUNED or "MALLOC_MMAP_THRESHOLD_" in os.environ


class PooledConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose output (CPU, float32, oneDNN, no gradient) goes into a buffer of its
    network's :class:`OutputPool` instead of fresh memory, where that pays: an output of at least
    ``POOL_MIN_BYTES`` (at 416-513 px a convolution's output is 10-400 MB; glibc maps such a block
    afresh, page-faulted in on every forward, unless :func:`tune_malloc` keeps it in the heap), and, with
    ``out_channels_last``, a contiguous input such as the network's own image (a channels-last weight
    and output spare oneDNN two reorders of the output: the analog-input convolution at 513 px runs
    about 6x faster). The buffer is zeroed and the convolution adds into it (oneDNN's post-op sum, the
    kernel :class:`Conv2dAdd` uses): ``conv(x) + 0``, the same values. Each input shape and layout
    is checked once, on a random probe, against the plain module; where they differ, or elsewhere (training,
    CUDA, gradients, hooks), it is the plain module."""

    out_pool: Optional[OutputPool] = None
    out_channels_last = False  # write a channels-last output (channels-last weight copy) from any input layout

    def forward(self, x, *args):
        if args or not self._poolable(x):
            return super().forward(x, *args)
        cl = self.out_channels_last or (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        shape = _conv2d_out_shape(self, x)
        reorders = cl and not x.is_contiguous(memory_format=torch.channels_last)
        if not reorders and (_heap_keeps_large() or 4 * math.prod(shape) < POOL_MIN_BYTES):
            return super().forward(x)  # a fresh output costs no page faults: the plain module is cheaper
        fmt = torch.channels_last if cl else torch.contiguous_format
        weight = self._weight(cl)
        key = (tuple(x.shape), x.stride(), cl)
        ok = self.__dict__.setdefault("_pool_ok", {})
        if key not in ok:  # first call at this input: the plain module's values (and layout), or never again
            ok[key] = self._same_as_plain(x, shape, fmt, weight)
        if not ok[key]:
            return super().forward(x)
        out = self.out_pool.take(shape, x.dtype, fmt)
        self._conv_into(out, x, weight)
        return out.as_strided(out.size(), out.stride())  # a new tensor: the caller's reference counts

    def _conv_into(self, out, x, weight):
        out.zero_()
        torch.ops.mkldnn._convolution_pointwise_.binary(
            out, x, weight, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "add", None, None, [], None)

    def _same_as_plain(self, x, shape, fmt, weight) -> bool:
        """Whether the pooled path gives the plain module's output bit for bit at this input shape and
        layout, on a random probe (a real input can be degenerate: a first time step of all-zero spikes
        makes any kernel exact)."""
        g = torch.Generator().manual_seed(0)
        probe = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(torch.randn(x.shape, generator=g))
        ref = super().forward(probe)
        out = torch.empty(shape, dtype=x.dtype, memory_format=fmt)
        try:
            self._conv_into(out, probe, weight)
        except RuntimeError:  # the private op refuses these operands (or changed): the plain module
            return False
        return bool(torch.equal(ref, out) and (self.out_channels_last or ref.stride() == out.stride()))

    def _weight(self, cl: bool) -> torch.Tensor:
        w = self.weight
        if not cl or w.is_contiguous(memory_format=torch.channels_last):
            return w
        key = (w.data_ptr(), w._version)
        cached = self.__dict__.get("_weight_cl")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_weight_cl"] = (key, w.detach().contiguous(memory_format=torch.channels_last))
        return cached[1]

    def _poolable(self, x) -> bool:
        if self.out_pool is None or not _MKLDNN or self.training or x.device.type != "cpu" \
                or x.dtype != torch.float32 or x.dim() != 4 or self.padding_mode != "zeros" \
                or not isinstance(self.padding, tuple) or self._forward_hooks or self._forward_pre_hooks \
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return False
        cl = torch.channels_last
        if self.out_channels_last:
            return x.is_contiguous(memory_format=cl) or x.is_contiguous()
        return (x.is_contiguous(memory_format=cl) and self.weight.is_contiguous(memory_format=cl)) or \
            (x.is_contiguous() and self.weight.is_contiguous())


def pool_conv_outputs(gm: fx.GraphModule, nodes=None, pool: Optional[OutputPool] = None,
                      channels_last: bool = False) -> Optional[OutputPool]:
    """Make the plain ``nn.Conv2d`` modules called in ``gm`` (at ``nodes``, default all) write into one
    shared :class:`OutputPool` (:class:`PooledConv2d`), channels-last outputs with ``channels_last``
    (a contiguous input, such as the network's own input, then costs oneDNN no reorder of the output).
    Returns the pool (``None``: no conv)."""
    modules = dict(gm.named_modules())
    convs = [modules[n.target] for n in gm.graph.nodes if (nodes is None or n in nodes) and n.op == "call_module"
             and type(modules.get(n.target)) in (nn.Conv2d, PooledConv2d)]
    if not convs:
        return None
    pool = pool or OutputPool(max_buffers=max(16, 2 * len(convs)))
    for m in convs:
        m.__class__ = PooledConv2d
        m.out_pool, m.out_channels_last = pool, bool(channels_last)
        m.__dict__.pop("_pool_ok", None)
        m.__dict__.pop("_weight_cl", None)
    return pool


class ReusedResize(nn.Module):
    """The network's final ``F.interpolate`` (2-d bilinear or nearest to a given ``size``: DeepLab's
    upsampling of the logits) written into an output buffer kept from one forward to the next (CPU, no
    gradient). At 513 px a fresh output is tens of MB, page-faulted in on every forward: most of the
    upsampling's time. The buffer is reused only when the caller has let go of the previous output (no
    other tensor shares its storage); otherwise a new one is allocated, so a kept output is never
    overwritten. Same kernel, same layout as ``F.interpolate``: the values are identical (tested)."""

    _OPS = {"bilinear": "upsample_bilinear2d", "nearest": "upsample_nearest2d"}

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs
        self._buf, self._users = None, 0

    @classmethod
    def handles(cls, args, kwargs) -> bool:
        kw = dict(zip(("size", "scale_factor", "mode", "align_corners"), args[1:]), **kwargs)
        return (kw.get("mode", "nearest") in cls._OPS and isinstance(kw.get("size"), (tuple, list, int))
                and kw.get("scale_factor") is None and not kw.get("antialias", False)
                and not kw.get("recompute_scale_factor"))

    def _out(self, x: torch.Tensor, shape) -> torch.Tensor:
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
            else torch.contiguous_format
        b = self._buf
        if b is not None and tuple(b.shape) == shape and b.dtype == x.dtype and b.is_contiguous(memory_format=fmt) \
                and _storage_users(b) == self._users:
            return b
        b = self._buf = None  # the old one goes first: never two at once
        b = torch.empty(shape, dtype=x.dtype, memory_format=fmt)
        self._users = _storage_users(b)
        if self._users > 0:  # users countable: keep it
            self._buf = b
        return b

    def forward(self, x, *args, **kwargs):
        kw = dict(zip(("size", "scale_factor", "mode", "align_corners"), args), **self.kwargs, **kwargs)
        if x.device.type != "cpu" or x.dim() != 4 or (torch.is_grad_enabled() and x.requires_grad) \
                or x.dtype not in (torch.float32, torch.float64):
            return nn.functional.interpolate(x, **kw)
        mode, size = kw.get("mode", "nearest"), kw["size"]
        size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        out = self._out(x, (x.shape[0], x.shape[1]) + size)
        op = getattr(torch._C._nn, self._OPS[mode])
        if mode == "bilinear":
            op(x, size, bool(kw.get("align_corners") or False), None, None, out=out)
        else:
            op(x, size, None, None, out=out)
        return out.as_strided(out.size(), out.stride())  # a new tensor: the caller's reference counts

    def __deepcopy__(self, memo):
        return ReusedResize(**copy.deepcopy(self.kwargs, memo))

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_buf"], state["_users"] = None, 0
        return state

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())


def output_interpolate(gm: fx.GraphModule) -> Optional[fx.Node]:
    """The ``F.interpolate`` node whose value is the graph's output (a dense model's final upsampling),
    or ``None``."""
    src = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    ok = isinstance(src, fx.Node) and src.op == "call_function" and src.target is nn.functional.interpolate
    return src if ok else None


def reuse_output_resize(gm: fx.GraphModule, name: str = "output_resize") -> bool:
    """Make the graph's output ``F.interpolate`` (when it is one :class:`ReusedResize` handles) a
    :class:`ReusedResize` module. Returns whether it did."""
    src = output_interpolate(gm)
    if src is None or len(src.users) != 1 or not ReusedResize.handles(src.args, src.kwargs) or hasattr(gm, name):
        return False
    kw = dict(zip(("size", "scale_factor", "mode", "align_corners"), src.args[1:]), **src.kwargs)
    static = {k: v for k, v in kw.items() if not isinstance(v, fx.Node) and k != "size"}
    dynamic = {k: v for k, v in kw.items() if k not in static}
    if any(isinstance(v, (list, tuple)) and any(isinstance(e, fx.Node) for e in v) for v in static.values()):
        return False
    gm.add_module(name, ReusedResize(**static))
    with gm.graph.inserting_before(src):
        node = gm.graph.call_module(name, (src.args[0],), dynamic)
    src.replace_all_uses_with(node)
    gm.graph.erase_node(src)
    return True


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
                 example: Optional[torch.Tensor] = None, conv_add_postop: bool = False,
                 reuse_buffers: bool = True) -> fx.GraphModule:
    """Inference copy of a quantized ANN (see the module docstring). The model is not modified.
    ``channels_last``: True / False, or ``"auto"``: the faster of both on ``example`` (channels-last
    without an example). ``conv_add_postop`` (opt-in): residual sums as oneDNN convolution post-ops
    (a private op, see :class:`Conv2dAdd`); by default they are the fused quantizer's residual input.
    ``reuse_buffers``: every quantizer whose output is read only inside the network writes it into a
    reused buffer (the liveness plan of :func:`snn.optimize.plan_buffers`), and the convolutions write
    into buffers of one :class:`OutputPool` (:class:`PooledConv2d`), so the heap does not grow and
    shrink (page faults) every forward; the values are the same."""
    if channels_last == "auto":
        if example is None:
            channels_last = True
        else:
            return pick_layout(lambda cl: optimize_ann(model, cl, inplace, conv_add_postop=conv_add_postop,
                                                       reuse_buffers=reuse_buffers), example)
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
            if inplace and conv_add_postop and fuse_conv_add(gm, node, modules):
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
    if reuse_buffers:
        reuse_output_resize(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    if reuse_buffers:
        from snn.optimize import plan_buffers  # lazy: snn imports quant
        plan_buffers(gm, writers=(FusedQuantAct,))
        pool_conv_outputs(gm, channels_last=channels_last)
    for p in gm.parameters():
        p.requires_grad_(False)
    gm.layout = "channels_last" if channels_last else "contiguous"
    return gm.eval()


__all__ = ["OutputPool", "PooledConv2d", "pool_conv_outputs", "act_quant_infer", "act_quant_fused", "weight_quant_fused", "optimize_ann", "Conv2dAdd", "fuse_conv_add", "tune_malloc", "FusedQuantAct", "frozen_weight_layer", "native_ops",
           "fold_weight_layers"]
