"""Quantized ANN -> SNN conversion (spec section 5).

The ANN is deep-copied and traced with :mod:`torch.fx` (quant layers and torch.nn layers are leaves).
Each ``QuantAct`` becomes an :class:`~snn.neuron.IFNeuron` with threshold ``act_alpha`` and
``T = 2**bit - 1`` steps. Every other op runs unchanged on time-folded ``[T*B, ...]`` trains, which is
exact for the ops allowed after the first neuron (all linear in the spike train: conv / linear, BN in
eval mode, residual additions *before* the neuron -- i.e. in current space --, channel concat,
space-to-depth / reorg, average pooling, flatten, nearest / bilinear upsampling, dropout). Nodes that
do not depend on any neuron (the analog input and the first layer's convolution / BN) are computed
once on ``[B, ...]``: the first neurons get a constant current. The last layer, which has no
activation quantizer, is a non-spiking accumulator; the network returns the mean over T of its
per-step output, i.e. the ANN-scale value.
"""
from __future__ import annotations

import copy
import operator
from typing import Dict, Iterable, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from quant.functional import FULL_PRECISION, num_levels
from quant.layers import WEIGHT_LAYERS, QuantAct

from .neuron import IFNeuron


class ConversionError(ValueError):
    """The ANN cannot be converted (names the module / op and what to do)."""


STATIC, TEMPORAL, CONST = "static", "temporal", "const"

# modules allowed to act on spike trains: all linear in their input
_LINEAR_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.Flatten, nn.Unflatten,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.PixelShuffle, nn.PixelUnshuffle, nn.ZeroPad2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
) + WEIGHT_LAYERS
_LINEAR_FUNCTIONS = {
    operator.add, operator.sub, operator.neg, operator.getitem, operator.mul, operator.truediv,
    operator.floordiv, torch.add, torch.sub, torch.cat, torch.concat, torch.flatten, torch.reshape,
    torch.permute, torch.transpose, torch.chunk, torch.split, torch.stack, torch.unsqueeze,
    torch.squeeze, F.interpolate, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.pixel_shuffle, F.pixel_unshuffle, F.dropout,
    F.pad, F.conv2d, F.linear, getattr, torch.nn.functional.upsample,
}
_LINEAR_METHODS = {
    "view", "reshape", "flatten", "permute", "contiguous", "size", "transpose", "chunk", "split",
    "unsqueeze", "squeeze", "add", "sub", "mul", "div", "__getitem__", "dim", "expand_as", "view_as",
    "unflatten", "float", "to", "type_as", "clone",
}
_LINEAR_INTERP = ("nearest", "linear", "bilinear", "trilinear", "nearest-exact")
_MAXPOOL_HINT = ("max over spikes is not the max of firing rates; replace it with a stride-2 "
                 "convolution (as every Fast-SNN architecture does)")


