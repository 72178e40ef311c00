"""Quantized ANN -> SNN conversion, as a sequence of small named torch.fx passes.

The ANN is deep-copied and traced (quant layers and torch.nn layers are leaves); then

1. :func:`split_call_sites` -- a ``QuantAct`` module called at several places (torchvision's shared
   ``self.relu``) gets one module per call site, so every call site becomes its own neuron;
2. :func:`classify`        -- every node gets a *kind*: ``static`` (per-sample data ``[B, ...]``: the analog
   input and what is computed from it alone), ``temporal`` (a spike / current train, time folded into the
   batch: ``[steps*B, ...]``), ``const`` (parameters, literals, tensors built from shapes: a YOLO grid) or
   ``meta`` (shape values: ``x.size()``, ``x.shape``, ``x.dim()``, ``x.numel()``, dtype, device);
3. :func:`place_readout`   -- the time mean is taken right after the non-spiking accumulator layer(s)
   (the conv / linear layers after the last neurons, with a BN that follows them); everything after the
   read-out -- reshape, box decoding, sigmoid / softmax, the bilinear upsampling of segmentation logits --
   runs once per sample on ``[B, ...]`` like plain ANN code (kind ``rate``). A non-linear op after the last
   neurons gets its inputs read out first;
4. :func:`check_linear`    -- every op on a train between the first neuron and the read-out must be linear
   in it (conv / linear, BN in eval mode, additions in current space, concat, reorg, avg-pool, interpolation,
   mean / sum over non-batch dims, products with non-train values), and must leave the batch axis alone;
5. :func:`rewrite_shapes`  -- shape values read from a train are per-sample (``x.size(0)`` is B, not T*B),
   and view / reshape / expand / unflatten of a train fold the time steps back in;
6. :func:`expand_static`   -- a static value meeting a train is repeated over the time steps (batch axis 0);
   ``const`` values broadcast unchanged;
7. :func:`insert_neurons`  -- each ``QuantAct`` becomes an :class:`~snn.neuron.IFNeuron` (threshold
   ``act_alpha``, ``T = 2**bit - 1``; driven by a constant current -- closed form -- where its input is static);
8. :func:`split_graph`     -- the graph is cut at the read-out into the temporal part (``SpikingNetwork.net``,
   run on the time-folded trains, chunk by chunk) and the per-sample part after it (``SpikingNetwork.head``).

Nodes that do not depend on any neuron (the analog input and the first layer's convolution / BN) are
computed once on ``[B, ...]``: the first neurons get a constant current, which keeps the first spiking
layer bit-exact.
"""
from __future__ import annotations

import copy
import numbers
import operator
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from quant.functional import FULL_PRECISION, num_levels
from quant.layers import WEIGHT_LAYERS, QuantAct
from quant.utils import get_attr, set_module

from .neuron import DEFAULT_NEG_TOL, IFNeuron


class ConversionError(ValueError):
    """The ANN cannot be converted (names the module / op and what to do)."""


STATIC, TEMPORAL, CONST, META, RATE = "static", "temporal", "const", "meta", "rate"
NOT_DATA = (CONST, META)  # values that do not depend on the batch

_SYNAPTIC = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
             nn.Linear) + WEIGHT_LAYERS
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# modules allowed to act on spike trains: all linear in their input, batch axis untouched
_LINEAR_MODULES = _SYNAPTIC + _BN + (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.Identity, nn.PixelShuffle, nn.PixelUnshuffle, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ChannelShuffle, nn.Fold, nn.Unfold,
)
_LINEAR_FUNCTIONS = {
    operator.add, operator.sub, operator.neg, operator.pos, operator.getitem, operator.mul, operator.truediv,
    operator.matmul, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.cat, torch.concat,
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.chunk, torch.split, torch.stack,
    torch.unsqueeze, torch.squeeze, torch.mean, torch.sum, torch.flip, torch.roll, torch.narrow,
    torch.zeros_like, torch.matmul, F.interpolate, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.pixel_shuffle, F.pixel_unshuffle,
    F.dropout, F.dropout2d, F.pad, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, F.linear, F.batch_norm,
    getattr, F.upsample, F.upsample_bilinear, F.upsample_nearest,
}
_LINEAR_METHODS = {
    "view", "reshape", "flatten", "permute", "contiguous", "size", "transpose", "chunk", "split",
    "unsqueeze", "squeeze", "add", "sub", "mul", "div", "neg", "__getitem__", "dim", "expand_as", "view_as",
    "reshape_as", "unflatten", "float", "double", "to", "type_as", "clone", "mean", "sum", "flip", "roll",
    "narrow", "expand", "numel", "matmul", "new_zeros", "zero_", "detach",
}
_META_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "get_device"}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}
_TUPLE_PRODUCERS = {torch.chunk, torch.split, torch.unbind, "chunk", "split", "unbind", "size"}
_MAXPOOL_HINT = ("max over spikes is not the max of firing rates; replace it with a stride-2 "
                 "convolution (as every Fast-SNN architecture does)")


