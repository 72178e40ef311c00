"""Quantize any float CNN for Fast-SNN: ``quantize(model, bit)`` and ``calibrate(qmodel, batches)``.

:func:`quantize` traces the model with ``torch.fx`` and rewrites the graph into a new module (the input
model is not touched; its float weights are carried over, state-dict keys stay the model's):

* every ReLU / ReLU6 call site -- ``nn.ReLU`` / ``nn.ReLU6`` modules (one module used at several places
  gets one ``QuantAct`` per call), ``F.relu`` / ``torch.relu`` / ``F.relu6`` / ``x.relu()`` and their
  in-place forms -- becomes its own :class:`~quant.layers.QuantAct` (the IF neuron of the SNN);
  ReLU6 starts with the clip alpha = 6 (at ``bit=32`` it stays a ReLU6 module of its own);
* every ``nn.Conv2d`` / ``nn.Linear`` becomes :class:`~quant.layers.QuantConv2d` /
  :class:`~quant.layers.QuantLinear` with ``wbit`` bits; the first weight layers (fed by the input) and
  the last ones (feeding the output with no activation in between) keep ``first_last_bit`` bits
  (8: :class:`~quant.layers.Conv2d8bit` / :class:`~quant.layers.Linear8bit`, as in the paper);
* max-pooling has no exact spiking form (the max of spike counts is not the max of rates): refused
  with ``maxpool="error"``, replaced by an average pool of the same window with ``maxpool="avg"``
  (one warning line lists the replaced ones);
* non-linearities an integrate-and-fire neuron cannot represent (SiLU, GELU, Hardswish, Hardsigmoid,
  LeakyReLU / ELU, sigmoid / tanh / softmax, LayerNorm / GroupNorm, attention) raise
  :class:`UnsupportedLayerError` naming the module path and type -- where they feed a later layer;
  after the last weight layer (a sigmoid / softmax on the output) they stay, computed on the SNN's rates;
* everything else (BN, average / adaptive pooling, flatten, dropout, concat, add, reshape / transpose,
  interpolation) stays as it is; :func:`snn.convert` checks the rest.

The graph is traced in eval mode: training-only branches (auxiliary heads of GoogLeNet / Inception,
stochastic depth) are dropped, their weights kept in the state dict. See docs/own-network.md.
"""
from __future__ import annotations

import copy
import warnings
import weakref
from typing import Dict, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .functional import FULL_PRECISION, check_bit
from .layers import DEFAULT_ACT_ALPHA, WEIGHT_LAYERS, Conv2d8bit, Linear8bit, QuantAct, QuantConv2d, QuantLinear

#: the clip of a ReLU6 call site (the function's own ceiling)
RELU6_ALPHA = 6.0
#: default percentile of :func:`calibrate`
CALIBRATION_PERCENTILE = 99.9
_MAX_SAMPLES = 1 << 20  # values per layer and batch the percentile is computed from


class UnsupportedLayerError(ValueError):
    """The model holds a layer with no integrate-and-fire equivalent (one line: module path, type, why)."""


_RELU_FUNCTIONS = {F.relu: False, torch.relu: False, torch.relu_: False, F.relu_: False, F.relu6: True}
_RELU_METHODS = {"relu": False, "relu_": False}
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                    nn.AdaptiveMaxPool3d)
_MAXPOOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d,
                      torch.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
_WHY_ACT = ("no integrate-and-fire equivalent (only ReLU / ReLU6 become IF neurons); replace it by ReLU and "
            "retrain, or keep it after the last weight layer")
_WHY_NORM = ("a per-sample normalisation divides by a statistic of the activations, which is not linear in the "
             "spike trains; use BatchNorm (folded into the layer before it)")
