"""Inference optimisation of a converted SNN: ``snn.optimize(net) -> SpikingNetwork`` (a new copy).

What it does to the temporal part (everything after the first neurons; the static prefix that feeds
them -- the analog input's first conv / BN -- is left exactly as it is, so the first spiking layer
stays bit-identical to the ANN):

* **weights frozen**: every conv / linear gets its quantized weight computed once (``QuantConv2d``
  re-quantizes its weight on every call);
* **BN folded**: an eval-mode BatchNorm after a conv / linear is folded into its weight and bias;
* **residual fused**: ``neuron(a + b)`` becomes ``neuron(a, b)``; the kernel adds ``a + b`` while it
  integrates, in the unfused order ``v + (a + b)``;
* **fused neurons**: every :class:`~snn.neuron.IFNeuron` becomes a :class:`FusedIFNeuron`, which runs
  the whole time loop in one pass (:mod:`snn.kernels`), writes ``theta * spikes`` directly (in place
  into its input current when nothing else reads it), and keeps the membrane state only when the
  simulation is chunked; the first (constant-current) neurons use the one-pass closed form;
* **layout**: the spike trains and conv weights use the layout the CPU convolutions (oneDNN) are
  fastest in -- channels-last, or, with ``example=`` (a typical input batch), whichever of
  channels-last / contiguous runs this network faster; ``.view`` calls get a ``.contiguous()`` first.

The result equals the unoptimised network up to float rounding: BN folding and the oneDNN layout
change the last bits of a current, so a spike can differ where a membrane lands within ~1e-6 of the
threshold (measured agreement on ResNet-20: > 99.99 % of spikes; the first layer is identical).

The original network is not modified. Fine-tuning (:func:`snn.finetune`) needs the unoptimised
modules: tune first, optimise after. :class:`~snn.Monitor` works on an optimised network (its
statistics come from the optimised spike trains).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from quant.fused import fold_weight_layers, fuse_conv_add, guard_views, is_add, pick_layout

from .convert import TEMPORAL, SpikingNetwork
from .kernels import cpp_if_fast, if_const_steps, if_steps, threshold_floats
from .neuron import IFNeuron


class FusedIFNeuron(IFNeuron):
    """:class:`IFNeuron` running on the fused kernels. ``forward(current, residual=None)`` returns
    ``theta * spikes`` (folded ``[steps*B, ...]``) like the reference neuron.

    ``inplace``: write the output into ``current`` (set by :func:`optimize` only where the current is
    a fresh tensor no other node reads; never done while the module has hooks). ``channels_last``:
    a constant-input neuron emits its train in channels-last layout. ``kernel``: backend name for
    :func:`snn.kernels.if_steps` (``None``: ``FASTSNN_KERNEL`` / auto).
    """

    def __init__(self, src: IFNeuron, inplace: bool = False, channels_last: bool = False,
                 kernel: Optional[str] = None):
        super().__init__(src.act_alpha.detach(), src.T, src.bit, signed=src.signed,
                         constant_input=src.constant_input, neg_tol=src.neg_tol)
        self.t0, self.steps = src.t0, src.steps
        self.inplace = bool(inplace)
        self.channels_last = bool(channels_last)
        self.kernel = kernel
        self._cache = None

    def extra_repr(self):
        return super().extra_repr() + f", fused, inplace={self.inplace}"

    def _hooked(self) -> bool:
        from torch.nn.modules import module as _m
        return bool(self._forward_hooks or self._forward_pre_hooks or _m._global_forward_hooks
                    or _m._global_forward_pre_hooks)

    def _levels(self, dtype):
        """(theta, negative level) as floats in ``dtype``, cached until the threshold changes."""
        a = self.act_alpha
        key = (id(a), a._version, a.data_ptr(), dtype, self.neg_tol)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, threshold_floats(a, dtype, self.neg_tol))
        return self._cache[1]

    def forward(self, current: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        theta = self.act_alpha
        steps = self.steps
        levels = self._levels(current.dtype)
        scale = levels[0]
        if self.constant_input:
            if residual is not None:
                current = current + residual
            out = if_const_steps(current, theta, self.t0, steps, scale=scale, channels_last=self.channels_last,
                                 backend=self.kernel)
            if self.record:
                self._record(out.view(steps, -1, *current.shape[1:]) / theta)
            return out
        keep = self.t0 + steps < self.T  # a later window continues from this state
        fresh = self.t0 == 0 or self.v is None
        inplace = self.inplace and not self._hooked()
        if fresh and not keep and not self.record:
            out = cpp_if_fast(current, residual, steps, self.signed, levels, inplace, self.kernel)
            if out is not None:  # the common case, with a minimum of Python around the kernel
                self.v = self.n = None
                return out
        b = current.shape[0] // steps
        cur = current.view(steps, b, *current.shape[1:])
        res = residual.view(steps, b, *residual.shape[1:]) if residual is not None else None
        v, n = (None, None) if fresh else (self.v, self.n)
        out = cur if inplace else None
        s, self.v, self.n = if_steps(cur, theta, self.signed, self.neg_tol, residual=res, v=v, n=n, state=keep,
                                     scale=scale, out=out, backend=self.kernel, levels=levels)
        if self.record:
            self._record(s / theta)
        return s.view(current.shape)


_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)


def _fresh(node: fx.Node, modules) -> bool:
    """The node's value is a new tensor (not a view of another value)."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _FRESH_MODULES)
    return is_add(node)