class QuantTracer(fx.Tracer):
    """Traces through containers, keeps quant layers and torch.nn layers as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantAct, IFNeuron) + WEIGHT_LAYERS):
            return True
        return super().is_leaf_module(m, qualname)


# ---------------------------------------------------------------------------------------- time-aware helpers
class TimeContext:
    """The number of time steps folded into the batch of the trains right now (set by the simulation)."""

    def __init__(self):
        self.steps = 1


class _TimeOp(nn.Module):
    """A shape op of the converted graph that needs to know how many steps are folded into the batch."""

    def __init__(self, ctx: TimeContext, op: str):
        super().__init__()
        self.ctx, self.op = ctx, op

    def extra_repr(self):
        return self.op

    def forward(self, x, *args, **kwargs):
        s = self.ctx.steps
        op = self.op
        if op == "repeat":  # a static [B, ...] value -> [steps*B, ...]
            if s == 1 or not isinstance(x, torch.Tensor) or x.dim() == 0:
                return x
            return x.unsqueeze(0).expand(s, *x.shape).reshape(s * x.shape[0], *x.shape[1:])
        if op == "size":  # x.size() / x.size(d) / x.shape of a train: per sample
            size = torch.Size([x.shape[0] // s, *x.shape[1:]])
            return size[args[0]] if args else size
        if op == "numel":
            return x.numel() // s
        if op in ("view", "reshape", "expand"):
            shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
            shape = tuple(shape)
            if shape and shape[0] != -1:
                shape = (shape[0] * s,) + shape[1:]
            return getattr(x, op)(*shape)
        if op == "unflatten":
            dim, sizes = args
            sizes = tuple(sizes)
            if dim == 0 and sizes[0] != -1:
                sizes = (sizes[0] * s,) + sizes[1:]
            return x.unflatten(dim, sizes)
        raise AssertionError(op)


def readout(x):
    """Marker of the read-out boundary (the graph is cut here; the value becomes the time mean)."""
    return x


# ---------------------------------------------------------------------------------------- small helpers
def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = QuantTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - report why tracing failed, in one line
        raise ConversionError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
            "remove data-dependent Python control flow from its forward() (move box decoding / NMS into "
            "a post-processing function)") from e
    return fx.GraphModule(model, graph, class_name=type(model).__name__ + "SNN")


trace = _trace


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if node.op == "call_module":
        return str(node.target)
    if stack:
        return list(stack.keys())[-1] + f" ({node.name})"
    return node.name


def _is_quant_act(node: fx.Node, modules) -> bool:
    return node.op == "call_module" and isinstance(modules.get(node.target), (QuantAct, IFNeuron))


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dims(d) -> list:
    if d is None:
        return [None]
    if isinstance(d, (tuple, list)):
        return list(d)
    return [d]


def _touches_batch(d) -> bool:
    """A dim argument that is (or includes) the batch axis (None: all dims)."""
    return any(x is None or (isinstance(x, int) and x == 0) for x in _dims(d))


# ---------------------------------------------------------------------------------------- pass 1: call sites
def split_call_sites(gm: fx.GraphModule) -> Dict[str, Tuple[str, int]]:
    """Give every call of a ``QuantAct`` module its own module (the 2nd call of ``relu`` becomes
    ``relu__call1``, ...). Returns ``{module path in gm: (module path in the ANN, call index)}`` for
    every ``QuantAct`` call site, in execution order."""
    modules = dict(gm.named_modules())
    seen: Dict[str, int] = {}
    sites: Dict[str, Tuple[str, int]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), QuantAct):
            continue
        path = node.target
        i = seen.get(path, 0)
        seen[path] = i + 1
        if i == 0:
            sites[path] = (path, 0)
            continue
        parent, _, name = path.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        new_name = f"{name}__call{i}"
        while hasattr(owner, new_name):
            new_name += "_"
        setattr(owner, new_name, copy.deepcopy(modules[path]))
        new_path = f"{parent}.{new_name}" if parent else new_name
        node.target = new_path
        sites[new_path] = (path, i)
    return sites


# ---------------------------------------------------------------------------------------- pass 2: kinds
def _combine(kinds: Iterable[str]) -> str:
    ks = set(kinds)
    if TEMPORAL in ks:
        return TEMPORAL
    if RATE in ks:
        return RATE
    if STATIC in ks:
        return STATIC
    return CONST


def _is_meta_node(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _META_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 \
            and node.args[1] in _META_ATTRS:
        return True
    return False


def classify(gm: fx.GraphModule) -> Dict[fx.Node, str]:
    """Kind of every node (see the module docstring); ``QuantAct`` outputs are trains."""
    modules = dict(gm.named_modules())
    kinds: Dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        ins = node.all_input_nodes
        if node.op == "placeholder":
            kinds[node] = STATIC
        elif node.op == "get_attr":
            kinds[node] = CONST
        elif _is_quant_act(node, modules):
            kinds[node] = TEMPORAL
        elif _is_meta_node(node):
            kinds[node] = META
        elif node.op == "output":
            kinds[node] = _combine(kinds[a] for a in ins)
        else:
            kinds[node] = _combine(kinds[a] for a in ins)
    return kinds


# ---------------------------------------------------------------------------------------- pass 3: read-out
def _feeds_neuron(gm: fx.GraphModule, modules) -> Dict[fx.Node, bool]:
    out: Dict[fx.Node, bool] = {}
    for node in reversed(gm.graph.nodes):
        out[node] = any(_is_quant_act(u, modules) or out.get(u, False) for u in node.users)
    return out


def _linear_ok(node: fx.Node, modules, kinds) -> Optional[str]:
    """``None`` if ``node`` (with at least one train input) is linear in the trains and keeps the batch
    axis; else the reason, for the error message."""
    tin = [a for a in node.all_input_nodes if kinds.get(a) == TEMPORAL]
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, IFNeuron) or isinstance(m, QuantAct):
            return None
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                          nn.AdaptiveMaxPool3d)):
            return f"unsupported module '{node.target}' ({type(m).__name__}): {_MAXPOOL_HINT}"
        if not isinstance(m, _LINEAR_MODULES):
            return (f"unsupported module '{node.target}' ({type(m).__name__}) between spiking layers: only ops "
                    "linear in the spike train (conv, linear, BN, avg-pool, concat, reorg, upsample, flatten) "
                    "and QuantAct (-> IF neuron) can be converted")
        if isinstance(m, nn.Flatten) and m.start_dim == 0:
            return f"'{node.target}' (Flatten(start_dim=0)) merges the batch axis of a spike train"
        return None
    if node.op == "call_function":
        fn = node.target
        name = getattr(fn, "__name__", str(fn))
        where = _module_path(node)
        if "max_pool" in name:
            return f"unsupported function {name} at {where}: {_MAXPOOL_HINT}"
        if fn is readout:
            return None
        if fn not in _LINEAR_FUNCTIONS:
            return f"unsupported function {name} at {where} between spiking layers: it is not linear in the spike train"
        return _batch_axis_problem(node, name, where, tin, kinds)
    if node.op == "call_method":
        if node.target not in _LINEAR_METHODS:
            return (f"unsupported tensor method .{node.target}() at {_module_path(node)} between spiking layers: "
                    "it is not linear in the spike train")
        return _batch_axis_problem(node, "." + node.target + "()", _module_path(node), tin, kinds)
    return None


def _batch_axis_problem(node, name, where, tin, kinds) -> Optional[str]:
    fn = node.target
    args = node.args
    first = args[0] if args else None
    if fn in (operator.mul, torch.mul, "mul", operator.matmul, torch.matmul, "matmul"):
        if len(tin) > 1 or (len(args) > 1 and args[0] is args[1]):
            return f"product of two spike trains at {where} is not linear"
    if fn in (operator.truediv, torch.div, "div"):
        if len(args) > 1 and isinstance(args[1], fx.Node) and kinds.get(args[1]) == TEMPORAL:
            return f"division by a spike train at {where} is not linear"
    if fn in (torch.cat, torch.concat, torch.stack):
        if _touches_batch(_arg(node, 1, "dim", 0)):
            return f"{name} along dim 0 at {where} would mix time steps and samples: concatenate along a feature axis"
    if fn in (torch.mean, torch.sum, "mean", "sum"):
        d = _arg(node, 1, "dim", None)
        if _touches_batch(d):
            return (f"{name} over dim {d} at {where} reduces over the batch (and time) axis: give the feature "
                    "dims explicitly (e.g. x.mean((2, 3)))")
    if fn in (torch.permute, "permute"):
        dims = args[1:] if fn == "permute" else (args[1] if len(args) > 1 else node.kwargs.get("dims"))
        if fn == "permute" and len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if dims and dims[0] != 0:
            return f"{name} at {where} moves the batch axis of a spike train (dims {tuple(dims)})"
    if fn in (torch.transpose, "transpose", torch.chunk, "chunk", torch.split, "split", torch.flip, "flip",
              torch.roll, "roll", torch.narrow, "narrow"):
        dims = []
        if fn in (torch.transpose, "transpose"):
            dims = [_arg(node, 1, "dim0"), _arg(node, 2, "dim1")]
        elif fn in (torch.chunk, "chunk", torch.split, "split"):
            dims = [_arg(node, 2, "dim", 0)]
        elif fn in (torch.flip, "flip"):
            dims = _dims(_arg(node, 1, "dims"))
        elif fn in (torch.roll, "roll"):
            dims = _dims(_arg(node, 2, "dims"))
        elif fn in (torch.narrow, "narrow"):
            dims = [_arg(node, 1, "dim")]
        if _touches_batch(dims):
            return f"{name} at {where} acts on the batch axis of a spike train (dims {dims})"
    if fn in (operator.getitem, "__getitem__") and isinstance(first, fx.Node) and kinds.get(first) == TEMPORAL:
        src = first
        tuple_src = src.op in ("call_function", "call_method") and src.target in _TUPLE_PRODUCERS
        if not tuple_src:
            idx = args[1]
            lead = idx[0] if isinstance(idx, tuple) and idx else idx
            if not (lead is Ellipsis or (isinstance(lead, slice) and lead == slice(None))):
                return (f"indexing {idx!r} at {where} selects along the batch axis of a spike train: keep "
                        "dim 0 whole (x[:, ...])")
    if fn in (torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze"):
        d = _arg(node, 1, "dim", None)
        if fn in (torch.unsqueeze, "unsqueeze") and d == 0:
            return f"{name}(0) at {where} would put a new axis before the batch axis of a spike train"
        if fn in (torch.squeeze, "squeeze") and _touches_batch(d):
            return (f"{name} at {where} may remove the batch axis of a spike train: name the dims to squeeze "
                    "(x.squeeze(-1))")
    return None


def place_readout(gm: fx.GraphModule, kinds: Dict[fx.Node, str]) -> List[fx.Node]:
    """Insert :func:`readout` markers: after each accumulator layer (a conv / linear after the last
    neurons, with a following BN) whose value is used by anything but another accumulator op, before
    every non-linear op after the last neurons, on the trains reaching a node that already reads
    per-sample (read-out) values, and on the trains reaching the output. Nodes after a read-out get
    kind ``rate``. Returns the markers."""
    modules = dict(gm.named_modules())
    graph = gm.graph
    feeds = _feeds_neuron(gm, modules)

    def tail(n):
        return kinds.get(n) == TEMPORAL and not feeds[n] and not _is_quant_act(n, modules)

    acc = set()
    for node in graph.nodes:
        if not tail(node):
            continue
        if node.op == "call_module":
            m = modules[node.target]
            src = node.args[0] if node.args else None
            if isinstance(m, _SYNAPTIC) or (isinstance(m, _BN) and src in acc):
                acc.add(node)
    feeds_acc: Dict[fx.Node, bool] = {}
    for node in reversed(graph.nodes):
        feeds_acc[node] = any(u in acc or feeds_acc.get(u, False) for u in node.users)
    markers: Dict[fx.Node, fx.Node] = {}

    def marker(a: fx.Node) -> fx.Node:
        if a not in markers:
            with graph.inserting_after(a):
                markers[a] = graph.call_function(readout, (a,))
            kinds[markers[a]] = RATE
        return markers[a]

    for node in list(graph.nodes):
        if node in markers.values() or node.op in ("placeholder", "get_attr"):
            continue
        ins = node.all_input_nodes
        tins = [a for a in ins if kinds.get(a) == TEMPORAL]
        if not tins:
            if any(kinds.get(a) == RATE for a in ins) and node.op != "output":
                kinds[node] = RATE
            continue
        rate_in = any(kinds.get(a) == RATE for a in ins)
        cut = set()
        if node.op == "output" or rate_in:
            cut = set(tins)
        elif tail(node) and node not in acc and not _is_meta_node(node):
            if any(a in acc for a in tins) or (not feeds_acc[node] and _linear_ok(node, modules, kinds) is not None):
                # after an accumulator, or a non-linear op after the last neurons with no accumulator
                # after it: on the rates (one that feeds an accumulator is rejected by check_linear)
                cut = set(tins)
        if cut:
            for a in cut:
                node.replace_input_with(a, marker(a))
            if node.op != "output":
                kinds[node] = RATE
    out = next(n for n in graph.nodes if n.op == "output")
    kinds[out] = RATE if markers or any(kinds.get(a) == RATE for a in out.all_input_nodes) else \
        _combine(kinds[a] for a in out.all_input_nodes)
    return list(markers.values())


# ---------------------------------------------------------------------------------------- pass 4: linearity
def check_linear(gm: fx.GraphModule, kinds: Dict[fx.Node, str]):
    """Raise :class:`ConversionError` at the first op on a train that is not linear in it."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if kinds.get(node) == TEMPORAL and any(kinds.get(a) == TEMPORAL for a in node.all_input_nodes):
            why = _linear_ok(node, modules, kinds)
            if why:
                raise ConversionError(why)


