"""Layer-wise fine-tuning of a converted SNN (spec section 8).

Spiking layers are tuned one at a time, in execution order, from the 2nd to the last (the first layer
is exact, the non-spiking read-out is never tuned). "Layer k" is every op between the neurons that
feed IF neuron k and the neuron itself: for a plain CNN conv_k -> BN_k; for the second half of a
residual block conv2 -> BN2 plus the shortcut (with its 1x1 conv / BN) and the addition.

For each training batch:

* target = the *original* quantized ANN's activation at layer k (the ANN driven by the image);
* the SNN's trains entering layer k are simulated (already-tuned layers included, no gradient);
* forward value = the SNN's rate output of neuron k (spike count * theta / T);
* gradient = through the equivalent quantized-ANN layer (conv -> BN -> quantizer with T levels and
  the frozen clip alpha = theta) evaluated on the SNN's *input rates* -- a straight-through estimator,
  no surrogate spike gradient, no backpropagation through time;
* loss = MSE(value, target); SGD (lr 1e-3, momentum 0.9) on the layer's weights (re-quantized in the
  forward pass), weight clips and BN affine parameters. The threshold is frozen.

BatchNorm: ``bn_mode="recalibrate"`` (the original's ResNet / ImageNet behaviour) runs the layer's BN in
training mode on the rate inputs, so its running statistics are re-estimated from SNN rates (momentum
0.1) and used by the spiking forward afterwards; ``"frozen"`` (the original's CIFAR AlexNet / VGG
behaviour) keeps the running statistics and only trains gamma / beta.

Acceptance: after every epoch, ``score_fn(net)`` (higher is better, e.g. train-set top-1 of the whole
SNN) is compared with the best so far; the layer is reverted to its best state at the end. With
``force=True`` every epoch is accepted. Works in one process and under DDP (gradients and BN buffers
are averaged over ranks).
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from quant.functional import act_quant_levels

from .convert import STATIC, TEMPORAL, SpikingNetwork
from .neuron import IFNeuron


class _Stop(Exception):
    pass


class SpikingLayer:
    """One tunable layer: the ops feeding IF neuron ``name``, as a small GraphModule sharing the
    SNN's modules (``module``), the boundary nodes it reads, and its parameters."""

    def __init__(self, name: str, neuron: IFNeuron, module: fx.GraphModule, inputs: List[fx.Node],
                 kinds: Dict[str, str]):
        self.name, self.neuron, self.module, self.inputs = name, neuron, module, inputs
        self.input_kinds = [kinds.get(n.name) for n in inputs]
        seen, params = set(), []
        for n in module.graph.nodes:
            if n.op == "call_module":
                for p in module.get_submodule(n.target).parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        self.params = params
        self.batchnorms = [module.get_submodule(n.target) for n in module.graph.nodes if n.op == "call_module"
                           and isinstance(module.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)]

    @property
    def tunable(self) -> bool:
        return bool(self.params) and TEMPORAL in self.input_kinds

    def state(self) -> dict:
        return copy.deepcopy(self.module.state_dict())

    def load(self, state: dict):
        self.module.load_state_dict(state)


def spiking_layers(net: SpikingNetwork) -> List[SpikingLayer]:
    """Split the SNN into its layers (one per IF neuron), in execution order."""
    gm = net.net
    kinds = net.node_kinds
    modules = dict(gm.named_modules())
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), IFNeuron):
            continue
        internal, boundary = set(), []

        def visit(n: fx.Node):
            if n in internal or n in boundary:
                return
            is_neuron = n.op == "call_module" and isinstance(modules.get(n.target), IFNeuron)
            if is_neuron or n.op == "placeholder" or kinds.get(n.name) == STATIC:
                boundary.append(n)
                return
            internal.add(n)
            for a in n.all_input_nodes:
                visit(a)

        src = node.args[0]
        visit(src)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        boundary.sort(key=order.get)
        g = fx.Graph()
        env = {}
        for b in boundary:
            env[b] = g.placeholder(b.name)
        for n in gm.graph.nodes:
            if n in internal:
                env[n] = g.node_copy(n, lambda a: env[a])
        g.output(env[src])
        sub = fx.GraphModule(gm, g, class_name="Layer")
        layers.append(SpikingLayer(node.target, modules[node.target], sub, boundary, kinds))
    return layers


def run_until(gm: fx.GraphModule, x: torch.Tensor, needed: List[fx.Node]) -> List:
    """Execute ``gm`` on ``x`` node by node until every node of ``needed`` is computed."""
    want = set(needed)
    env: Dict[fx.Node, object] = {}
    uses: Dict[fx.Node, int] = {n: len(n.users) for n in gm.graph.nodes}
    for node in gm.graph.nodes:
        if not want - env.keys():
            break
        if node.op == "placeholder":
            env[node] = x
            continue
        if node.op == "output":
            break
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "call_module":
            env[node] = gm.get_submodule(node.target)(*args, **kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*args, **kwargs)
        elif node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        elif node.op == "get_attr":
            env[node] = _fetch_attr(gm, node.target)
        for a in node.all_input_nodes:  # free values nobody needs any more
            uses[a] -= 1
            if uses[a] == 0 and a not in want:
                env.pop(a, None)
    return [env[n] for n in needed]