_WHY_ATTN = "attention multiplies two activations, which is not linear in the spike trains"
_REFUSED_MODULES = (
    (nn.MultiheadAttention, _WHY_ATTN),
    (nn.LayerNorm, _WHY_NORM), (nn.GroupNorm, _WHY_NORM), (nn.InstanceNorm1d, _WHY_NORM),
    (nn.InstanceNorm2d, _WHY_NORM), (nn.InstanceNorm3d, _WHY_NORM), (nn.LocalResponseNorm, _WHY_NORM),
    (nn.SiLU, _WHY_ACT), (nn.GELU, _WHY_ACT), (nn.Hardswish, _WHY_ACT), (nn.Hardsigmoid, _WHY_ACT),
    (nn.Sigmoid, _WHY_ACT), (nn.Tanh, _WHY_ACT), (nn.Softmax, _WHY_ACT), (nn.LogSoftmax, _WHY_ACT),
    (nn.LeakyReLU, _WHY_ACT), (nn.PReLU, _WHY_ACT), (nn.ELU, _WHY_ACT), (nn.SELU, _WHY_ACT), (nn.CELU, _WHY_ACT),
    (nn.Mish, _WHY_ACT), (nn.Softplus, _WHY_ACT), (nn.GLU, _WHY_ACT), (nn.Hardtanh, _WHY_ACT),
    (nn.Softsign, _WHY_ACT), (nn.Tanhshrink, _WHY_ACT), (nn.Threshold, _WHY_ACT), (nn.RReLU, _WHY_ACT),
)
_REFUSED_FUNCTIONS = {
    F.silu: _WHY_ACT, F.gelu: _WHY_ACT, F.hardswish: _WHY_ACT, F.hardsigmoid: _WHY_ACT, torch.sigmoid: _WHY_ACT,
    F.sigmoid: _WHY_ACT, torch.tanh: _WHY_ACT, F.tanh: _WHY_ACT, F.softmax: _WHY_ACT, torch.softmax: _WHY_ACT,
    F.log_softmax: _WHY_ACT, F.leaky_relu: _WHY_ACT, F.elu: _WHY_ACT, F.selu: _WHY_ACT, F.mish: _WHY_ACT,
    F.softplus: _WHY_ACT, F.hardtanh: _WHY_ACT, F.glu: _WHY_ACT, F.layer_norm: _WHY_NORM,
    F.group_norm: _WHY_NORM, F.instance_norm: _WHY_NORM, F.scaled_dot_product_attention: _WHY_ATTN,
}
_REFUSED_METHODS = {"sigmoid": _WHY_ACT, "sigmoid_": _WHY_ACT, "tanh": _WHY_ACT, "tanh_": _WHY_ACT,
                    "softmax": _WHY_ACT, "log_softmax": _WHY_ACT}
_MAXPOOL_WHY = ("max-pooling: the max of spike counts is not the max of firing rates; pass maxpool='avg' to "
                "replace it by an average pool of the same window (then fine-tune), or use a stride-2 convolution")


class _Tracer(fx.Tracer):
    """torch.nn layers and the quantized layers are leaves; everything else is traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantAct,) + WEIGHT_LAYERS) or super().is_leaf_module(m, qualname)


def _owner(node: fx.Node):
    """``(path, type)`` of the module whose forward() made this call (``("", None)``: the model itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", None
    last = list(stack.values())[-1]
    return (last[0], last[1]) if isinstance(last, tuple) else (str(last), None)


def _owner_path(node: fx.Node) -> str:
    return _owner(node)[0]


def _describe(node: fx.Node, modules) -> str:
    """``'path' (Type)`` of a module call, ``name() in 'owner' (Type)`` of a function / method call."""
    if node.op == "call_module":
        return f"'{node.target}' ({type(modules[node.target]).__name__})"
    path, cls = _owner(node)
    fn = f".{node.target}()" if node.op == "call_method" else getattr(node.target, "__name__", str(node.target)) + "()"
    name = getattr(cls, "__name__", None) or type(modules.get(path)).__name__
    return f"{fn} in '{path}' ({name})" if path else f"{fn} in the model's forward()"


def _relu_site(node: fx.Node, modules) -> Optional[bool]:
    """``None`` if ``node`` is no ReLU call; else whether it is a ReLU6."""
    if node.op == "call_module":
        m = modules[node.target]
        if type(m) is nn.ReLU6 or (type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0):
            return True
        return False if type(m) is nn.ReLU else None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return _RELU_FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return _RELU_METHODS[node.target]
    return None


def _is_inplace(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return getattr(node.target, "__name__", "").endswith("_") or bool(node.kwargs.get("inplace", False)) \
        or (len(node.args) > 1 and node.args[1] is True)


def _is_weight(node: fx.Node, modules) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], (nn.Conv2d, nn.Linear))


def _refusal(node: fx.Node, modules) -> Optional[str]:
    if _relu_site(node, modules) is not None:
        return None
    if node.op == "call_module":
        m = modules[node.target]
        for cls, why in _REFUSED_MODULES:
            if isinstance(m, cls):
                return why
        return None
    if node.op == "call_function":
        return _REFUSED_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _REFUSED_METHODS.get(node.target)
    return None