# ---------------------------------------------------------------------------------------- pass 5: shapes
def rewrite_shapes(gm: fx.GraphModule, kinds: Dict[fx.Node, str], ctx: TimeContext):
    """Shape values of trains per sample; view / reshape / expand / unflatten of trains with the time
    steps folded back in."""
    graph = gm.graph
    ops = {}

    def op_module(op):
        if op not in ops:
            name = f"_snn_{op}"
            gm.add_submodule(name, _TimeOp(ctx, op))
            ops[op] = name
        return ops[op]

    for node in list(graph.nodes):
        if node.op not in ("call_method", "call_function") or not node.args:
            continue
        x = node.args[0]
        if not isinstance(x, fx.Node) or kinds.get(x) != TEMPORAL:
            continue
        new = None
        with graph.inserting_before(node):
            if node.op == "call_method" and node.target == "size":
                new = graph.call_module(op_module("size"), node.args, node.kwargs)
            elif node.op == "call_function" and node.target is getattr and node.args[1] == "shape":
                new = graph.call_module(op_module("size"), (x,))
            elif node.op == "call_method" and node.target in ("numel", "nelement"):
                new = graph.call_module(op_module("numel"), (x,))
            elif node.op == "call_method" and node.target in ("view", "reshape", "expand") and \
                    not (len(node.args) == 2 and isinstance(node.args[1], torch.dtype)):
                new = graph.call_module(op_module(node.target), node.args, node.kwargs)
            elif node.op == "call_function" and node.target is torch.reshape:
                new = graph.call_module(op_module("reshape"), node.args, node.kwargs)
            elif node.op == "call_method" and node.target == "unflatten":
                new = graph.call_module(op_module("unflatten"), node.args, node.kwargs)
        if new is not None:
            new.meta = dict(node.meta)
            kinds[new] = kinds[node]
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            kinds.pop(node, None)