def _fetch_attr(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _time_mean(v, T: int):
    if isinstance(v, torch.Tensor) and v.dim() > 0:
        return v.view(T, v.shape[0] // T, *v.shape[1:]).mean(0)
    return v


def _ann_activation(ann: nn.Module, name: str):
    """Function returning the ANN's activation at QuantAct ``name`` (the forward stops there)."""
    mod = ann.get_submodule(name)
    box = {}

    def hook(m, i, o):
        box["out"] = o
        raise _Stop

    def fn(x):
        h = mod.register_forward_hook(hook)
        try:
            ann(x)
        except _Stop:
            pass
        finally:
            h.remove()
        return box.pop("out")
    return fn


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _average(tensors):
    ws = dist.get_world_size()
    for t in tensors:
        if t is not None and t.is_floating_point():
            dist.all_reduce(t)
            t.div_(ws)


def finetune(ann: nn.Module, net: SpikingNetwork, loader, epochs: int = 1, lr: float = 1e-3,
             momentum: float = 0.9, weight_decay: float = 1e-4, bn_mode: str = "recalibrate",
             force: bool = True, score_fn: Optional[Callable[[SpikingNetwork], float]] = None,
             device=None, log: Callable[[str], None] = print, progress: bool = True,
             layers: Optional[List[str]] = None, max_batches: Optional[int] = None) -> List[dict]:
    """Tune ``net`` in place, layer by layer. Returns one JSON-ready dict per tuned layer.

    ``loader`` yields ``(images, labels)`` (labels unused) or images. ``layers`` restricts tuning to
    the named neurons. ``max_batches`` caps the batches per epoch (quick runs).
    """
    if bn_mode not in ("recalibrate", "frozen"):
        raise ValueError(f"bn_mode={bn_mode!r}: use 'recalibrate' or 'frozen'")
    if not force and score_fn is None:
        log("finetune: no score function given, accepting every epoch (as with --force)")
        force = True
    device = device or next(net.parameters()).device
    ann.eval()
    net.eval()
    T = net.T
    all_layers = spiking_layers(net)
    todo = [l for l in all_layers if l.tunable and (layers is None or l.name in layers)]
    if layers is not None:
        unknown = set(layers) - {l.name for l in all_layers}
        if unknown:
            raise ValueError(f"unknown layers {sorted(unknown)}: choose from {[l.name for l in all_layers]}")
    best = None if force else float(score_fn(net))
    if best is not None:
        log(f"finetune: initial score {best:.3f}")
    history = []
    show = progress and (not _dist_on() or dist.get_rank() == 0)
    for li, layer in enumerate(todo):
        t_start = time.time()
        target_fn = _ann_activation(ann, layer.name)
        record = layer.state()
        for p in layer.params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(layer.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        entry = {"layer": layer.name, "epochs": [], "accepted": False}
        for epoch in range(epochs):
            losses = _tune_epoch(layer, net, target_fn, loader, opt, T, bn_mode, device, max_batches,
                                 desc=f"ft {li + 1}/{len(todo)} {layer.name} ep {epoch + 1}" if show else None)
            if _dist_on():
                _average(list(layer.module.buffers()))
            ep = {"epoch": epoch + 1, "loss_first": losses[0], "loss_mean": sum(losses) / len(losses),
                  "loss_last": losses[-1]}
            if force:
                record, entry["accepted"] = layer.state(), True
                verdict = "accepted"
            else:
                score = float(score_fn(net))
                ep["score"] = score
                if score > best:
                    best, record, entry["accepted"] = score, layer.state(), True
                    verdict = f"updated (score {score:.3f})"
                else:
                    verdict = f"kept previous (score {score:.3f} <= best {best:.3f})"
            entry["epochs"].append(ep)
            log(f"finetune {layer.name} epoch {epoch + 1}/{epochs}: mse {ep['loss_mean']:.5f} "
                f"(first batch {ep['loss_first']:.5f}) -> {verdict}")
        layer.load(record)
        for p in layer.params:
            p.requires_grad_(False)
        entry["seconds"] = time.time() - t_start
        if best is not None:
            entry["best_score"] = best
        history.append(entry)
    net.eval()
    return history


def _tune_epoch(layer: SpikingLayer, net: SpikingNetwork, target_fn, loader, opt, T, bn_mode, device,
                max_batches, desc=None) -> List[float]:
    neuron = layer.neuron
    it = loader
    if desc is not None:
        from tqdm.auto import tqdm
        total = len(loader) if hasattr(loader, "__len__") else None
        if max_batches and total:
            total = min(total, max_batches)
        it = tqdm(loader, desc=desc, total=total, leave=False, dynamic_ncols=True)
    losses = []
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        x = x.to(device, non_blocking=True)
        with torch.no_grad():
            target = target_fn(x)
            net.set_window(0, T)
            ins = run_until(net.net, x, layer.inputs)
            current = layer.module(*ins)
            rate_out = _time_mean(neuron(current), T)
        rates = [_time_mean(v, T) if k == TEMPORAL else v for v, k in zip(ins, layer.input_kinds)]
        if bn_mode == "recalibrate":
            for bn in layer.batchnorms:
                bn.train()
        try:
            y = act_quant_levels(layer.module(*rates), neuron.act_alpha, T)
        finally:
            for bn in layer.batchnorms:
                bn.eval()
        y = y + (rate_out - y).detach()  # value: SNN rates; gradient: equivalent ANN layer
        loss = torch.nn.functional.mse_loss(y, target)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fine-tuning loss became {float(loss)} at layer {layer.name}: lower the lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if _dist_on():
            _average([p.grad for p in layer.params])
        opt.step()
        losses.append(loss.item())
        if desc is not None:
            it.set_postfix(mse=f"{losses[-1]:.4f}")
    if not losses:
        raise ValueError("fine-tuning got no batches: the training loader is empty")
    return losses