def optimize(net: SpikingNetwork, channels_last="auto", fold_bn: bool = True, fuse_residual: bool = True,
             inplace: bool = True, kernel: Optional[str] = None,
             example: Optional[torch.Tensor] = None) -> SpikingNetwork:
    """An inference-optimised copy of ``net`` (see the module docstring). ``kernel`` forces a backend
    of :mod:`snn.kernels` (default: ``FASTSNN_KERNEL`` or auto). ``channels_last``: the layout of the
    spike trains and conv weights, True / False, or ``"auto"``: the faster of both on ``example`` (a
    typical input batch; a few forward passes of each), channels-last without an example."""
    if getattr(net, "optimized", False):
        return net
    if channels_last == "auto":
        if example is None:
            channels_last = True
        else:
            return pick_layout(lambda cl: optimize(net, cl, fold_bn, fuse_residual, inplace, kernel), example)
    new = copy.deepcopy(net)
    gm = new.net
    kinds = new.node_kinds
    graph = gm.graph
    temporal = {n for n in graph.nodes if kinds.get(n.name) == TEMPORAL}
    if fold_bn:
        fold_weight_layers(gm, nodes=temporal, channels_last=channels_last)
    modules = dict(gm.named_modules())
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), IFNeuron):
            continue
        neuron = modules[node.target]
        if isinstance(neuron, FusedIFNeuron):
            continue
        src = node.args[0] if node.args else None
        args = tuple(node.args)
        if fuse_residual and not neuron.constant_input and isinstance(src, fx.Node) and is_add(src) \
                and len(src.users) == 1 and all(isinstance(a, fx.Node) and kinds.get(a.name) == TEMPORAL
                                                for a in src.args):
            a, b = src.args
            if _fresh(b, modules) and len(b.users) == 1 and not (_fresh(a, modules) and len(a.users) == 1):
                a, b = b, a
            args = (a, b)
        first = args[0]
        node.args = args
        if len(args) == 2:
            graph.erase_node(src)
            if inplace and fuse_conv_add(gm, node, modules):  # conv(x) + b: oneDNN post-op, into b
                args = node.args
        first = args[0]
        # in place only into a fresh tensor whose one reader is this neuron (or the add fused into it)
        ip = inplace and not neuron.constant_input and isinstance(first, fx.Node) and _fresh(first, modules) \
            and len(first.users) == 1
        fused = FusedIFNeuron(neuron, inplace=ip, channels_last=channels_last, kernel=kernel)
        _set(gm, node.target, fused)
        modules[node.target] = fused
    if channels_last:
        for c in guard_views(gm, nodes=temporal):
            kinds[c.name] = TEMPORAL
    graph.lint()
    gm.recompile()
    for p in gm.parameters():
        p.requires_grad_(False)
    new.optimized = True
    new.layout = "channels_last" if channels_last else "contiguous"
    new.eval()
    return new


def _set(root: nn.Module, path: str, new: nn.Module):
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


__all__ = ["optimize", "FusedIFNeuron"]
