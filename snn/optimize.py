"""Inference optimisation of a converted SNN: ``snn.optimize(net) -> SpikingNetwork`` (a new copy).

What it does to the temporal part (everything after the first neurons; the static prefix that feeds
them -- the analog input's first conv / BN -- is left exactly as it is, so the first spiking layer
stays bit-identical to the ANN):

* **weights frozen**: every conv / linear gets its quantized weight computed once (``QuantConv2d``
  re-quantizes its weight on every call);
* **BN folded**: an eval-mode BatchNorm after a conv / linear is folded into its weight and bias;
* **residual fused**: ``neuron(a + b)`` becomes ``neuron(a, b)``; the kernel adds ``a + b`` while it
  integrates, in the unfused order ``v + (a + b)``;
* **in-place neurons**: every :class:`~snn.neuron.IFNeuron` (which already runs its whole time loop in
  one pass, :mod:`snn.kernels`, and writes ``theta * spikes`` directly) writes its output into its
  input current where nothing else reads it (``inplace``); the first (constant-current) neurons emit
  their closed-form train in the convolutions' layout (``channels_last``);
* **reused output buffers** (CPU): every neuron whose train is read only inside the network writes
  it into a :class:`~snn.neuron.BufferPool` slot shared, by a liveness plan over the graph, with
  neurons whose trains are never alive at the same time (a residual neuron takes the slot of the train
  it reads last, element by element). A forward pass then allocates no spike trains; its only large
  temporaries are the convolutions' outputs, and those go into buffers of one
  :class:`~quant.fused.OutputPool` kept between forwards, each handed out again only once nothing
  reads it (:class:`~quant.fused.PooledConv2d`), so the heap does not grow and shrink (page faults)
  every forward -- no allocator tuning (``reuse_buffers=False``: off); the output upsampling of a dense
  model writes into a buffer reused while the caller does not hold the previous output
  (:class:`~quant.fused.ReusedResize`), and with ``channels_last`` it resizes in that layout
  (:func:`resize_channels_last`);
* **the residual sum stays the neuron's residual input**: the oneDNN convolution post-op
  (``torch.ops.mkldnn._convolution_pointwise_``, private) fuses it only with ``conv_add_postop=True``;
  by default that op only writes a convolution into its pooled, zeroed buffer, and only where its values
  equal the plain module's (:class:`~quant.fused.PooledConv2d`; ``reuse_buffers=False``: never);
* **static BN in place**: the eval-mode BatchNorm of the static prefix (the analog input's first conv / BN,
  left unfolded) writes over the convolution output it reads, with the module's own kernel and values
  (``aten::native_batch_norm``'s ``out=`` variant): at 416-513 px that output is tens of MB, a fresh
  allocation (and its page faults) every forward otherwise;
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

from quant.fused import (fold_weight_layers, fuse_conv_add, guard_views, is_add, is_eval_bn, pick_layout,
                         output_interpolate, pool_conv_outputs, reuse_output_resize)

from .convert import STATIC, TEMPORAL, SpikingNetwork
from .kernels import check_backend
from .neuron import BufferPool, IFNeuron


_FRESH_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)


def _fresh(node: fx.Node, modules) -> bool:
    """The node's value is a new tensor (not a view of another value)."""
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _FRESH_MODULES)
    return is_add(node)


