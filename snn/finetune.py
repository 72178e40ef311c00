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

Prefix cache (``finetune(cache=True / "auto")``): the layers before layer k are frozen while it is
tuned, so on a fixed set of batches drawn once the SNN's trains entering each layer and the ANN's
targets are carried from one layer to the next instead of being recomputed from the image for every
layer, batch and epoch (O(L) instead of O(L^2) layer evaluations; same result on the same batches).
"""
from __future__ import annotations

import collections
import copy
import itertools
import time
from typing import Callable, Collection, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from quant.functional import act_quant_levels

from .convert import STATIC, TEMPORAL, SpikingNetwork, _trace
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


def run_until(gm: fx.GraphModule, x: torch.Tensor, needed: List[fx.Node], env: Optional[dict] = None,
              keep: Collection[fx.Node] = ()) -> List:
    """Evaluate the nodes of ``gm`` (in graph order) that ``needed`` depends on, on input ``x``, and
    return the values of ``needed``.

    ``env`` (node -> value, updated in place): values already known, e.g. a cached frontier; only the
    missing nodes are evaluated (a placeholder takes ``x``). A value is dropped from it once every node
    evaluated here that reads it has run, unless it is in ``needed`` or ``keep``.
    """
    env = {} if env is None else env
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    want = set(needed)
    todo = _ancestors(needed, known=env)
    uses = collections.Counter(a for node in todo for a in node.all_input_nodes)
    left = len(todo)
    for node in gm.graph.nodes:
        if not left:
            break
        if node not in todo:
            continue
        left -= 1
        if node.op == "placeholder":
            env[node] = x[placeholders.index(node)] if isinstance(x, tuple) else x
            continue
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
            if uses[a] == 0 and a not in want and a not in keep:
                env.pop(a, None)
    return [env[n] for n in needed]


def _ancestors(nodes, known=()) -> set:
    """``nodes`` and the nodes they depend on, neither including nor looking past ``known`` ones."""
    seen, stack = set(), [n for n in nodes if n not in known]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(a for a in node.all_input_nodes if a not in known)
    return seen


def _fetch_attr(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _time_mean(v, T: int):
    if isinstance(v, torch.Tensor) and v.dim() > 0:
        return v.view(T, v.shape[0] // T, *v.shape[1:]).mean(0)
    return v


def _ann_activation(ann: nn.Module, site):
    """Function returning the ANN's activation at a QuantAct call site ``(path, call index)`` (or a
    path: its first call); the forward stops there."""
    name, index = (site, 0) if isinstance(site, str) else site
    mod = ann.get_submodule(name)
    box = {}

    def hook(m, i, o):
        if box["calls"] == index:
            box["out"] = o
            raise _Stop
        box["calls"] += 1

    def fn(x):
        box["calls"] = 0
        h = mod.register_forward_hook(hook)
        try:
            ann(*x) if isinstance(x, tuple) else ann(x)
        except _Stop:
            pass
        finally:
            h.remove()
        if "out" not in box:
            raise ValueError(f"the ANN never called {name} {index + 1} time(s): the SNN does not come from it")
        return box.pop("out")
    return fn


def default_inputs(batch):
    """The model input(s) of a loader batch: ``batch[0]`` of a tuple / list (``(images, targets)``),
    ``batch["image"]`` (or ``"images"`` / ``"input"``) of a dict, else the batch itself."""
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        for k in ("image", "images", "input", "inputs", "img"):
            if k in batch:
                return batch[k]
        raise ValueError(f"cannot find the input in a batch dict with keys {sorted(batch)}: pass inputs=")
    return batch


def _to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return tuple(_to_device(v, device) for v in x)
    return x


def _input(batch, device, inputs=None):
    return _to_device((inputs or default_inputs)(batch), device)


def _call(fn, x):
    return fn(*x) if isinstance(x, tuple) else fn(x)


def _nbytes(tensors) -> int:
    """Memory held by ``tensors`` (storages shared by views counted once)."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _changed_by(gm: fx.GraphModule, layers: List[SpikingLayer]) -> Dict[fx.Node, int]:
    """Node of ``gm`` -> index of the last of ``layers`` whose tuning changes its value (-1: none)."""
    owner = {}
    for i, layer in enumerate(layers):
        for n in layer.module.graph.nodes:
            if n.op in ("call_module", "get_attr"):
                owner[n.target] = i
    out = {}
    for n in gm.graph.nodes:
        own = -1
        if n.op in ("call_module", "get_attr"):
            parts = n.target.split(".")
            own = max(owner.get(".".join(parts[:i]), -1) for i in range(1, len(parts) + 1))
        out[n] = max([own] + [out[a] for a in n.all_input_nodes])
    return out