# ---------------------------------------------------------------------------------------- pass 6: time expansion
def expand_static(gm: fx.GraphModule, kinds: Dict[fx.Node, str], ctx: TimeContext):
    """Repeat static (per-sample) values over the time steps where they meet a train."""
    graph = gm.graph
    modules = dict(gm.named_modules())
    name = None
    reps: Dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        if kinds.get(node) != TEMPORAL or _is_quant_act(node, modules):
            continue
        if node.op == "call_module" and isinstance(modules.get(node.target), _TimeOp):
            continue
        for a in node.all_input_nodes:
            if kinds.get(a) != STATIC:
                continue
            if a not in reps:
                if name is None:
                    name = "_snn_repeat"
                    gm.add_submodule(name, _TimeOp(ctx, "repeat"))
                with graph.inserting_after(a):
                    reps[a] = graph.call_module(name, (a,))
                kinds[reps[a]] = TEMPORAL
            node.replace_input_with(a, reps[a])


# ---------------------------------------------------------------------------------------- pass 7: neurons
def insert_neurons(gm: fx.GraphModule, kinds: Dict[fx.Node, str], T: int, signed: bool, neg_tol: float,
                   backend: Optional[str] = None) -> Dict[str, IFNeuron]:
    """Replace every ``QuantAct`` call site by an :class:`IFNeuron` (constant-current closed form where
    its input is static)."""
    modules = dict(gm.named_modules())
    out = {}
    extra = {"backend": backend} if backend is not None else {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), QuantAct):
            act = modules[node.target]
            constant = all(kinds.get(a) != TEMPORAL for a in node.all_input_nodes)
            neuron = IFNeuron(act.act_alpha, T, act.bit, signed=signed, constant_input=constant,
                              neg_tol=neg_tol, **extra)
            set_module(gm, node.target, neuron)
            modules[node.target] = neuron
            out[node.target] = neuron
    return out


