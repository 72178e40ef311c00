"""Fidelity methods beyond the original layer-wise fine-tuner, for any converted network.

Layer-wise stages (run by :func:`snn.finetune` layer by layer, in execution order, on the same batches and
prefix cache as the original algorithm; the layers before are already corrected):

* ``bias``    -- *bias correction* (SNN calibration in the literature): the layer's mean rate error per
  channel, ``mean(ANN activation - SNN rate)``, is added to the bias of the op that sets the neuron's
  input current (the BN shift, else the conv / linear bias), so the membrane charges by that much more per
  step; ``iters`` passes (each measures the error left after the previous one).
* ``bnstats`` -- every BatchNorm of the layer re-estimates its running mean / variance from the SNN's
  *rate* inputs (the equivalent ANN layer run on the rates; a cumulative average over the batches, no
  gradient).

End-to-end stage (:func:`end_to_end`): all layers together, one optimizer over every weight, weight clip and
BN affine parameter of the SNN (thresholds frozen, BN statistics frozen). Per batch the SNN is simulated
(no gradient) and every neuron's rate recorded; the equivalent quantized ANN then runs on the same input with
each quantizer's *value* replaced by that neuron's SNN rate (straight-through: value = SNN, gradient =
quantized ANN, the same estimator as the layer-wise tuner, no backpropagation through time), so its output
equals the SNN's output and the gradient of a loss on it reaches every layer. Loss: ``"kl"`` (to the
original ANN's logits, softmax over dim 1), ``"mse"`` (to the ANN's output, every tensor leaf), or a callable
``loss(output, ann_output, batch)`` (e.g. cross-entropy on the labels). ``"auto"``: KL when the output is a
single ``[B, C]`` tensor, else MSE.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from quant.functional import act_quant_levels

from quant.utils import set_module

from .convert import TEMPORAL, SpikingNetwork
from .neuron import IFNeuron
from .prefix_cache import _input

_BN = nn.modules.batchnorm._BatchNorm
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_ADDS = {operator.add, operator.iadd, torch.add}


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _time_mean(v, T: int):
    if isinstance(v, torch.Tensor) and v.dim() > 0:
        return v.view(T, v.shape[0] // T, *v.shape[1:]).mean(0)
    return v


# ---------------------------------------------------------------------------------------- bias correction
def bias_owner(layer):
    """``(module, channel dim)`` whose bias shifts layer's neuron input per channel: the BN (affine) or
    conv / linear with a bias found walking back from the neuron's input through additions and identity ops;
    ``None`` if there is none."""
    gm = layer.module
    out = next(n for n in gm.graph.nodes if n.op == "output")
    stack, seen = [out.args[0]], set()
    while stack:
        n = stack.pop(0)
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, _BN):
                if m.affine:
                    return m, 1
                continue
            if isinstance(getattr(m, "bias", None), torch.Tensor) and isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
                return m, (-1 if isinstance(m, nn.Linear) else 1)
            if isinstance(m, _PASS_MODULES):
                stack.extend(n.all_input_nodes)
        elif n.op == "call_function" and n.target in _ADDS:
            stack.extend(a for a in n.args if isinstance(a, fx.Node))
        elif n.op == "call_method" and n.target in ("add", "add_", "contiguous"):
            stack.extend(a for a in n.args if isinstance(a, fx.Node))
    return None


def _channel_sum(e: torch.Tensor, dim: int):
    dim = dim % e.dim()
    dims = [d for d in range(e.dim()) if d != dim]
    return e.sum(dims), e.numel() // e.shape[dim]


def bias_epoch(layer, prefixes, T: int) -> List[float]:
    """One bias-correction pass of ``layer`` over ``prefixes`` (``(target, input trains)`` per batch):
    adds the mean per-channel rate error to the bias. Returns the per-batch MSE before the correction."""
    owner = bias_owner(layer)
    losses, total, count = [], None, 0
    with torch.no_grad():
        for target, ins in prefixes:
            rate = _time_mean(layer.neuron(layer.module(*ins)), T)
            err = target - rate
            losses.append(float((err * err).mean()))
            if owner is None:
                continue
            s, n = _channel_sum(err, owner[1])
            total = s if total is None else total + s
            count += n
        if owner is not None and total is not None:
            cnt = torch.tensor([float(count)], device=total.device)
            if _dist_on():
                dist.all_reduce(total)
                dist.all_reduce(cnt)
            owner[0].bias.add_((total / cnt).to(owner[0].bias.dtype))
    if not losses:
        raise ValueError("fine-tuning got no batches: the training loader is empty")
    return losses


# ---------------------------------------------------------------------------------------- BN statistics
def bnstats_epoch(layer, net: SpikingNetwork, prefixes, T: int) -> List[float]:
    """Re-estimate the running statistics of ``layer``'s BatchNorms from the SNN's rate inputs (cumulative
    average over ``prefixes``); returns the per-batch MSE of the SNN rate before."""
    bns = layer.batchnorms
    saved = [(bn.momentum, bn.training) for bn in bns]
    fresh = [True] * len(bns)
    losses = []
    try:
        with torch.no_grad():
            for target, ins in prefixes:
                rate = _time_mean(layer.neuron(layer.module(*ins)), T)
                losses.append(float(((target - rate) ** 2).mean()))
                rates = [_time_mean(v, T) if k == TEMPORAL else v for v, k in zip(ins, layer.input_kinds)]
                for i, bn in enumerate(bns):
                    if fresh[i]:
                        bn.reset_running_stats()
                        fresh[i] = False
                    bn.momentum = None
                    bn.train()
                net.ctx.steps = 1
                try:
                    layer.module(*rates)
                finally:
                    net.ctx.steps = T
                    for bn in bns:
                        bn.eval()
    finally:
        for bn, (mom, tr) in zip(bns, saved):
            bn.momentum = mom
            bn.train(tr)
    if _dist_on():
        ws = dist.get_world_size()
        for bn in bns:
            for b in (bn.running_mean, bn.running_var):
                if b is not None:
                    dist.all_reduce(b)
                    b.div_(ws)
    if not losses:
        raise ValueError("fine-tuning got no batches: the training loader is empty")
    return losses


# ---------------------------------------------------------------------------------------- end to end
class _RateNeuron(nn.Module):
    """Stands in for an IF neuron in the rate-mode pass: value = the neuron's recorded SNN rate, gradient =
    the quantized ANN activation's (straight-through)."""

    def __init__(self, neuron: IFNeuron, name: str, rates: Dict[str, torch.Tensor]):
        super().__init__()
        self._neuron = [neuron]  # not a submodule (no duplicate parameters)
        self.name, self.rates = name, rates

    def forward(self, current, residual=None):
        if residual is not None:
            current = current + residual
        n = self._neuron[0]
        y = act_quant_levels(current, n.act_alpha, n.T)
        r = self.rates.get(self.name)
        if r is None or r.shape != y.shape:
            return y
        return y + (r - y).detach()