class QuantTracer(fx.Tracer):
    """Traces through containers, keeps quant layers and torch.nn layers as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantAct, IFNeuron) + WEIGHT_LAYERS):
            return True
        return super().is_leaf_module(m, qualname)


def match_time(x, ref):
    """Repeat a per-sample tensor ``[B, ...]`` over time to match the folded train ``ref``."""
    if not isinstance(x, torch.Tensor) or not isinstance(ref, torch.Tensor) or x.dim() == 0:
        return x
    steps = ref.shape[0] // x.shape[0]
    if steps == 1:
        return x
    return x.unsqueeze(0).expand(steps, *x.shape).reshape(steps * x.shape[0], *x.shape[1:])



def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        graph = QuantTracer().trace(model)
    except Exception as e:  # noqa: BLE001 - report why tracing failed, in one line
        raise ConversionError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
            "remove data-dependent Python control flow from its forward()") from e
    return fx.GraphModule(model, graph, class_name=type(model).__name__ + "SNN")


def _node_inputs(node: fx.Node) -> List[fx.Node]:
    return list(node.all_input_nodes)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if node.op == "call_module":
        return str(node.target)
    if stack:
        return list(stack.keys())[-1] + f" ({node.name})"
    return node.name


def _check_linear(node: fx.Node, modules: Dict[str, nn.Module], kinds: Dict[fx.Node, str]):
    """Raise if a node acting on a spike train is not linear in it."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)):
            raise ConversionError(f"unsupported module '{node.target}' ({type(m).__name__}): {_MAXPOOL_HINT}")
        if isinstance(m, IFNeuron):
            return
        if isinstance(m, nn.Upsample) and m.mode not in _LINEAR_INTERP:
            raise ConversionError(f"upsampling mode {m.mode!r} of '{node.target}' is not linear in the spike train")
        if not isinstance(m, _LINEAR_MODULES):
            raise ConversionError(
                f"unsupported module '{node.target}' ({type(m).__name__}) after a spiking layer: only "
                "ops linear in the spike train (conv, linear, BN, avg-pool, concat, reorg, upsample, "
                "flatten) and QuantAct (-> IF neuron) can be converted")
        return
    if node.op == "call_function":
        fn = node.target
        name = getattr(fn, "__name__", str(fn))
        if "max_pool" in name:
            raise ConversionError(f"unsupported function {name} at {_module_path(node)}: {_MAXPOOL_HINT}")
        if fn not in _LINEAR_FUNCTIONS and fn is not match_time:
            raise ConversionError(f"unsupported function {name} at {_module_path(node)} after a spiking "
                                  "layer: it is not linear in the spike train")
        if fn in (operator.mul, operator.truediv, operator.floordiv):
            if sum(kinds.get(a) == TEMPORAL for a in _node_inputs(node)) > 1:
                raise ConversionError(f"product of two spike trains at {_module_path(node)} cannot be converted")
        if fn is F.interpolate:
            mode = node.kwargs.get("mode", "nearest")
            if mode not in _LINEAR_INTERP:
                raise ConversionError(f"interpolate mode {mode!r} at {_module_path(node)} is not linear")
        return
    if node.op == "call_method":
        if node.target not in _LINEAR_METHODS:
            raise ConversionError(f"unsupported tensor method .{node.target}() at {_module_path(node)} "
                                  "after a spiking layer: it is not linear in the spike train")


def _act_bits(modules: Iterable[nn.Module]) -> set:
    return {m.bit for m in modules if isinstance(m, QuantAct)}


class SpikingNetwork(nn.Module):
    """The converted SNN. ``forward(x)`` returns the read-out averaged over the T steps (ANN scale);
    ``forward(x, per_step=True)`` returns ``[T, B, ...]``: the cumulative average after each step.

    ``chunk``: simulate at most this many steps at once (bounded memory; neuron state carries over
    between chunks); ``None`` = all T at once. The result does not depend on it.
    """

    def __init__(self, net: fx.GraphModule, T: int, signed: bool, kinds: Dict[str, str],
                 chunk: Optional[int] = None):
        super().__init__()
        self.net = net
        self.T = int(T)
        self.signed = bool(signed)
        self.chunk = chunk
        self.node_kinds = kinds  # node name -> static / temporal / const
        self.net.eval()

    # -- structure -------------------------------------------------------------------------------
    def neurons(self) -> Dict[str, IFNeuron]:
        return {n: m for n, m in self.net.named_modules() if isinstance(m, IFNeuron)}

    def temporal_modules(self) -> set:
        return {n.target for n in self.net.graph.nodes if n.op == "call_module" and self.node_kinds.get(n.name) == TEMPORAL}

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
        return self

    def ann_state_dict(self) -> dict:
        """State dict with the ANN's keys (load it into the ANN class and convert again)."""
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def load_ann_state_dict(self, sd):
        self.net.load_state_dict(sd)

    # -- simulation ------------------------------------------------------------------------------
    def set_window(self, t0: int, steps: int):
        for m in self.neurons().values():
            m.t0, m.steps = t0, steps

    def run_steps(self, x, t0: int, steps: int):
        """Simulate steps ``t0 .. t0+steps-1``; returns the raw output (folded ``[steps*B, ...]``)."""
        self.set_window(t0, steps)
        return self.net(x)

    def forward(self, x: torch.Tensor, per_step: bool = False):
        B = x.shape[0]
        chunk = self.chunk or self.T
        outs = []
        for t0 in range(0, self.T, chunk):
            steps = min(chunk, self.T - t0)
            y = self.run_steps(x, t0, steps)
            outs.append(_unfold(y, steps, B))
        y = _cat_time(outs)
        return _readout(y, per_step)

    def extra_repr(self):
        return f"T={self.T}, {'signed' if self.signed else 'unsigned'}, chunk={self.chunk}"