def optimize(net: SpikingNetwork, channels_last="auto", fold_bn: bool = True, fuse_residual: bool = True,
             inplace: bool = True, backend: Optional[str] = None, example: Optional[torch.Tensor] = None,
             conv_add_postop: bool = False, reuse_buffers: bool = True) -> SpikingNetwork:
    """An inference-optimised copy of ``net`` (see the module docstring). ``backend``: set every
    neuron's backend (:mod:`snn.kernels`; ``None``: keep theirs, normally ``"auto"``).
    ``channels_last``: the layout of the spike trains and conv weights, True / False, or ``"auto"``:
    the faster of both on ``example`` (a typical input batch; a few forward passes of each),
    channels-last without an example. ``conv_add_postop`` (opt-in): a residual sum ``conv(x) + b``
    becomes oneDNN's fused post-op through the private ``torch.ops.mkldnn._convolution_pointwise_``
    (falls back to ``conv(x) + b`` where that op is missing); by default the sum is the neuron's
    residual input. ``reuse_buffers``: the neurons write their trains into reused buffers
    (:class:`~snn.neuron.BufferPool`, see the module docstring)."""
    if getattr(net, "optimized", False):
        return net
    if backend is not None:
        backend = check_backend(backend)
    if channels_last == "auto":
        if example is None:
            channels_last = True
        else:
            return pick_layout(lambda cl: optimize(net, cl, fold_bn, fuse_residual, inplace, backend,
                                                   conv_add_postop=conv_add_postop,
                                                   reuse_buffers=reuse_buffers), example)
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
            if inplace and conv_add_postop and fuse_conv_add(gm, node, modules):  # conv(x) + b: oneDNN post-op
                args = node.args
        first = args[0]
        # in place only into a fresh tensor whose one reader is this neuron (or the add fused into it)
        ip = inplace and not neuron.constant_input and isinstance(first, fx.Node) and _fresh(first, modules) \
            and len(first.users) == 1
        neuron.inplace = bool(ip)
        neuron.channels_last = bool(channels_last)
        neuron.reset_state()
        if backend is not None:
            neuron.backend = backend
    if inplace:
        for node in graph.nodes:
            m = modules.get(node.target) if node.op == "call_module" else None
            src = node.args[0] if node.args else None
            if type(m) is nn.BatchNorm2d and is_eval_bn(m) and kinds.get(node.name) == STATIC and len(node.args) == 1 \
                    and not node.kwargs and isinstance(src, fx.Node) and len(src.users) == 1 and _fresh(src, modules) \
                    and isinstance(modules.get(src.target), nn.Conv2d):
                m.__class__ = InplaceBatchNorm2d
    if channels_last:
        for c in guard_views(gm, nodes=temporal):
            kinds[c.name] = TEMPORAL
    head_changed = bool(channels_last) and new.head is not None and resize_channels_last(new.head)
    if reuse_buffers and new.head is not None and reuse_output_resize(new.head):
        head_changed = True
    if head_changed:
        new.head.graph.lint()
        new.head.recompile()
    graph.lint()
    gm.recompile()
    if reuse_buffers:
        plan_buffers(gm)
        pool = pool_conv_outputs(gm, channels_last=channels_last)
        if new.head is not None:
            pool_conv_outputs(new.head, pool=pool, channels_last=channels_last)
    for p in gm.parameters():
        p.requires_grad_(False)
    new.optimized = True
    new.layout = "channels_last" if channels_last else "contiguous"
    new.eval()
    return new


def channels_last_4d(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the channels-last layout where it is a 4-d tensor (a copy unless it already is)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def resize_channels_last(gm: fx.GraphModule) -> bool:
    """Make the graph's output ``F.interpolate`` (a dense model's upsampling of the read-out logits)
    resize a channels-last copy of its input, as the optimised ANN, whose convolutions run channels-last,
    already does: PyTorch's channels-last bilinear kernel is about 2.3 x faster at 513 px than the
    contiguous one (the copy of the small logits costs little), and the two differ by an ulp or so.
    Returns whether the graph changed."""
    src = output_interpolate(gm)
    if src is None or not src.args or not isinstance(src.args[0], fx.Node):
        return False
    x = src.args[0]
    if x.op == "call_function" and x.target is channels_last_4d:
        return False
    with gm.graph.inserting_before(src):
        cl = gm.graph.call_function(channels_last_4d, (x,))
    src.replace_input_with(x, cl)
    return True


class InplaceBatchNorm2d(nn.BatchNorm2d):
    """An eval-mode ``BatchNorm2d`` that writes over its input (which nothing else reads) on the CPU:
    ``aten::native_batch_norm.out`` is the kernel the module runs, so the values are the same bit for bit
    (tested). Elsewhere (training, CUDA, a tensor that needs a gradient, hooks) it is the plain module."""

    def forward(self, x):
        if self.training or x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad) \
                or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)) \
                or self._forward_hooks or self._forward_pre_hooks:
            return super().forward(x)
        empty = x.new_empty(0)
        torch.ops.aten.native_batch_norm.out(x, self.weight, self.bias, self.running_mean, self.running_var, False,
                                             0.0, self.eps, out=x, save_mean=empty, save_invstd=x.new_empty(0))
        return x