# ---------------------------------------------------------------------------------------- pass 8: split
class Boundary:
    """What the temporal part hands to the per-sample part: one entry per value, ``readout`` True for
    the trains averaged over time."""

    def __init__(self, names: List[str], readout_flags: List[bool]):
        self.names, self.readout = names, readout_flags

    def __len__(self):
        return len(self.names)


def split_graph(gm: fx.GraphModule, kinds: Dict[fx.Node, str]) -> Tuple[fx.GraphModule, fx.GraphModule, Boundary]:
    """Cut the graph at the read-out markers: ``(temporal part, per-sample part, boundary)``. The
    temporal part returns the boundary values as a tuple; the per-sample part takes them (the read-out
    values as time means) and returns the model's output."""
    graph = gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    post = set()
    for node in graph.nodes:
        if node.op == "output":
            continue
        if (node.op == "call_function" and node.target is readout) or any(a in post for a in node.all_input_nodes):
            post.add(node)
    # boundary values: inputs of per-sample nodes / of the output computed in the temporal part
    boundary: List[fx.Node] = []
    flags: List[bool] = []

    def want(a: fx.Node, is_readout: bool):
        if a not in boundary:
            boundary.append(a)
            flags.append(is_readout)

    for node in list(graph.nodes):
        if node in post and node.op == "call_function" and node.target is readout:
            want(node.args[0], True)
        elif node in post or node is out_node:
            for a in node.all_input_nodes:
                if a not in post:
                    want(a, False)
    # temporal part
    g1 = fx.Graph()
    env1 = {}
    for node in graph.nodes:
        if node in post or node is out_node:
            continue
        env1[node] = g1.node_copy(node, lambda a: env1[a])
    g1.output(tuple(env1[b] for b in boundary))
    # per-sample part
    g2 = fx.Graph()
    env2 = {}
    for i, b in enumerate(boundary):
        env2[("b", b)] = g2.placeholder(f"{b.name}_mean" if flags[i] else f"{b.name}_in")

    def arg2(a):
        if a in post:
            return env2[a]
        return env2[("b", a)]

    for node in graph.nodes:
        if node in post:
            if node.op == "call_function" and node.target is readout:
                env2[node] = env2[("b", node.args[0])]
            else:
                env2[node] = g2.node_copy(node, arg2)
    g2.output(fx.node.map_arg(out_node.args[0], arg2))
    pre = fx.GraphModule(gm, g1, class_name=gm.__class__.__name__)
    head = fx.GraphModule(gm, g2, class_name=gm.__class__.__name__ + "Head")
    return pre, head, Boundary([b.name for b in boundary], flags)