def _is_maxpool(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _MAXPOOL_MODULES)
    return node.op == "call_function" and node.target in _MAXPOOL_FUNCTIONS


def _free_path(root: nn.Module, path: str) -> str:
    """``path`` or ``path_1``, ``path_2``, ... whichever is not an attribute of ``root`` yet."""
    def taken(p):
        parent, _, name = p.rpartition(".")
        try:
            owner = root.get_submodule(parent) if parent else root
        except AttributeError:
            return False
        return hasattr(owner, name)
    out, i = path, 0
    while taken(out):
        i += 1
        out = f"{path}_{i}"
    return out


def _avg_pool_like(m: nn.Module, where: str) -> nn.Module:
    """The average pool with ``m``'s window (padding excluded from the mean, as max-pooling ignores it)."""
    if isinstance(m, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
        if m.return_indices:
            raise UnsupportedLayerError(f"{where}: max-pooling with return_indices has no average-pool form")
        cls = {nn.AdaptiveMaxPool1d: nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool2d: nn.AdaptiveAvgPool2d,
               nn.AdaptiveMaxPool3d: nn.AdaptiveAvgPool3d}[type(m)]
        return cls(m.output_size)
    dil = m.dilation if isinstance(m.dilation, (tuple, list)) else (m.dilation,)
    if any(d != 1 for d in dil) or m.return_indices:
        raise UnsupportedLayerError(f"{where}: a dilated max-pool or one returning indices has no "
                                    "average-pool form; replace it with a stride-2 convolution")
    cls = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d}[type(m)]
    return cls(m.kernel_size, m.stride, m.padding, ceil_mode=m.ceil_mode, count_include_pad=False)


def _maxpool_module(node: fx.Node, modules, where: str) -> nn.Module:
    if node.op == "call_module":
        return _avg_pool_like(modules[node.target], where)
    fn = node.target
    name = getattr(fn, "__name__", "")
    dims = int(name[-2])  # max_pool2d / adaptive_max_pool2d -> 2
    if name.startswith("adaptive"):
        size = node.args[1] if len(node.args) > 1 else node.kwargs["output_size"]
        return _avg_pool_like({1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}[dims](size),
                              where)
    names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    kw = {k: v for k, v in zip(names, node.args[1:])}
    kw.update({k: v for k, v in node.kwargs.items() if k in names})
    if isinstance(kw.get("stride"), (list, tuple)) and not kw["stride"]:
        kw["stride"] = None
    cls = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[dims]
    return _avg_pool_like(cls(**kw), where)


def _reach(nodes: Iterable[fx.Node], step, stop) -> set:
    """Nodes reached from ``nodes`` along ``step`` (users or inputs), not going past ``stop`` nodes."""
    seen, todo = set(), list(nodes)
    while todo:
        n = todo.pop()
        for m in step(n):
            if m not in seen:
                seen.add(m)
                if not stop(m):
                    todo.append(m)
    return seen