def record_rates(net: SpikingNetwork, x) -> Dict[str, torch.Tensor]:
    """Simulate ``net`` on ``x`` (no gradient); every neuron's rate (sum of its output train / T)."""
    sums: Dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in net.neurons().items():
        def hook(mod, inp, out, name=name):
            s = mod.steps
            v = out.detach().view(s, out.shape[0] // s, *out.shape[1:]).sum(0)
            sums[name] = v if name not in sums else sums[name] + v
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net.simulate(*(x if isinstance(x, tuple) else (x,)))
    finally:
        for h in hooks:
            h.remove()
    return {k: v / net.T for k, v in sums.items()}


def rate_forward(net: SpikingNetwork, x, rates: Dict[str, torch.Tensor]):
    """The network's output from the rates: the equivalent quantized ANN on ``x`` with each neuron's value
    taken from ``rates`` (straight-through; differentiable in the weights)."""
    neurons = net.neurons()
    for name, m in neurons.items():
        set_module(net.net, name, _RateNeuron(m, name, rates))
    net.ctx.steps = 1
    try:
        args = x if isinstance(x, tuple) else (x,)
        vals = net.net(*args)
        return net.head(*vals)
    finally:
        for name, m in neurons.items():
            set_module(net.net, name, m)
        net.ctx.steps = 1


def _leaves(y) -> List[torch.Tensor]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _leaves(v)]
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in _leaves(v)]
    return []


def output_loss(kind, out, ref, batch=None):
    """The end-to-end loss of the SNN's output ``out`` against the ANN's ``ref``."""
    if callable(kind):
        return kind(out, ref, batch)
    if kind == "auto":
        kind = "kl" if isinstance(out, torch.Tensor) and out.dim() == 2 else "mse"
    if kind == "kl":
        pairs = list(zip(_leaves(out), _leaves(ref)))
        return sum(F.kl_div(F.log_softmax(o.float(), 1), F.log_softmax(r.float(), 1), log_target=True,
                            reduction="batchmean") for o, r in pairs) / len(pairs)
    if kind == "mse":
        pairs = [(o, r) for o, r in zip(_leaves(out), _leaves(ref)) if o.is_floating_point()]
        return sum(F.mse_loss(o.float(), r.float()) for o, r in pairs) / len(pairs)
    raise ValueError(f"e2e_loss={kind!r}: use 'auto', 'kl', 'mse' or a callable (output, ann_output, batch)")


def e2e_params(net: SpikingNetwork) -> List[nn.Parameter]:
    """Every parameter of the SNN except the thresholds (weights, weight clips, biases, BN affine)."""
    thresholds = {id(m.act_alpha) for m in net.neurons().values()}
    seen, out = set(), []
    for mod in (net.net, net.head):
        if mod is None:
            continue
        for p in mod.parameters():
            if id(p) not in seen and id(p) not in thresholds and p.is_floating_point():
                seen.add(id(p))
                out.append(p)
    return out