# modules whose output is a new tensor (never a view or an in-place update of an input)
_NEW_OUTPUT = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm, IFNeuron,
               nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
               nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d)


def _new_output(node: fx.Node, modules, writers=()) -> bool:
    if node.op != "call_module":
        return False
    m = modules.get(node.target)
    from quant.fused import Conv2dAdd
    return isinstance(m, _NEW_OUTPUT + tuple(writers)) and not isinstance(m, Conv2dAdd)  # conv_add: into its input


def plan_buffers(gm: fx.GraphModule, writers: tuple = (IFNeuron,)) -> Optional[BufferPool]:
    """Give the neurons of ``gm`` reused output buffers (:class:`~snn.neuron.BufferPool` slots).
    ``writers``: the module types that get slots (any with ``pool`` / ``pool_slot`` attributes that
    writes its output into the slot: the neurons, or the quantized ANN's
    :class:`~quant.fused.FusedQuantAct`).

    A neuron's train is alive from its node to the last reader of it or of anything that may alias
    it: every user that is not a module known to return a new tensor (conv, linear, BN, pooling,
    neuron) is taken to be a view, and its readers extend the lifetime. A train that reaches the
    graph's output (directly or through such a user) gets no slot. Slots are assigned in graph order
    (interval colouring); a neuron whose current or residual train dies at it takes that train's slot
    (the kernel reads every element before it writes it). Returns the pool (``None``: no neuron
    qualified)."""
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    writers = tuple(writers)
    neurons = [n for n in nodes if n.op == "call_module" and isinstance(modules.get(n.target), writers)]
    calls = {}
    for n in neurons:
        calls[n.target] = calls.get(n.target, 0) + 1
    last = {}
    for nd in neurons:
        end, escapes, stack, seen = pos[nd], False, [nd], {nd}
        while stack and not escapes:
            v = stack.pop()
            for u in v.users:
                if u.op == "output":
                    escapes = True
                    break
                end = max(end, pos[u])
                if not _new_output(u, modules, writers) and u not in seen:  # may alias: its readers count too
                    seen.add(u)
                    stack.append(u)
        if not escapes and calls[nd.target] == 1:  # a module called at several nodes: no slot
            last[nd] = end
    for nd in neurons:  # reset any earlier plan
        m = modules[nd.target]
        m.pool, m.pool_slot = None, -1
    if not last:
        return None
    slot_of, free, active, nslots = {}, [], [], 0  # active: (last position, node)
    for nd in neurons:
        if nd not in last:
            continue
        p = pos[nd]
        still = []
        for end, other in active:  # trains whose last reader came before this node: slot free
            if end < p:
                free.append(slot_of[other])
            else:
                still.append((end, other))
        active = still
        slot = None
        for a in nd.args[:2]:  # the current / residual train dying here: take its slot
            if isinstance(a, fx.Node) and a in slot_of and last.get(a) == p and any(o is a for _, o in active):
                slot = slot_of[a]
                active = [(e, o) for e, o in active if o is not a]
                break
        if slot is None:
            if free:
                slot = free.pop()
            else:
                slot, nslots = nslots, nslots + 1
        slot_of[nd] = slot
        active.append((last[nd], nd))
    pool = BufferPool(nslots)
    for nd, slot in slot_of.items():
        m = modules[nd.target]
        m.pool, m.pool_slot = pool, slot
    return pool


__all__ = ["optimize", "plan_buffers", "resize_channels_last", "InplaceBatchNorm2d"]
