"""Layer-wise fine-tuning of a converted SNN.

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

Prefix cache (``finetune(cache=True / "auto")``): see :mod:`snn.prefix_cache`.
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from quant.functional import act_quant_levels

from . import calibrate
from .calibrate import _dist_on, _time_mean  # noqa: F401 (_time_mean: also the tests')
from .convert import STATIC, TEMPORAL, SpikingNetwork
from .neuron import IFNeuron
from .prefix_cache import (Batches, Frontier, _ann_activation, _changed_by, _Frontier, _input,  # noqa: F401
                           default_inputs, run_until)


# fine-tuning methods (``finetune(method=...)``): stages joined by "+", run in order
STAGES = ("fastsnn", "bias", "bnstats", "e2e")
METHODS = ("fastsnn", "bias", "bnstats", "e2e", "fastsnn+bias", "fastsnn+e2e", "bias+e2e", "bias+fastsnn+e2e")


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
             layers: Optional[List[str]] = None, max_batches: Optional[int] = None,
             cache=False, cache_mb: float = 2048, inputs: Optional[Callable] = None,
             method: str = "fastsnn", schedule: str = "constant", bias_iters: int = 2,
             e2e_epochs: int = 1, e2e_lr: Optional[float] = None, e2e_loss="auto",
             e2e_batches: Optional[int] = None, accept: str = "score", local_batches: int = 8,
             min_steps: Optional[int] = None) -> List[dict]:
    """Tune ``net`` in place, layer by layer. Returns one JSON-ready dict per tuned layer.

    ``loader`` yields ``(images, targets)`` (targets unused), dicts with an ``"image"`` entry, or
    images; ``inputs(batch)`` picks the model input(s) otherwise (a tuple for several inputs).
    ``layers`` restricts tuning to the named neurons. ``max_batches`` caps the batches per epoch.

    ``cache`` (the prefix cache): by default every layer-epoch draws a fresh pass from ``loader`` and,
    for every batch, re-simulates the SNN up to the tuned layer and re-runs the ANN up to its
    activation there -- O(L^2) layer evaluations per epoch. With ``cache=True`` the batches are drawn
    from ``loader`` *once* (``max_batches`` of them), kept on the device and reused for every layer
    and epoch, and per batch both networks' values that later layers still need (the tuned layers'
    new spike trains, residual inputs, the ANN's activations) are carried from one layer to the next:
    O(L). The result equals the uncached fine-tuner run on that same fixed list of batches (up to
    float rounding); it differs from the default only in reusing the same batches for every layer
    instead of a fresh (reshuffled) pass per layer, which is why it is opt-in. ``"auto"`` caches when
    the batches are a bounded set anyway: ``loader`` is a list / tuple, or ``max_batches`` is given.
    Either way the cache is used only if the batches and the largest frontier (measured on the
    first batch) fit in ``cache_mb`` MB; otherwise one log line says so and the prefixes are
    recomputed (with ``cache=True`` still on the batches drawn once). The loader must yield fresh
    tensors (not buffers it overwrites). Under DDP each rank caches its own batches.

    ``method``: the stages to run, joined by ``+`` (:data:`METHODS` lists the measured presets; see
    :mod:`snn.calibrate`). The layer-wise stages -- ``fastsnn`` (the original algorithm above, ``epochs``
    epochs), ``bias`` (bias correction, ``bias_iters`` passes), ``bnstats`` (BN statistics from SNN rates)
    -- run per layer in the order given, on the same batches; ``e2e`` (the end-to-end stage: all layers
    together, straight-through, ``e2e_epochs`` epochs of ``e2e_batches`` batches -- default
    ``max_batches`` -- lr ``e2e_lr`` (default ``lr``) with a cosine schedule, loss ``e2e_loss``) comes
    last. The accept / revert test (``score_fn``) runs after every fastsnn / e2e epoch and after each
    bias / bnstats stage of a layer. ``schedule="cosine"``: the fastsnn stage's lr decays over each
    layer's steps (default ``"constant"``, the original). ``method="fastsnn"`` is the original algorithm,
    unchanged.

    ``accept``: how a layer-wise step is judged without ``force``. ``"score"`` (default, the original):
    ``score_fn(net)``, the whole SNN's score, must improve. ``"local"``: the tuned layer's own error must
    fall -- the MSE between its rate output and the ANN's activation there, on ``local_batches`` batches
    drawn from ``loader`` once, before any tuning, and the same for every decision (the whole-SNN score
    at the first layers is near chance while the layers after them are uncorrected, so it mostly judges
    noise there). The end-to-end stage is always judged by ``score_fn`` (accepting every epoch when
    there is none).

    ``min_steps``: a floor on the SGD steps of each ``fastsnn`` epoch and each end-to-end epoch. When the
    fine-tuning set has fewer batches (``n``) than that, an epoch makes ``ceil(min_steps / n)`` passes over
    them (at most ``max_batches`` steps) before it is judged: on 600 images in batches of 100 one pass is 6
    steps per layer, too few for SGD with momentum to move a layer, and the accept test reverts most of
    them (:func:`snn.calibrate.epoch_plan`; measured in docs/fidelity.md). ``None`` (default, the original):
    one pass per epoch. A set of at least ``min_steps`` batches, or cut at ``max_batches``, is not affected.
    """
    stages = method.split("+") if isinstance(method, str) else list(method)
    bad = [st for st in stages if st not in STAGES]
    if bad or not stages or len(set(stages)) != len(stages):
        raise ValueError(f"method={method!r}: join distinct stages of {STAGES} with '+' (e.g. {METHODS[-1]!r})")
    if "e2e" in stages and stages[-1] != "e2e":
        raise ValueError(f"method={method!r}: the end-to-end stage 'e2e' must come last")
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule={schedule!r}: use 'constant' or 'cosine'")
    layer_stages = [st for st in stages if st != "e2e"]
    original = layer_stages == ["fastsnn"]
    if bn_mode not in ("recalibrate", "frozen"):
        raise ValueError(f"bn_mode={bn_mode!r}: use 'recalibrate' or 'frozen'")
    if cache not in (False, True, "auto"):
        raise ValueError(f"cache={cache!r}: use False, True or 'auto'")
    if accept not in ("score", "local"):
        raise ValueError(f"accept={accept!r}: use 'score' (the whole SNN's score_fn) or 'local' (the layer's error)")
    local = accept == "local" and not force
    if min_steps is not None and min_steps < 1:
        raise ValueError(f"min_steps={min_steps}: use None (one pass per epoch) or a positive number")
    if local and local_batches < 1:
        raise ValueError(f"local_batches={local_batches}: judge the layers on at least one batch")
    if not force and score_fn is None and not local:
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
    best = None if force or local else float(score_fn(net))
    if best is not None:
        log(f"finetune: initial score {best:.3f}")
    history = []
    show = progress and (not _dist_on() or dist.get_rank() == 0)
    held = None
    if layer_stages:
        if local and todo:  # drawn once, before the training batches; copied (a DALI loader reuses buffers)
            drawn = [_clone(_input(b, device, inputs)) for b in itertools.islice(loader, local_batches)]
            held = Batches(ann, net, todo, drawn, None, device, lambda b: b)
            held.use_cache(True, cache_mb, lambda m: log(m.replace("finetune: prefix cache", "finetune: local "
                                                                   "accept test: prefix cache")))
            log(f"finetune: each layer-wise step is kept only if the layer's own rate error on "
                f"{held.total()} batches falls (accept=local)")
        batches = Batches(ann, net, todo, loader, max_batches, device, inputs)
        if cache and todo:
            batches.use_cache(cache, cache_mb, log)
        reps, steps = calibrate.epoch_plan(min_steps, batches.total(), max_batches)
        if reps > 1 and todo:
            log(f"finetune: {batches.total()} batches per pass < min_steps {min_steps}: each layer-wise epoch makes "
                f"{reps} passes ({steps} steps)")
    else:
        todo = []
    for li, layer in enumerate(todo):
        t_start = time.time()
        record = layer.state()
        entry = {"layer": layer.name, "epochs": [], "accepted": False}
        best_local = None
        if held is not None:
            best_local = entry["local_error_before"] = _layer_error(layer, held.prefixes(li), T, device)

        def judge(ep):
            nonlocal best, record, best_local
            if force:
                record, entry["accepted"] = layer.state(), True
                return "accepted"
            if held is not None:
                err = ep["local_error"] = _layer_error(layer, held.prefixes(li), T, device)
                if err < best_local:
                    best_local, record, entry["accepted"] = err, layer.state(), True
                    return f"updated (layer error {err:.5f})"
                return f"kept previous (layer error {err:.5f} >= best {best_local:.5f})"
            score = float(score_fn(net))
            ep["score"] = score
            if score > best:
                best, record, entry["accepted"] = score, layer.state(), True
                return f"updated (score {score:.3f})"
            return f"kept previous (score {score:.3f} <= best {best:.3f})"

        for stage in layer_stages:
            if stage != "fastsnn":
                passes = bias_iters if stage == "bias" else 1
                for _ in range(max(1, passes)):
                    if stage == "bias":
                        losses = calibrate.bias_epoch(layer, batches.prefixes(li), T)
                    else:
                        losses = calibrate.bnstats_epoch(layer, net, batches.prefixes(li), T)
                ep = {"stage": stage, "epoch": 1, "loss_first": losses[0], "loss_mean": sum(losses) / len(losses),
                      "loss_last": losses[-1]}
                verdict = judge(ep)
                entry["epochs"].append(ep)
                log(f"finetune {layer.name} {stage}: mse before {ep['loss_mean']:.5f} -> {verdict}")
                continue
            for p in layer.params:
                p.requires_grad_(True)
            opt = torch.optim.SGD(layer.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
            lr_at = None
            reps, per_epoch = calibrate.epoch_plan(min_steps, batches.total(), max_batches)
            if schedule == "cosine":
                steps = max(1, epochs * (per_epoch or 1))
                lr_at = lambda i: lr * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))  # noqa: E731
            for epoch in range(epochs):
                losses = []
                for rep in range(reps):
                    left = None if reps == 1 else per_epoch - len(losses)  # the last pass may stop early
                    losses += _tune_epoch(layer, net, batches.prefixes(li), batches.total() if left is None else
                                          min(left, batches.total()), opt, T, bn_mode,
                                          desc=f"ft {li + 1}/{len(todo)} {layer.name} ep {epoch + 1}" if show else None,
                                          lr_at=lr_at, step0=epoch * (per_epoch or 1) + len(losses), max_steps=left)
                if _dist_on():
                    _average(list(layer.module.buffers()))
                ep = {"epoch": epoch + 1, "loss_first": losses[0], "loss_mean": sum(losses) / len(losses),
                      "loss_last": losses[-1]}
                if not original:
                    ep = {"stage": stage, **ep}
                verdict = judge(ep)
                entry["epochs"].append(ep)
                log(f"finetune {layer.name} epoch {epoch + 1}/{epochs}: mse {ep['loss_mean']:.5f} "
                    f"(first batch {ep['loss_first']:.5f}) -> {verdict}")
            for p in layer.params:
                p.requires_grad_(False)
        layer.load(record)
        entry["seconds"] = time.time() - t_start
        if best is not None:
            entry["best_score"] = best
        if best_local is not None:
            entry["best_local_error"] = best_local
        history.append(entry)
    if "e2e" in stages:
        entry = calibrate.end_to_end(ann, net, loader, epochs=e2e_epochs, lr=lr if e2e_lr is None else e2e_lr,
                                     momentum=momentum, weight_decay=0.0, loss=e2e_loss,
                                     max_batches=max_batches if e2e_batches is None else e2e_batches,
                                     device=device, inputs=inputs, force=force or score_fn is None,
                                     score_fn=score_fn, best=best, min_steps=min_steps,
                                     log=log, progress=show)
        history.append(entry)
    net.eval()
    return history


def _clone(x):
    return tuple(_clone(v) for v in x) if isinstance(x, tuple) else x.clone() if isinstance(x, torch.Tensor) else x


def _layer_error(layer: SpikingLayer, prefixes, T: int, device=None) -> float:
    """The mean squared error between ``layer``'s rate output and the ANN's activation, over ``prefixes``
    (averaged over the ranks under DDP)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for target, ins in prefixes:
            rate = _time_mean(layer.neuron(layer.module(*ins)), T)
            total += float(torch.nn.functional.mse_loss(rate, target, reduction="sum"))
            n += target.numel()
    if not n:
        raise ValueError("the local accept test got no batches: the training loader is empty")
    if _dist_on():
        t = torch.tensor([total / n], dtype=torch.float64, device=device)
        _average([t])
        return float(t)
    return total / n