class _Frontier:
    """What one graph's later steps still need of its values on one batch.

    Step ``k`` reads the values of ``targets[k]``; ``changes[n]`` is the last step whose tuning changes
    node ``n`` (-1 or absent: none). After step ``k`` a batch's cache holds only values no later tuning
    changes, and of those only the ones the steps ``k, k+1, ...`` read: their targets, and the inputs of
    the nodes they must still evaluate. The next step starts from there (:func:`run_until`)."""

    def __init__(self, gm: fx.GraphModule, targets: List[List[fx.Node]], changes: Optional[dict] = None):
        changes = changes or {}
        self.gm, self.targets, self.keep = gm, targets, []
        reach = [_ancestors(t) for t in targets]
        seen = set()
        for k in range(len(targets)):
            seen |= reach[k]
            later, wanted = set().union(*reach[k:]), set().union(*targets[k:])
            final = {n for n in seen if changes.get(n, -1) < k}
            self.keep.append({n for n in final & later
                              if n in wanted or any(u in later and u not in final for u in n.users)})

    def values(self, k: int, x: torch.Tensor, env: dict) -> List:
        """The values of ``targets[k]`` on batch ``x`` whose cache is ``env`` (updated in place)."""
        out = run_until(self.gm, x, self.targets[k], env, self.keep[k])
        for n in [n for n in env if n not in self.keep[k]]:
            del env[n]
        return out


