"""Statistics of a converted SNN against its quantized ANN.

Per spiking layer (one per ``QuantAct`` / IF neuron, in execution order, first layer first):

* ``firing_rate``: spike events (positive and negative) per neuron per time step;
* ``agreement``: fraction of neurons whose net spike count equals the ANN's quantized level
  (``round(a * T / alpha)``) for the same input image;
* ``mean_abs_error``: mean |count - level|, in spikes;
* ``mse``: mean squared error between the SNN's rate output (count * theta / T) and the ANN activation.

Whole network, per sample: ``sops`` (synaptic operations: one accumulate per spike event and per
synapse it reaches, counted exactly from the spike trains), ``ann_macs`` (the ANN's multiply-
accumulates), ``snn_macs`` (multiply-accumulates the SNN still does: layers driven by the analog input,
computed once), and ``energy`` with the usual 45 nm CMOS figures (Horowitz, ISSCC 2014): 4.6 pJ per
32-bit float MAC and 0.9 pJ per accumulate.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from quant.functional import act_levels
from quant.layers import QuantAct

from .convert import SpikingNetwork
from .neuron import IFNeuron

E_MAC_PJ = 4.6
E_AC_PJ = 0.9


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TCONVS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _is_synaptic(m: nn.Module) -> bool:
    return isinstance(m, _CONVS + _TCONVS + (nn.Linear,))


def _prod(t):
    p = 1
    for v in t:
        p *= v
    return p


def _macs(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> float:
    """Multiply-accumulates of one call of a conv / transposed conv / linear layer, summed over the
    batch (a transposed conv: every input value times its ``out_channels / groups`` kernels' taps)."""
    if isinstance(m, nn.Linear):
        return float(out.numel() * m.in_features)
    k = _prod(m.kernel_size)
    if isinstance(m, _TCONVS):
        return float(inp.numel() * (m.out_channels // m.groups) * k)
    return float(out.numel() * (m.in_channels // m.groups) * k)


_FANOUT: Dict[tuple, torch.Tensor] = {}


def _conv_fanout(m: nn.Module, hw: tuple, x: torch.Tensor) -> torch.Tensor:
    """``F[pos]``: how many (output position, kernel tap) pairs read input position ``pos`` -- the
    gradient of ``sum(conv(ones))`` w.r.t. its input (the same for every channel), for convolutions
    (any stride, dilation, padding mode) and transposed convolutions of 1, 2 or 3 dims. Cached per
    geometry."""
    transposed = isinstance(m, _TCONVS)
    key = (type(m), tuple(m.kernel_size), tuple(m.stride), _pad_key(m), tuple(m.dilation),
           tuple(getattr(m, "output_padding", ())), m.padding_mode, hw, x.dtype, x.device)
    if key not in _FANOUT:
        nd = len(m.kernel_size)
        with torch.enable_grad():
            inp = torch.ones(1, 1, *hw, dtype=x.dtype, device=x.device, requires_grad=True)
            ones = torch.ones(1, 1, *m.kernel_size, dtype=x.dtype, device=x.device)
            if transposed:
                fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
                y = fn(inp, ones, None, m.stride, m.padding, m.output_padding, 1, m.dilation)
            else:
                fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
                if m.padding_mode != "zeros":  # padded copies of border values read them again
                    y = fn(F.pad(inp, m._reversed_padding_repeated_twice, mode=m.padding_mode), ones, None,
                           m.stride, 0, m.dilation)
                else:
                    y = fn(inp, ones, None, m.stride, m.padding, m.dilation)
            y.sum().backward()
        _FANOUT[key] = inp.grad[0, 0]
    return _FANOUT[key]


def _pad_key(m):
    return m.padding if isinstance(m.padding, str) else tuple(m.padding)


def _sops(m: nn.Module, x: torch.Tensor) -> float:
    """Accumulates triggered by the non-zero inputs of a conv / transposed conv / linear layer (exact
    fan-out): every non-zero input reaches ``out_channels / groups`` kernels at each of the ``F[pos]``
    output positions / taps that read its position, so the total is ``sum_pos nz[pos] * F[pos]`` --
    one pass over the input instead of a second convolution."""
    if isinstance(m, nn.Linear):
        return float(torch.count_nonzero(x)) * m.out_features
    nd = len(m.kernel_size)
    if x.dim() != nd + 2:  # unbatched input
        x = x.unsqueeze(0)
    if nd == 2 and x.dim() == 4:
        from .kernels import nonzero_per_position
        nz = nonzero_per_position(x).to(x.dtype)
    else:
        nz = (x != 0).sum(dim=(0, 1)).to(x.dtype)
    fan = _conv_fanout(m, tuple(x.shape[2:]), x)
    return float((nz * fan).sum()) * (m.out_channels // m.groups)


class Monitor:
    """Runs the ANN and its SNN side by side and accumulates the statistics above.

    >>> mon = Monitor(ann, net)
    >>> ann_out, snn_steps = mon.run(x)      # [B, C], [T, B, C] (cumulative mean read-out)
    >>> stats = mon.summary()                 # plain dict, JSON-ready
    """

    def __init__(self, ann: nn.Module, net: SpikingNetwork):
        self.ann, self.net = ann, net
        self.neurons: Dict[str, IFNeuron] = net.neurons()
        ann_modules = dict(ann.named_modules())
        site = getattr(net, "ann_site", lambda n: (n, 0))
        missing = [n for n in self.neurons if not isinstance(ann_modules.get(site(n)[0]), QuantAct)]
        if missing:
            raise ValueError(f"the SNN does not come from this ANN (no QuantAct at {missing[:3]})")
        self._ann_in: Dict[str, torch.Tensor] = {}
        self._hooks = []
        by_module: Dict[str, Dict[int, str]] = {}
        for name in self.neurons:  # every call site of an ANN module -> its neuron
            path, index = site(name)
            by_module.setdefault(path, {})[index] = name
        self._calls: Dict[str, int] = {}
        self._count_head = False
        for path, names in by_module.items():
            self._hooks.append(ann_modules[path].register_forward_hook(self._ann_hook(path, names)))
        temporal = net.temporal_modules()
        self._sop_sum = 0.0
        self._snn_mac_sum = 0.0
        self._ann_mac_sum = 0.0
        for name, m in net.net.named_modules():
            if _is_synaptic(m):
                self._hooks.append(m.register_forward_hook(self._snn_syn_hook(name in temporal)))
        head = getattr(net, "head", None)
        if head is not None:  # layers after the read-out run once per sample on rates: MACs
            for name, m in head.named_modules():
                if _is_synaptic(m):
                    self._hooks.append(m.register_forward_hook(self._head_syn_hook()))
        for name, m in ann.named_modules():
            if _is_synaptic(m):
                self._hooks.append(m.register_forward_hook(self._ann_syn_hook()))
        zeros = lambda: {n: 0.0 for n in self.neurons}  # noqa: E731
        self._n = zeros()          # neurons seen
        self._events = zeros()
        self._equal = zeros()
        self._abs_err = zeros()
        self._sq_err = zeros()
        self._samples = 0

    # -- hooks -----------------------------------------------------------------------------------
    def _ann_hook(self, path, names: Dict[int, str]):
        def hook(mod, inp, out):
            i = self._calls.get(path, 0)
            self._calls[path] = i + 1
            if i in names:
                self._ann_in[names[i]] = inp[0].detach()
        return hook

    def _snn_syn_hook(self, temporal: bool):
        def hook(mod, inp, out):
            if temporal:
                self._sop_sum += _sops(mod, inp[0])
            elif self._window_start():  # analog-input layers run once per time window
                self._snn_mac_sum += _macs(mod, inp[0], out)
        return hook

    def _window_start(self) -> bool:
        return next(iter(self.neurons.values())).t0 == 0

    def _head_syn_hook(self):
        def hook(mod, inp, out):
            if self._count_head:  # once per batch (the final read-out), not once per step
                self._snn_mac_sum += _macs(mod, inp[0], out)
        return hook

    def _ann_syn_hook(self):
        def hook(mod, inp, out):
            self._ann_mac_sum += _macs(mod, inp[0], out)
        return hook

    # -- running ---------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, *inputs, lazy: bool = False):
        """ANN and SNN on the same batch: ``(ann_out, steps)``; ``steps``: the SNN's output after each
        step t = 1..T, every tensor leaf stacked ``[T, B, ...]``, or with ``lazy=True`` a
        :class:`~snn.convert.Simulation` (``len``, ``output(t)``, iteration: one step's output at a
        time, computed on demand; ``output()`` the final read-out)."""
        self._ann_in.clear()
        self._calls.clear()
        ann_out = self.ann(*inputs)
        for m in self.neurons.values():
            m.record = True
        try:
            sim = self.net.simulate(*inputs)
        finally:
            for m in self.neurons.values():
                m.record = False
        x = inputs[0]
        self._count_head = True
        try:
            sim.output()  # cached: the final read-out
        finally:
            self._count_head = False
        steps = sim if lazy else _stack_steps(sim)
        T = self.net.T
        names = list(self.neurons)
        per_layer = []  # [events, equal, sum |err|, sum err^2] per layer, one host transfer per run
        for name in names:
            m = self.neurons[name]
            err = m.count - act_levels(self._ann_in[name], m.act_alpha, T)
            a = err.abs_().flatten()
            self._n[name] += a.numel()
            per_layer.append(torch.stack([m.events.sum(), (a < 0.5).sum().to(a.dtype), a.sum(),
                                          torch.dot(a, a) * (m.act_alpha.detach() / T) ** 2]))
            m.count = m.events = None
        for name, (ev, eq, ab, sq) in zip(names, torch.stack(per_layer).double().tolist() if names else []):
            self._events[name] += ev
            self._equal[name] += eq
            self._abs_err[name] += ab
            self._sq_err[name] += sq
        self._samples += x.shape[0]
        self._ann_in.clear()
        return ann_out, steps

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- results ---------------------------------------------------------------------------------
    def _reduced(self):
        names = list(self.neurons)
        vec = [self._samples, self._sop_sum, self._snn_mac_sum, self._ann_mac_sum]
        for d in (self._n, self._events, self._equal, self._abs_err, self._sq_err):
            vec += [d[n] for n in names]
        t = torch.tensor(vec, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
            t = t.to(dev)
            dist.all_reduce(t)
            t = t.cpu()
        return t.tolist(), names

    def summary(self) -> dict:
        vals, names = self._reduced()
        samples, sops, snn_macs, ann_macs = vals[:4]
        L = len(names)
        n, ev, eq, ab, sq = (vals[4 + i * L: 4 + (i + 1) * L] for i in range(5))
        T = self.net.T
        settle = int(getattr(self.net, "settle", 0))
        steps = T + settle
        layers = []
        for i, name in enumerate(names):
            cnt = max(n[i], 1.0)
            layers.append({
                "name": name,
                "firing_rate": ev[i] / (cnt * steps),
                "agreement": eq[i] / cnt,
                "mean_abs_error": ab[i] / cnt,
                "mse": sq[i] / cnt,
                "threshold": float(self.neurons[name].act_alpha),
            })
        s = max(samples, 1.0)
        sops, snn_macs, ann_macs = sops / s, snn_macs / s, ann_macs / s
        snn_uj = (sops * E_AC_PJ + snn_macs * E_MAC_PJ) * 1e-6
        ann_uj = ann_macs * E_MAC_PJ * 1e-6
        return {
            "T": T,
            "settle": settle,
            "neuron": "signed" if self.net.signed else "unsigned",
            "samples": int(samples),
            "layers": layers,
            "sops": sops,
            "snn_macs": snn_macs,
            "ann_macs": ann_macs,
            "energy": {
                "e_mac_pJ": E_MAC_PJ, "e_ac_pJ": E_AC_PJ,
                "snn_uJ": snn_uj, "ann_uJ": ann_uj,
                "ann_over_snn": (ann_uj / snn_uj) if snn_uj > 0 else None,
            },
        }


@torch.no_grad()
def _stack_steps(sim):
    from .convert import _stack
    return _stack(list(sim))


def layer_errors(ann: nn.Module, net: SpikingNetwork, x: torch.Tensor) -> Dict[str, float]:
    """Per-layer MSE between the SNN rate output and the ANN activation, for one batch."""
    with Monitor(ann, net) as mon:
        mon.run(x)
        return {l["name"]: l["mse"] for l in mon.summary()["layers"]}


def describe(summary: dict, printer=print, top: Optional[int] = None):
    """Print a per-layer table of a :meth:`Monitor.summary`."""
    printer(f"{'layer':40s} {'rate':>7s} {'agree':>7s} {'|err|':>7s}")
    for l in summary["layers"][:top]:
        printer(f"{l['name']:40s} {l['firing_rate']:7.3f} {l['agreement']:7.3f} {l['mean_abs_error']:7.3f}")
    e = summary["energy"]
    printer(f"SOPs/sample {summary['sops']:.3e}  ANN MACs/sample {summary['ann_macs']:.3e}  "
            f"energy SNN {e['snn_uJ']:.2f} uJ vs ANN {e['ann_uJ']:.2f} uJ")
