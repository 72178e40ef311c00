"""The data the layer-wise fine-tuner trains on: per batch, the original ANN's activation at the tuned
layer (the target) and the SNN's spike trains entering it -- recomputed from the image, or carried from
one layer to the next by the *prefix cache* (:class:`Batches`, :func:`run_until`, :class:`Frontier`).

The layers before layer k are frozen while it is tuned, so on a fixed set of batches drawn once the SNN's
trains entering each layer and the ANN's targets can be carried from one layer to the next instead of being
recomputed from the image for every layer, batch and epoch: O(L) instead of O(L^2) layer evaluations, the
same result on the same batches.
"""
from __future__ import annotations

import collections
import itertools
from typing import Collection, Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from quant.utils import get_attr

from .convert import SpikingNetwork, _trace


class _Stop(Exception):
    pass


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
            env[node] = get_attr(gm, node.target)
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


def _nbytes(tensors) -> int:
    """Memory held by ``tensors`` (storages shared by views counted once)."""
    storages = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def _changed_by(gm: fx.GraphModule, layers: list) -> Dict[fx.Node, int]:
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


class Frontier:
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


class Batches:
    """The batches of every layer-epoch, and the frozen prefixes' values on them: the ANN's activation
    at the tuned layer (target) and the SNN's trains entering it.

    Default: a fresh pass over the loader per layer-epoch, both prefixes recomputed from the image.
    With the prefix cache (:meth:`use_cache`): the batches drawn once, and per batch the ANN's and the
    SNN's frontiers (:class:`_Frontier`) carried from one layer to the next."""

    def __init__(self, ann: nn.Module, net: SpikingNetwork, todo: list, loader,
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
        frontiers = (Frontier(ann_gm, [[calls[path][i]] for path, i in sites]),
                     Frontier(self.net.net, [l.inputs for l in self.todo], _changed_by(self.net.net, self.todo)))
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


_Frontier, _Batches = Frontier, Batches  # older private names