def epoch_plan(min_steps: Optional[int], n: Optional[int], max_batches: Optional[int] = None):
    """``(passes, steps)`` of one fine-tuning epoch over a loader of ``n`` batches per pass (already capped by
    ``max_batches``): with ``min_steps`` and a set of fewer batches than that, ``ceil(min_steps / n)`` passes,
    at most ``max_batches`` steps in all; one pass when ``min_steps`` is ``None``, ``n`` is unknown, or the
    pass is already cut at ``max_batches`` (the set is not small, the cap is the user's)."""
    if min_steps is None or not n or (max_batches is not None and n >= max_batches):
        return 1, n
    steps = max(1, math.ceil(min_steps / n)) * n
    if max_batches is not None:
        steps = min(steps, max_batches)
    return math.ceil(steps / n), steps


def end_to_end(ann: nn.Module, net: SpikingNetwork, loader, *, epochs: int = 1, lr: float = 1e-3,
               momentum: float = 0.9, weight_decay: float = 0.0, loss="auto", max_batches: Optional[int] = None,
               device=None, inputs=None, force: bool = True, score_fn: Optional[Callable] = None,
               best: Optional[float] = None, min_steps: Optional[int] = None,
               log: Callable[[str], None] = print, progress: bool = True) -> dict:
    """The end-to-end stage (module docstring): ``epochs`` epochs of SGD with a cosine learning rate over
    ``loader`` (``max_batches`` per pass; an epoch makes enough passes for ``min_steps`` steps, see
    :func:`epoch_plan`). Without ``force`` an epoch is kept only if ``score_fn(net)`` beats
    ``best`` (the score before, measured if not given). Returns a history dict."""
    import copy
    import itertools
    import time
    device = device or next(net.parameters()).device
    params = e2e_params(net)
    state = lambda: copy.deepcopy([p.detach().clone() for p in params] +  # noqa: E731
                                  [b.detach().clone() for b in net.net.buffers()])
    bufs = list(net.net.buffers())

    def load(s):
        with torch.no_grad():
            for t, v in zip(params + bufs, s):
                t.copy_(v)
    if not force and best is None:
        best = float(score_fn(net))
    record = state()
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    n_per = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None:
        n_per = max_batches if n_per is None else min(n_per, max_batches)
    reps, steps = epoch_plan(min_steps, n_per, max_batches)
    if reps > 1:
        log(f"finetune end-to-end: {n_per} batches per pass < min_steps {min_steps}: each epoch makes {reps} "
            f"passes ({steps} steps)")
    n_per = steps
    total = (n_per or 1) * epochs
    entry = {"layer": "end-to-end", "stage": "e2e", "epochs": [], "accepted": False}
    t0, step = time.time(), 0
    ann.eval()
    try:
        for epoch in range(epochs):
            it = itertools.chain.from_iterable(itertools.islice(loader, max_batches) for _ in range(reps))
            it = itertools.islice(it, steps) if reps > 1 else it
            if progress:
                from tqdm import tqdm  # not tqdm.auto: its asyncio class iterates its argument eagerly
                it = tqdm(it, desc=f"ft end-to-end ep {epoch + 1}", total=n_per, leave=False, dynamic_ncols=True)
            losses = []
            for batch in it:
                x = _input(batch, device, inputs)
                with torch.no_grad():
                    ref = ann(*x) if isinstance(x, tuple) else ann(x)
                rates = record_rates(net, x)
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
                out = rate_forward(net, x, rates)
                l = output_loss(loss, out, ref, batch)
                if not torch.isfinite(l):
                    raise FloatingPointError(f"end-to-end fine-tuning loss became {float(l)}: lower e2e_lr")
                opt.zero_grad(set_to_none=True)
                l.backward()
                if _dist_on():
                    ws = dist.get_world_size()
                    for p in params:
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad.div_(ws)
                opt.step()
                step += 1
                losses.append(l.item())
                if progress:
                    it.set_postfix(loss=f"{losses[-1]:.4f}")
            if not losses:
                raise ValueError("fine-tuning got no batches: the training loader is empty")
            ep = {"epoch": epoch + 1, "loss_first": losses[0], "loss_mean": sum(losses) / len(losses),
                  "loss_last": losses[-1]}
            if force:
                record, entry["accepted"], verdict = state(), True, "accepted"
            else:
                score = float(score_fn(net))
                ep["score"] = score
                if score > best:
                    best, record, entry["accepted"] = score, state(), True
                    verdict = f"updated (score {score:.3f})"
                else:
                    verdict = f"kept previous (score {score:.3f} <= best {best:.3f})"
            entry["epochs"].append(ep)
            log(f"finetune end-to-end epoch {epoch + 1}/{epochs}: loss {ep['loss_mean']:.5f} "
                f"(first batch {ep['loss_first']:.5f}) -> {verdict}")
    finally:
        load(record)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        net.eval()
    entry["seconds"] = time.time() - t0
    if best is not None:
        entry["best_score"] = best
    return entry


__all__ = ["bias_owner", "bias_epoch", "bnstats_epoch", "record_rates", "rate_forward", "output_loss",
           "e2e_params", "epoch_plan", "end_to_end"]