# ---------------------------------------------------------------------------------------- settle steps
class _NoShift(nn.Module):
    """A conv / linear / BN of the temporal part without its additive offset (bias, BN shift): the
    layer as the settle steps run it (beyond the original; see :func:`settle_graph`)."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        m = self.m
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            mean = torch.zeros_like(m.running_mean) if m.running_mean is not None else None
            return F.batch_norm(x, mean, m.running_var, m.weight, None, False, 0.0, m.eps)
        bias = getattr(m, "bias", None)
        if bias is None:
            return m(x)
        m.bias = None  # the layer's own forward (quantized / 8-bit / transposed weights), bias-free
        try:
            return m(x)
        finally:
            m.bias = bias


_ADDITIVE = {operator.add, operator.sub, torch.add, torch.sub, "add", "sub"}
_GATHERS = {torch.cat, torch.concat, torch.stack}


def settle_graph(net: fx.GraphModule, kinds: Dict[str, str]) -> fx.GraphModule:
    """The temporal part as the *settle* steps run it: the analog input and every additive offset
    switched off -- biases and BN shifts of the layers acting on trains, static (input-derived) or
    constant tensors added to / concatenated with a train -- so each layer's total input charge over
    all T + K steps stays T times its ANN pre-activation. The neurons (and their state) are shared
    with ``net``; neurons driven by the analog input emit nothing after step T."""
    g = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    modules = dict(net.named_modules())
    holder = nn.Module()
    wrapped: Dict[str, str] = {}

    def k(n):
        return kinds.get(n.name) if isinstance(n, fx.Node) else CONST

    for node in net.graph.nodes:
        new = g.node_copy(node, lambda a: env[a])
        env[node] = new
        if k(node) != TEMPORAL:
            continue
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, _TimeOp) and m.op == "repeat":
                continue  # handled by its users (a static value multiplying a train stays on)
            shifted = isinstance(m, _SYNAPTIC) and getattr(m, "bias", None) is not None
            shifted = shifted or (isinstance(m, _BN) and m.affine and m.bias is not None) \
                or (isinstance(m, _BN) and m.running_mean is not None)
            if shifted:
                if node.target not in wrapped:
                    name = "settle_" + node.target.replace(".", "_")
                    holder.add_module(name, _NoShift(m))
                    wrapped[node.target] = name
                new.target = "_settle." + wrapped[node.target]
            elif not isinstance(m, _LINEAR_MODULES + (IFNeuron, _TimeOp)):
                raise ConversionError(f"settle steps: cannot remove the offset of '{node.target}' "
                                      f"({type(m).__name__}); run without --settle")
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            if fn in (F.conv1d, F.conv2d, F.conv3d, F.linear, F.conv_transpose2d):
                if len(new.args) > 2:
                    new.args = new.args[:2] + (None,) + new.args[3:]
                if "bias" in new.kwargs:
                    new.kwargs = {**new.kwargs, "bias": None}
            elif fn in _ADDITIVE or fn in _GATHERS:
                # additive static / constant operands (incl. those repeated over time) are switched off
                def off(a):
                    if not isinstance(a, fx.Node):
                        return 0 if isinstance(a, (int, float)) else a
                    src = a
                    if a.op == "call_module" and isinstance(modules.get(a.target), _TimeOp) \
                            and modules[a.target].op == "repeat":
                        src = a.args[0]
                    if k(src) in (STATIC, CONST) and k(a) != TEMPORAL or src is not a:
                        with g.inserting_before(new):
                            return g.call_function(torch.zeros_like, (env[a],))
                    return env[a]
                if fn in _GATHERS:
                    seq = node.args[0]
                    new.args = ([off(a) for a in seq],) + tuple(new.args[1:])
                else:
                    new.args = tuple(off(a) if i < 2 else env.get(a, a) if isinstance(a, fx.Node) else a
                                     for i, a in enumerate(node.args))
    owners = {}
    for n in g.nodes:
        if n.op in ("call_module", "get_attr"):
            t = n.target
            owners[t] = holder.get_submodule(t[len("_settle."):]) if t.startswith("_settle.") else \
                get_attr(net, t)
    return fx.GraphModule(owners, g, class_name=type(net).__name__ + "Settle")


# ---------------------------------------------------------------------------------------- the network
def _act_bits(modules: Iterable[nn.Module]) -> set:
    return {m.bit for m in modules if isinstance(m, QuantAct)}


def _leaves_map(fn, y):
    if isinstance(y, torch.Tensor):
        return fn(y)
    if isinstance(y, tuple) and hasattr(y, "_fields"):
        return type(y)(*(_leaves_map(fn, v) for v in y))
    if isinstance(y, (list, tuple)):
        return type(y)(_leaves_map(fn, v) for v in y)
    if isinstance(y, dict):
        return {k: _leaves_map(fn, v) for k, v in y.items()}
    return y


def _stack(outs: list):
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(outs, 0)
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_stack([o[i] for o in outs]) for i in range(len(first))))
    if isinstance(first, (list, tuple)):
        return type(first)(_stack([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _stack([o[k] for o in outs]) for k in first}
    return first


class Simulation:
    """One simulated batch: the read-out trains ``[steps, B, ...]`` of the temporal part and the other
    values it hands over. ``output(t)`` runs the per-sample part on the read-out after ``t`` steps
    (cumulative sum / min(t, T)); iterating yields t = 1 .. len."""

    def __init__(self, net: "SpikingNetwork", trains: List[Optional[torch.Tensor]], others: List, steps: int):
        self.net, self.trains, self.others, self.steps = net, trains, others, steps
        self._csum = None
        self._final = None

    def __len__(self):
        return self.steps

    def _cumsum(self):
        if self._csum is None:
            self._csum = [tr.cumsum(0) if tr is not None else None for tr in self.trains]
        return self._csum

    def readout(self, t: Optional[int] = None) -> list:
        """The boundary values after ``t`` steps (default: all), read-out trains as ANN-scale values."""
        t = self.steps if t is None else int(t)
        if not 1 <= t <= self.steps:
            raise IndexError(f"step {t} outside 1..{self.steps}")
        div = float(min(t, self.net.T))
        if t == self.steps:
            return [o if tr is None else tr.sum(0) / div for tr, o in zip(self.trains, self.others)]
        return [o if cs is None else cs[t - 1] / div for cs, o in zip(self._cumsum(), self.others)]

    def output(self, t: Optional[int] = None):
        """The model's output after ``t`` steps (default: all; cached)."""
        if t is None or t == self.steps:
            if self._final is None:
                self._final = self.net.head(*self.readout())
            return self._final
        return self.net.head(*self.readout(t))

    def __iter__(self):
        for t in range(1, self.steps + 1):
            yield self.output(t)