def _unfold(y, steps, B):
    if isinstance(y, torch.Tensor):
        return y.view(steps, B, *y.shape[1:])
    if isinstance(y, (list, tuple)):
        return type(y)(_unfold(v, steps, B) for v in y)
    if isinstance(y, dict):
        return {k: _unfold(v, steps, B) for k, v in y.items()}
    return y


def _cat_time(outs):
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, 0) if len(outs) > 1 else first
    if isinstance(first, (list, tuple)):
        return type(first)(_cat_time([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat_time([o[k] for o in outs]) for k in first}
    return first


def _readout(y, per_step):
    if isinstance(y, torch.Tensor):
        if per_step:
            t = torch.arange(1, y.shape[0] + 1, device=y.device, dtype=y.dtype)
            return y.cumsum(0) / t.view(-1, *([1] * (y.dim() - 1)))
        return y.mean(0)
    if isinstance(y, (list, tuple)):
        return type(y)(_readout(v, per_step) for v in y)
    if isinstance(y, dict):
        return {k: _readout(v, per_step) for k, v in y.items()}
    return y


def convert(ann: nn.Module, T: Optional[int] = None, signed: bool = True, chunk: Optional[int] = None,
            neg_tol: float = 1e-3) -> SpikingNetwork:
    """Convert a quantized ANN into a :class:`SpikingNetwork`. The ANN is not modified.

    ``T`` defaults to ``2**bit - 1`` of the activation quantizers (they must share one bit-width
    unless ``T`` is given). ``signed=False`` gives the traditional (unsigned) IF neuron.
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
    if int(T) < 1:
        raise ConversionError(f"T={T} must be >= 1")

    model = copy.deepcopy(ann).eval()
    gm = _trace(model)
    modules = dict(gm.named_modules())
    graph = gm.graph
    kinds: Dict[fx.Node, str] = {}
    for node in list(graph.nodes):
        ins = _node_inputs(node)
        if node.op == "placeholder":
            kinds[node] = STATIC
        elif node.op == "get_attr":
            kinds[node] = CONST
        elif node.op == "output":
            kinds[node] = TEMPORAL if any(kinds[a] == TEMPORAL for a in ins) else STATIC
        elif node.op == "call_module" and isinstance(modules[node.target], QuantAct):
            act = modules[node.target]
            constant = all(kinds[a] != TEMPORAL for a in ins)
            neuron = IFNeuron(act.act_alpha, T, act.bit, signed=signed, constant_input=constant,
                              neg_tol=neg_tol)
            _set_module(gm, node.target, neuron)
            modules[node.target] = neuron
            kinds[node] = TEMPORAL
        else:
            k = [kinds[a] for a in ins]
            if TEMPORAL in k:
                kinds[node] = TEMPORAL
                _check_linear(node, modules, kinds)
                ref = next(a for a in ins if kinds[a] == TEMPORAL)
                for a in ins:
                    if kinds[a] == STATIC:
                        with graph.inserting_before(node):
                            rep = graph.call_function(match_time, (a, ref))
                        kinds[rep] = TEMPORAL
                        node.replace_input_with(a, rep)
            elif STATIC in k:
                kinds[node] = STATIC
            else:
                kinds[node] = CONST
    if kinds[next(n for n in graph.nodes if n.op == "output")] != TEMPORAL:
        raise ConversionError("the model's output does not depend on any spiking layer")
    graph.lint()
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)
    net = SpikingNetwork(gm, T, signed, {n.name: k for n, k in kinds.items()}, chunk=chunk)
    return net


def _set_module(root: nn.Module, path: str, new: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)