class _Batches:
    """The batches of every layer-epoch, and the frozen prefixes' values on them: the ANN's activation
    at the tuned layer (target) and the SNN's trains entering it.

    Default: a fresh pass over the loader per layer-epoch, both prefixes recomputed from the image.
    With the prefix cache (:meth:`use_cache`): the batches drawn once, and per batch the ANN's and the
    SNN's frontiers (:class:`_Frontier`) carried from one layer to the next."""

    def __init__(self, ann: nn.Module, net: SpikingNetwork, todo: List[SpikingLayer], loader,
                 max_batches: Optional[int], device, inputs=None):
        self.ann, self.net, self.todo, self.loader, self.get_inputs = ann, net, todo, loader, inputs
        self.max_batches, self.device = max_batches, device
        self.fixed = None      # the batches, when drawn once
        self.frontiers = None  # (ANN, SNN) frontiers, when cached
        self.envs = None       # per batch: (ANN, SNN) cached values
        self.started = None    # a pass begun by use_cache and not kept: the first layer-epoch's

    def total(self) -> Optional[int]:
        if self.fixed is not None:
            return len(self.fixed)
        n = len(self.loader) if hasattr(self.loader, "__len__") else None
        if self.max_batches is not None:
            n = self.max_batches if n is None else min(n, self.max_batches)
        return n

    def inputs(self):
        """One pass: the input batches, on the device."""
        if self.fixed is not None:
            return iter(self.fixed)
        it, self.started = self.started, None
        return it or (_input(b, self.device, self.get_inputs)
                         for b in itertools.islice(self.loader, self.max_batches))

    def use_cache(self, mode, cache_mb: float, log):
        """Draw the batches once and cache the frontiers (``mode`` True, or "auto" for a bounded set of
        batches) if they fit in ``cache_mb`` MB, estimated on the first batch; else say so in one line."""
        if mode == "auto" and not (isinstance(self.loader, (list, tuple)) or self.max_batches is not None):
            return
        it = self.inputs()
        first = next(it, None)
        if first is None:
            return
        if mode != "auto":
            self.fixed = [first, *it]
        ann_gm = _trace(self.ann)
        calls = collections.defaultdict(list)
        for n in ann_gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target].append(n)
        sites = [self.net.ann_site(l.name) for l in self.todo]
        frontiers = (_Frontier(ann_gm, [[calls[path][i]] for path, i in sites]),
                     _Frontier(self.net.net, [l.inputs for l in self.todo], _changed_by(self.net.net, self.todo)))
        envs, peak = ({}, {}), 0
        with torch.no_grad():  # dry run on the first batch: the largest frontier over the layers
            for k in range(len(self.todo)):
                self._cached(frontiers, k, first, envs)
                peak = max(peak, _nbytes(first if isinstance(first, tuple) else [first])
                           + _nbytes([*envs[0].values(), *envs[1].values()]))
        n = self.total()
        mb = n * peak / 2 ** 20
        if mb > cache_mb:
            log(f"finetune: prefix cache off: the frontiers of {n} batches need ~{mb:.0f} MB > cache_mb "
                f"{cache_mb:g}; recomputing the prefixes for every layer"
                + (" (on the same batches)" if self.fixed is not None else ""))
            if self.fixed is None:
                self.started = itertools.chain([first], it)
            return
        if self.fixed is None:
            self.fixed = [first, *it]
        self.frontiers, self.envs = frontiers, [({}, {}) for _ in self.fixed]
        log(f"finetune: prefix cache on: {len(self.fixed)} batches drawn once and reused by every layer "
            f"(~{len(self.fixed) * peak / 2 ** 20:.0f} MB)")

    def _cached(self, frontiers, k: int, x: torch.Tensor, envs):
        target = frontiers[0].values(k, x, envs[0])[0]
        self.net.set_window(0, self.net.T)
        return target, frontiers[1].values(k, x, envs[1])

    def prefixes(self, k: int):
        """``(target, input trains)`` of layer ``todo[k]`` on each batch of one pass."""
        layer = self.todo[k]
        target_fn = _ann_activation(self.ann, self.net.ann_site(layer.name)) if self.frontiers is None else None
        for b, x in enumerate(self.inputs()):
            with torch.no_grad():
                if target_fn is None:
                    target, ins = self._cached(self.frontiers, k, x, self.envs[b])
                else:
                    target = target_fn(x)
                    self.net.set_window(0, self.net.T)
                    ins = run_until(self.net.net, x, layer.inputs)
            self.net.set_window(0, self.net.T)
            yield target, ins


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
             layers: Optional[List[str]] = None, max_batches: Optional[int] = None,
             cache=False, cache_mb: float = 2048, inputs: Optional[Callable] = None) -> List[dict]:
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
    """
    if bn_mode not in ("recalibrate", "frozen"):
        raise ValueError(f"bn_mode={bn_mode!r}: use 'recalibrate' or 'frozen'")
    if cache not in (False, True, "auto"):
        raise ValueError(f"cache={cache!r}: use False, True or 'auto'")
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
    batches = _Batches(ann, net, todo, loader, max_batches, device, inputs)
    if cache and todo:
        batches.use_cache(cache, cache_mb, log)
    history = []
    show = progress and (not _dist_on() or dist.get_rank() == 0)
    for li, layer in enumerate(todo):
        t_start = time.time()
        record = layer.state()
        for p in layer.params:
            p.requires_grad_(True)
        opt = torch.optim.SGD(layer.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        entry = {"layer": layer.name, "epochs": [], "accepted": False}
        for epoch in range(epochs):
            losses = _tune_epoch(layer, net, batches.prefixes(li), batches.total(), opt, T, bn_mode,
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


def _tune_epoch(layer: SpikingLayer, net: SpikingNetwork, prefixes, total, opt, T, bn_mode,
                desc=None) -> List[float]:
    """One epoch of ``layer``; ``prefixes`` yields its ``(target, input trains)`` per batch."""
    neuron = layer.neuron
    it = prefixes
    if desc is not None:
        from tqdm.auto import tqdm
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
        opt.step()
        losses.append(loss.item())
        if desc is not None:
            it.set_postfix(mse=f"{losses[-1]:.4f}")
    if not losses:
        raise ValueError("fine-tuning got no batches: the training loader is empty")
    return losses