class SpikingNetwork(nn.Module):
    """The converted SNN. ``forward(*inputs)`` returns the model's output computed from the read-out
    averaged over the T steps (ANN scale); ``forward(x, per_step=True)`` the output after each step
    t = 1..T, every tensor leaf stacked ``[T, B, ...]``; :meth:`steps` yields them one at a time.

    ``net``: the temporal part (a GraphModule holding the neurons; it runs on time-folded trains and
    returns the boundary values), ``head``: the per-sample part after the read-out. ``chunk``: simulate
    at most this many steps at once (bounded memory; neuron state carries over between chunks);
    ``None`` = all T at once. The result does not depend on it. ``call_sites``: neuron path ->
    ``(QuantAct path in the ANN, call index)``.
    """

    def __init__(self, net: fx.GraphModule, T: int, signed: bool, kinds: Dict[str, str],
                 chunk: Optional[int] = None, head: Optional[fx.GraphModule] = None,
                 boundary: Optional[Boundary] = None, ctx: Optional[TimeContext] = None,
                 call_sites: Optional[Dict[str, Tuple[str, int]]] = None, root: Optional[nn.Module] = None):
        super().__init__()
        self.net = net
        self.head = head
        self.boundary = boundary
        self.ctx = ctx or TimeContext()
        self.T = int(T)
        self.signed = bool(signed)
        self.chunk = chunk
        self.node_kinds = kinds  # node name -> static / temporal / const / meta / rate
        self.call_sites = dict(call_sites or {})
        self._root = [root]  # the ANN copy the modules come from (not a submodule: no duplicate state)
        self.settle = 0
        self.neg_tol: Optional[float] = None  # the user's explicit tolerance (None: the mode's default)
        self._settle_net = [None, None]  # (the temporal part it was built from, the settle graph)
        self.net.eval()

    # -- structure -------------------------------------------------------------------------------
    def neurons(self) -> Dict[str, IFNeuron]:
        return {n: m for n, m in self.net.named_modules() if isinstance(m, IFNeuron)}

    def temporal_modules(self) -> set:
        return {n.target for n in self.net.graph.nodes if n.op == "call_module" and self.node_kinds.get(n.name) == TEMPORAL}

    def ann_site(self, neuron: str) -> Tuple[str, int]:
        """``(QuantAct path in the ANN, call index)`` of a neuron."""
        return self.call_sites.get(neuron, (neuron, 0))

    def set_T(self, T: int):
        self.T = int(T)
        for m in self.neurons().values():
            m.T = self.T

    def set_signed(self, signed: bool):
        self.signed = bool(signed)
        for m in self.neurons().values():
            m.signed = self.signed

    def train(self, mode: bool = True):
        # the SNN always simulates with inference-mode BN / dropout; the fine-tuner switches BN itself
        super().train(mode)
        self.net.eval()
        if self.head is not None:
            self.head.eval()
        return self

    def ann_state_dict(self) -> dict:
        """State dict with the ANN's keys (load it into the ANN class and convert again)."""
        root = self._root[0]
        if root is None:
            return {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        return {k: v.detach().clone() for k, v in root.state_dict().items()}

    def load_ann_state_dict(self, sd):
        root = self._root[0]
        if root is None:
            self.net.load_state_dict(sd)
            return
        root.load_state_dict(sd)
        acts = dict(root.named_modules())
        for name, neuron in self.neurons().items():
            path, _ = self.ann_site(name)
            act = acts.get(path)
            if isinstance(act, QuantAct):
                with torch.no_grad():
                    neuron.act_alpha.copy_(act.act_alpha.reshape(()))

    # -- simulation ------------------------------------------------------------------------------
    def set_window(self, t0: int, steps: int):
        self.ctx.steps = steps
        for m in self.neurons().values():
            m.t0, m.steps = t0, steps

    def run_steps(self, *inputs, t0: int, steps: int):
        """Simulate steps ``t0 .. t0+steps-1`` of the temporal part; returns its boundary tuple."""
        self.set_window(t0, steps)
        return self.net(*inputs)

    def set_settle(self, K: int):
        """Run ``K`` settle steps after the T input steps (signed, bounded neurons; see :func:`convert`)."""
        K = int(K)
        if K < 0:
            raise ConversionError(f"settle={K} must be >= 0")
        if K and not self.signed:
            raise ConversionError("settle steps need signed neurons (a neuron must be able to cancel spikes "
                                  "to reach the quantized level); convert with signed=True")
        self.settle = K
        # The negative-spike tolerance (a spike is cancelled only at v < -neg_tol * theta) keeps float
        # noise at v ~ 0 from cancelling spikes during the T steps, but it also leaves a neuron that ends
        # with v in [-neg_tol * theta, 0) one level above round(Q / theta). With discrete (low-bit)
        # pre-activations that band is populated (0.3 % of one layer of a 2-bit ResNet-20, growing with
        # depth), so the settle mode uses the exact criterion v in [0, theta): round half up, the ANN's.
        tol = self.neg_tol if self.neg_tol is not None else (0.0 if K else DEFAULT_NEG_TOL)
        for m in self.neurons().values():
            m.bounded = bool(K)
            m.neg_tol = float(tol)
            m.horizon = self.T + K if K else None  # keep the state past step T

    def settle_net(self) -> fx.GraphModule:
        """The temporal part without input / offsets, for the settle steps (built on first use)."""
        if self._settle_net[0] is not self.net:
            self._settle_net = [self.net, settle_graph(self.net, self.node_kinds)]
        return self._settle_net[1]

    def _windows(self, total: int):
        chunk = self.chunk or total
        for start, stop in ((0, min(self.T, total)), (self.T, total)):
            for t0 in range(start, stop, chunk):
                yield t0, min(chunk, stop - t0)

    def simulate(self, *inputs, steps: Optional[int] = None) -> Simulation:
        """Run the temporal part over ``steps`` time steps (default T + settle), chunk by chunk; the
        steps after T run the settle graph."""
        total = self.T + self.settle if steps is None else int(steps)
        flags = self.boundary.readout
        parts: List[List[torch.Tensor]] = [[] for _ in flags]
        others: List = [None] * len(flags)
        for t0, n in self._windows(total):
            if t0 >= self.T:
                self.set_window(t0, n)
                vals = self.settle_net()(*inputs)
            else:
                vals = self.run_steps(*inputs, t0=t0, steps=n)
            for i, (v, is_train) in enumerate(zip(vals, flags)):
                if is_train:
                    parts[i].append(v.view(n, v.shape[0] // n, *v.shape[1:]))
                elif t0 == 0:
                    others[i] = v
        trains = [(torch.cat(p, 0) if len(p) > 1 else p[0]) if f else None for p, f in zip(parts, flags)]
        self.ctx.steps = 1
        return Simulation(self, trains, others, total)

    def steps(self, *inputs):
        """Generator of the output after each time step t = 1..T (the per-sample part runs once per
        step on ``[B, ...]``; only the read-out trains of all steps are kept)."""
        yield from self.simulate(*inputs)

    def forward(self, *inputs, per_step: bool = False):
        sim = self.simulate(*inputs)
        if per_step:
            return _stack(list(sim))
        return sim.output()

    def extra_repr(self):
        settle = f", settle={self.settle}" if self.settle else ""
        return f"T={self.T}, {'signed' if self.signed else 'unsigned'}, chunk={self.chunk}{settle}"


def convert(ann: nn.Module, T: Optional[int] = None, signed: bool = True, chunk: Optional[int] = None,
            neg_tol: Optional[float] = None, backend: Optional[str] = None, settle: int = 0) -> SpikingNetwork:
    """Convert a quantized ANN into a :class:`SpikingNetwork`. The ANN is not modified.

    ``T`` defaults to ``2**bit - 1`` of the activation quantizers (they must share one bit-width
    unless ``T`` is given). ``signed=False`` gives the traditional (unsigned) IF neuron. ``backend``:
    the neurons' kernel backend (passed to :class:`IFNeuron`; default: its own choice).

    ``settle=K`` (beyond the original): the neurons are *bounded* signed IF neurons (net count kept in
    [0, T]) and the network runs K more steps after the T input steps with the analog input and every
    bias / BN shift switched off, so each layer's total input charge stays T times its ANN
    pre-activation; every neuron then moves its count one spike per step towards ``clip(round(Q/theta),
    0, T)``, the quantized ANN's level, and once the layers below have settled the network equals the
    quantized ANN (worst case K ~ depth x T). The read-out is the sum over all T + K steps divided by T.
    ``settle=0`` is the paper's SNN, unchanged.

    ``neg_tol``: a signed neuron cancels a spike only at ``v < -neg_tol * theta`` (robust to float noise
    at ``v ~ 0``); default ``1e-3``, and ``0`` with ``settle`` (the exact rounding criterion; see
    :meth:`SpikingNetwork.set_settle`). An explicit value is used in both modes.
    """
    bits = _act_bits(ann.modules())
    if not bits:
        raise ConversionError("the model has no QuantAct activation: nothing to turn into neurons")
    if FULL_PRECISION in bits:
        raise ConversionError("the model has full-precision activations (bit=32): only a quantized ANN "
                              "converts exactly; train or load a 2/3/4-bit model first")
    if T is None:
        if len(bits) > 1:
            raise ConversionError(f"activations use several bit-widths {sorted(bits)}: pass T explicitly")
        T = num_levels(next(iter(bits)))
    def whole(v) -> bool:  # an int (numpy's too), not a bool, float or string
        return not isinstance(v, bool) and isinstance(v, numbers.Integral)
    if not whole(T) or int(T) < 1:
        raise ConversionError(f"T={T!r} must be a whole number >= 1")
    if chunk is not None and (not whole(chunk) or int(chunk) < 1):
        raise ConversionError(f"chunk={chunk!r} must be a whole number >= 1 (or None: all steps at once)")
    T = int(T)

    model = copy.deepcopy(ann).eval()
    gm = _trace(model)
    ctx = TimeContext()
    sites = split_call_sites(gm)
    kinds = classify(gm)
    place_readout(gm, kinds)
    check_linear(gm, kinds)
    if not any(k == TEMPORAL for k in kinds.values()):
        raise ConversionError("the model's output does not depend on any spiking layer")
    out = next(n for n in gm.graph.nodes if n.op == "output")
    if kinds.get(out) not in (RATE, TEMPORAL):
        raise ConversionError("the model's output does not depend on any spiking layer")
    rewrite_shapes(gm, kinds, ctx)
    expand_static(gm, kinds, ctx)
    insert_neurons(gm, kinds, int(T), signed, DEFAULT_NEG_TOL if neg_tol is None else float(neg_tol), backend)
    gm.graph.lint()
    gm.recompile()
    names = {n.name: k for n, k in kinds.items()}
    pre, head, boundary = split_graph(gm, kinds)
    for p in list(pre.parameters()) + list(head.parameters()):
        p.requires_grad_(False)
    net = SpikingNetwork(pre, int(T), signed, names, chunk=chunk, head=head, boundary=boundary, ctx=ctx,
                         call_sites=sites, root=model)
    net.neg_tol = None if neg_tol is None else float(neg_tol)
    if settle:
        net.set_settle(settle)
    return net