def _weight_layer(m: nn.Module, bits: int) -> nn.Module:
    """The quantized twin of a float conv / linear with ``bits``-bit weights (8: max|w|-scaled, 32: float
    copy), float weights carried over."""
    if bits == FULL_PRECISION:
        return copy.deepcopy(m)
    conv = isinstance(m, nn.Conv2d)
    if conv:
        args = (m.in_channels, m.out_channels, m.kernel_size)
        kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                  bias=m.bias is not None, padding_mode=m.padding_mode)
    else:
        args, kw = (m.in_features, m.out_features), dict(bias=m.bias is not None)
    if bits == 8:
        new = (Conv2d8bit if conv else Linear8bit)(*args, **kw)
    else:
        new = (QuantConv2d if conv else QuantLinear)(*args, wbit=bits, **kw)
    new = new.to(device=m.weight.device, dtype=m.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(m.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
    new.train(m.training)
    return new


def quantize(model: nn.Module, bit: int, *, wbit: Optional[int] = None, first_last_bit: int = 8,
             maxpool: str = "error", alpha_init: Optional[float] = None) -> nn.Module:
    """A quantized copy of ``model`` (a ``torch.fx.GraphModule``) ready for :func:`snn.convert`.

    ``bit``: activation bits (every ReLU / ReLU6 call site becomes a ``QuantAct(bit)``; T = 2**bit - 1).
    ``wbit``: hidden-weight bits (default ``bit``: ternary at 2, APoT from 3, float at 32 -- the rule of the
    CIFAR-10 models). ``first_last_bit``: the first and last weight layers (8 = max|w|-scaled 8-bit, the
    paper's; 32 = float). ``maxpool``: ``"error"`` or ``"avg"``. ``alpha_init``: initial clip of the ReLU
    sites (default 6.0; ReLU6 sites start at 6 always). Raises :class:`UnsupportedLayerError` for a layer
    an IF neuron cannot represent, ``ValueError`` for bad arguments. See the module docstring.
    """
    bit = check_bit(bit, what="bit")
    wbit = bit if wbit is None else check_bit(wbit, what="wbit")
    first_last_bit = check_bit(first_last_bit, what="first_last_bit")
    if maxpool not in ("error", "avg"):
        raise ValueError(f"maxpool={maxpool!r}: use 'error' (refuse max-pooling) or 'avg' (replace it by an "
                         "average pool of the same window)")
    alpha = DEFAULT_ACT_ALPHA if alpha_init is None else float(alpha_init)
    if not alpha > 0:
        raise ValueError(f"alpha_init={alpha_init!r} must be > 0")
    training = model.training
    root = copy.deepcopy(model).eval()
    gm = _trace(root)
    graph = gm.graph
    modules = dict(gm.named_modules())
    nodes = list(graph.nodes)

    def is_act(n):
        return _relu_site(n, modules) is not None or (n.op == "call_module" and isinstance(modules[n.target], QuantAct))

    def barrier(n):
        return is_act(n) or _is_weight(n, modules)

    # 1. refusals: a non-linearity that feeds a later weight layer or activation (the tail may keep it)
    feeds: Dict[fx.Node, bool] = {}
    for n in reversed(nodes):
        feeds[n] = any(barrier(u) or feeds[u] for u in n.users)
    for n in nodes:
        why = _refusal(n, modules)
        if why and feeds[n]:
            raise UnsupportedLayerError(f"{_describe(n, modules)}: {why}")
    # 2. max-pools
    pools = [n for n in nodes if _is_maxpool(n, modules)]
    if pools and maxpool == "error":
        raise UnsupportedLayerError(f"{_describe(pools[0], modules)}: {_MAXPOOL_WHY}")
    # 3. first / last weight layers
    inputs = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    first = {n for n in _reach(inputs, lambda k: k.users, barrier) if _is_weight(n, modules)}
    last = {n for n in _reach([output], lambda k: k.all_input_nodes, barrier) if _is_weight(n, modules)}
    edge_paths = {n.target for n in first | last}
    # 4. weight layers (a module called at several places is replaced once; quantized ones are kept)
    done = set()
    for n in nodes:
        if _is_weight(n, modules) and n.target not in done and not isinstance(modules[n.target], WEIGHT_LAYERS):
            done.add(n.target)
            bits = first_last_bit if n.target in edge_paths else wbit
            new = _weight_layer(modules[n.target], bits)
            _set(gm, n.target, new)
    # 5. activations: one QuantAct per call site
    called = set()
    relu6_sites = []
    for n in nodes:
        six = _relu_site(n, modules)
        if six is None:
            continue
        if n.op == "call_module" and n.target not in called:
            called.add(n.target)
            path = n.target
        else:
            base = n.target if n.op == "call_module" else \
                ((_owner_path(n) + ".") if _owner_path(n) else "") + ("relu6" if six else "relu")
            path = _free_path(gm, base)
        # at 32 bits a ReLU6 site stays a ReLU6 (QuantAct(32) is a plain ReLU): the float model, exactly
        act = nn.ReLU6() if six and bit == FULL_PRECISION else QuantAct(bit, alpha_init=RELU6_ALPHA if six else alpha)
        ref = next((p for p in gm.parameters()), None)
        if ref is not None:
            act = act.to(device=ref.device, dtype=ref.dtype if ref.dtype.is_floating_point else None)
        _set(gm, path, act)
        if six:
            relu6_sites.append(path)
        x = n.args[0] if n.args else n.kwargs.get("input", n.kwargs.get("self"))
        inplace = _is_inplace(n, modules)
        with graph.inserting_before(n):
            q = graph.call_module(path, (x,))
        q.meta = dict(n.meta)
        n.replace_all_uses_with(q)
        if inplace and isinstance(x, fx.Node):  # later readers of the input saw the rectified tensor
            after = False
            for m in list(graph.nodes):
                if m is n:
                    after = True
                elif after and m is not q and x in m.all_input_nodes:
                    m.replace_input_with(x, q)
        graph.erase_node(n)
    # 6. max-pools -> average pools
    replaced = []
    for n in pools:
        where = _describe(n, modules)
        new = _maxpool_module(n, modules, where)
        if n.op == "call_module":
            _set(gm, n.target, new)
        else:
            path = _free_path(gm, ((_owner_path(n) + ".") if _owner_path(n) else "") + "avgpool")
            _set(gm, path, new)
            x = n.args[0] if n.args else n.kwargs["input"]
            with graph.inserting_before(n):
                q = graph.call_module(path, (x,))
            n.replace_all_uses_with(q)
            graph.erase_node(n)
        replaced.append(where)
    if replaced:
        warnings.warn(f"quantize: {len(replaced)} max-pool(s) replaced by average pools: " + ", ".join(replaced),
                      stacklevel=2)
    _keep_unused(root, gm)
    graph.lint()
    gm.recompile()
    gm.train(training)
    gm.bit, gm.wbit, gm.first_last_bit = bit, wbit, first_last_bit
    gm.relu6_sites = tuple(relu6_sites)
    gm.replaced_maxpools = tuple(replaced)
    return gm


def _trace(root: nn.Module) -> fx.GraphModule:
    try:
        graph = _Tracer().trace(root)
    except Exception as e:  # noqa: BLE001 - name the first layer that could not convert anyway, else why
        for path, m in root.named_modules():
            for cls, why in _REFUSED_MODULES:
                if isinstance(m, cls):
                    raise UnsupportedLayerError(f"'{path}' ({type(m).__name__}): {why}") from None
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UnsupportedLayerError(
            f"{type(root).__name__} cannot be traced with torch.fx ({type(e).__name__}: {msg}); move "
            "data-dependent Python control flow out of its forward()") from None
    return fx.GraphModule(root, graph, class_name="Quantized" + type(root).__name__)


def _set(root: nn.Module, path: str, module: nn.Module):
    parent, _, name = path.rpartition(".")
    if parent:
        try:
            owner = root.get_submodule(parent)
        except AttributeError:
            root.add_submodule(path, module)
            return
    else:
        owner = root
    setattr(owner, name, module)


def _keep_unused(root: nn.Module, gm: fx.GraphModule):
    """Modules with weights the eval-mode graph does not call (auxiliary heads) are kept, so the
    state dict holds every key of the float model (pretrained weights load into it)."""
    for path, m in root.named_modules():
        if not path or not (m._parameters or m._buffers):
            continue
        try:
            gm.get_submodule(path)
        except AttributeError:
            gm.add_submodule(path, m)


# -------------------------------------------------------------------------------------------- calibration
def _percentile(x: torch.Tensor, q: float, generator: torch.Generator) -> float:
    v = x.detach().flatten().clamp_min(0)
    if v.numel() > _MAX_SAMPLES:
        idx = torch.randint(0, v.numel(), (_MAX_SAMPLES,), generator=generator).to(v.device)
        v = v[idx]
    return float(torch.quantile(v.float(), q / 100.0))


# ops whose output has the scale of their input: a BN behind them still sees a quantized-weight layer's scale
_KEEP_SCALE = {torch.cat, torch.concat, torch.stack, torch.flatten, torch.reshape, torch.chunk, torch.split,
               torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.flatten, torch.Tensor.contiguous,
               torch.Tensor.clone, torch.Tensor.permute, torch.Tensor.transpose, torch.Tensor.__getitem__,
               torch.Tensor.chunk, torch.Tensor.split, F.pad, F.avg_pool2d, F.adaptive_avg_pool2d, F.max_pool2d,
               getattr(F, "_max_pool2d", F.max_pool2d), F.interpolate, F.dropout}


class _ScaleTracker(torch.overrides.TorchFunctionMode):
    """Marks the outputs of :data:`_KEEP_SCALE` ops applied to a marked tensor (``marked``: id -> weakref)."""

    def __init__(self, marked: dict):
        super().__init__()
        self.marked = marked

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _KEEP_SCALE:
            from torch.utils._pytree import tree_flatten
            if any(_is_marked(self.marked, t) for t in tree_flatten((args, kwargs or {}))[0]):
                for t in tree_flatten(out)[0]:
                    _mark(self.marked, t)
        return out


def _mark(marked: dict, t):
    if isinstance(t, torch.Tensor):
        marked[id(t)] = weakref.ref(t)


def _is_marked(marked: dict, t) -> bool:
    r = marked.get(id(t)) if isinstance(t, torch.Tensor) else None
    return r is not None and r() is t


@torch.no_grad()
def calibrate(qmodel: nn.Module, batches: Iterable, *, percentile: float = CALIBRATION_PERCENTILE,
              bn="auto", seed: int = 0) -> Dict[str, float]:
    """Set every activation clip ``act_alpha`` from activation statistics of a few batches.

    Each ``QuantAct``'s clip becomes the ``percentile``-th percentile (default 99.9) of its rectified input,
    averaged over the batches, layer by layer in execution order: a layer's statistics are taken with the
    layers before it already calibrated, so their quantization error is seen. ReLU6 sites keep alpha <= 6;
    a layer whose input is never positive keeps its clip.

    ``bn``: also re-estimate BatchNorm running statistics (averaged over the batches, set before the BN
    runs). ``"auto"`` (default): only the BNs fed by a conv / linear with quantized weights, directly or
    through ops that keep its scale (concatenation as in DenseNet, reshapes, pooling) -- the weight
    quantizer standardises the weights (``quant.functional.weight_quant``), which changes the layer's
    output scale, so the float model's statistics no longer fit; ``True``: every BN; ``False``: none.

    The model runs in eval mode (its mode is restored). ``batches``: tensors or ``(input, ...)`` tuples /
    lists (the first element is the input). Returns ``{QuantAct path: alpha}``.
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile={percentile} must be in (0, 100]")
    if bn not in ("auto", True, False):
        raise ValueError(f"bn={bn!r}: use 'auto', True or False")
    acts = {p: m for p, m in qmodel.named_modules() if isinstance(m, QuantAct) and m.act_alpha is not None}
    if not acts:
        raise ValueError("calibrate: the model has no quantized QuantAct (quantize it first)")
    capped = set(getattr(qmodel, "relu6_sites", ()))
    sums: Dict[str, float] = {p: 0.0 for p in acts}
    counts: Dict[str, int] = {p: 0 for p in acts}
    g = torch.Generator().manual_seed(seed)
    quantized_out: dict = {}  # outputs of quantized-weight layers in this forward pass, and their scale-kept views
    bn_seen: Dict[nn.Module, int] = {}

    def act_hook(path):
        def hook(mod, inp):
            v = _percentile(inp[0], percentile, g)
            if v > 0:
                sums[path] += v
                counts[path] += 1
                a = sums[path] / counts[path]
                mod.act_alpha.fill_(min(a, RELU6_ALPHA) if path in capped else a)
        return hook

    def weight_hook(mod, inp, out):
        _mark(quantized_out, out)

    def bn_hook(mod, inp):
        x = inp[0]
        if not mod.track_running_stats or (bn == "auto" and not _is_marked(quantized_out, x)):
            return
        dims = [d for d in range(x.dim()) if d != 1]
        per = x.numel() // max(x.shape[1], 1)
        mean, var = x.mean(dims), x.var(dims, unbiased=per > 1)
        k = bn_seen.get(mod, 0)
        bn_seen[mod] = k + 1
        mod.running_mean.mul_(k / (k + 1)).add_(mean / (k + 1))
        mod.running_var.mul_(k / (k + 1)).add_(var / (k + 1))

    hooks = [m.register_forward_pre_hook(act_hook(p)) for p, m in acts.items()]
    if bn:
        for m in qmodel.modules():
            if isinstance(m, (QuantConv2d, QuantLinear)) and m.wbit < FULL_PRECISION:
                hooks.append(m.register_forward_hook(weight_hook))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                hooks.append(m.register_forward_pre_hook(bn_hook))
    was_training = qmodel.training
    qmodel.eval()
    n = 0
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            quantized_out.clear()
            if bn == "auto":
                with _ScaleTracker(quantized_out):
                    qmodel(x)
            else:
                qmodel(x)
            n += 1
    finally:
        for h in hooks:
            h.remove()
        qmodel.train(was_training)
    if n == 0:
        raise ValueError("calibrate: no batches given")
    return {p: float(m.act_alpha) for p, m in acts.items()}


__all__ = ["UnsupportedLayerError", "quantize", "calibrate", "CALIBRATION_PERCENTILE", "RELU6_ALPHA"]