def _tune_epoch(layer: SpikingLayer, net: SpikingNetwork, prefixes, total, opt, T, bn_mode,
                desc=None, lr_at=None, step0: int = 0, max_steps: Optional[int] = None) -> List[float]:
    """One pass of ``layer`` (at most ``max_steps`` batches); ``prefixes`` yields its ``(target, input
    trains)`` per batch."""
    neuron = layer.neuron
    it = prefixes if max_steps is None else itertools.islice(prefixes, max_steps)
    if desc is not None:
        from tqdm import tqdm  # not tqdm.auto: its asyncio class iterates its argument eagerly
        it = tqdm(prefixes, desc=desc, total=total, leave=False, dynamic_ncols=True)
    losses = []
    for target, ins in it:
        with torch.no_grad():
            current = layer.module(*ins)
            rate_out = _time_mean(neuron(current), T)
        rates = [_time_mean(v, T) if k == TEMPORAL else v for v, k in zip(ins, layer.input_kinds)]
        if bn_mode == "recalibrate":
            for bn in layer.batchnorms:
                bn.train()
        net.ctx.steps = 1  # the equivalent ANN layer runs on per-sample rates
        try:
            y = act_quant_levels(layer.module(*rates), neuron.act_alpha, T)
        finally:
            net.ctx.steps = T
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
        if lr_at is not None:
            for g in opt.param_groups:
                g["lr"] = lr_at(step0 + len(losses))
        opt.step()
        losses.append(loss.item())
        if desc is not None:
            it.set_postfix(mse=f"{losses[-1]:.4f}")
    if not losses:
        raise ValueError("fine-tuning got no batches: the training loader is empty")
    return losses
