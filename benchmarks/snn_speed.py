#!/usr/bin/env python3
"""SNN simulation speed on CPU: our optimised SNN vs the convolution floor, the quantized ANN and
SpikingJelly 2.0 running the same converted network.

For every (arch, T) -- the ANN is built with ``bit = log2(T + 1)`` activations, random weights and
BN statistics (dense simulation time does not depend on the values) -- all contenders run in one
process, interleaved round-robin, after warm-up, ``--repeats`` times; medians are reported:

* ``ann``: the quantized ANN's inference, optimised (``quant.fused.optimize_ann``: frozen weights,
  BN folded, fused quantizer / residual, channels-last); ``ann_eager``: the ANN module itself in eval
  mode under ``no_grad`` (its quantizer is the one-pass kernel, weights are re-quantized per call);
  ``ann_fresh``: ``ann`` without reused output buffers (each quantizer writes into its convolution's
  fresh output, the heap grows and shrinks every forward);
* ``ann_convs``: the ANN's convolutions / linears alone on the batch B (best layout);
* ``floor``: the SNN's convolutions / linears alone, each on the batch it sees in the simulation
  (T x B for every layer after the first neurons, B for the analog-input layer), replayed one after
  the other on preallocated inputs, best of NCHW / channels-last: the floor of exact dense simulation;
  ``floor_chain``: the same convolutions chained as in the network (our optimised SNN with every
  neuron a no-op, every BN an identity, no residual sums) -- what the convolutions cost inside a
  network, where outputs stay alive and inputs are not cache-hot (``ann_chain``: the same for the ANN);
* ``snn``: ours, ``snn.optimize(snn.convert(ann, T, signed))`` with the neurons' default backend
  (``auto``: the C++ custom operators on CPU) and its default reused output buffers
  (``--no-reuse-buffers``: every neuron writes a new train, as without buffer reuse);
* ``snn_compile``: the same network with ``backend="compile"`` (the reference loop compiled by
  ``torch.compile`` / inductor) -- the column a native kernel must beat by >= 10 % to be kept
  (``--no-compile-kernel`` skips it);
* ``naive`` (``--naive``): the unoptimised converted SNN with the reference PyTorch loop;
* ``sj``: SpikingJelly 2.0 (``spikingjelly.activation_based.neuron.IFNode``, multi-step, soft reset,
  V0 = theta/2 via its reset value) in place of our neurons in the *unoptimised* converted network
  (same frozen quantized weights, BN modules, thresholds, default NCHW layout; the analog input's
  current repeated T times into the first IF node). SpikingJelly has no signed IF neuron: the signed
  rows compare with its (unsigned) IF node. Its output is compared with our unsigned reference
  (``sj_max_abs_diff_vs_unsigned_reference``: 0 unless the first layer's step loop and our closed
  form round a near-tie differently).
  ``--sj-channels-last`` also times it with channels-last weights / input (``sj_cl``).

Ratios: ``ratio_floor`` = snn / floor, ``ratio_t_ann`` = snn / (T x ann), ``ratio_sj`` = snn / sj
(``speedup_sj`` = sj / snn), ``ratio_ann_convs`` = ann / ann_convs. ``peak_mb``: extra resident memory
at the peak of one forward (VmHWM after malloc_trim), per contender.

Dense models (detection / segmentation: ``yolov2_tiny``, ``yolov2_r34``, ``deeplabv1_vgg9``,
``deeplabv3_r34``) run at their evaluation size (416 / 513), batch 1 and 4 (``--batch``), ``--width``
scaling their channels (for a CPU); ``--size N`` gives each the largest valid size <= N. Every record
has ``peak_mb_total`` / ``floor_mb_total`` (the forward's peak plus what is allocated once: the SNN's
reused buffers, the floor's preallocated inputs) and ``ratio_peak_floor``, their quotient;
``floor_ws_mb``, the largest single conv's input plus output (the least any dense simulation needs),
and ``ratio_peak_ws`` = ``peak_mb_total`` / it.

    python benchmarks/snn_speed.py --quick --json out.json       # resnet20, T = 3, 7 (< 2 min)
    python benchmarks/snn_speed.py --json snn_speed.json         # the classification archs, T = 3, 7, 15
    benchmarks/snn_speed.py --arch yolov2_tiny,deeplabv1_vgg9 --T 3 --width 0.5 --batch 1 --no-sj --json speed.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))  # the repository root, when run as a script from anywhere
from _util import QUIET, check_args, fmt_table, interleaved, machine, peak_extra_mb, random_bn, write_json  # noqa: E402

import snn  # noqa: E402
from classification.models import get_model  # noqa: E402
from common.errors import UserError, run_cli  # noqa: E402
from quant.fused import frozen_weight_layer, is_weight_layer, optimize_ann, tune_malloc  # noqa: E402
from quant.utils import set_module  # noqa: E402
from snn import kernels  # noqa: E402
from snn.neuron import IFNeuron  # noqa: E402

ARCHS = {  # name -> (dataset, input size at evaluation)
    "resnet20": ("cifar", 32), "vgg11": ("cifar", 32), "alex": ("cifar", 32), "alexnet": ("imagenet", 224),
    "yolov2_tiny": ("voc-detection", 416), "yolov2_r34": ("voc-detection", 416),
    "deeplabv1_vgg9": ("voc-segmentation", 513), "deeplabv3_r34": ("voc-segmentation", 513),
}
DENSE = ("voc-detection", "voc-segmentation")
DEFAULT_BATCH = {"cifar": (64,), "voc-detection": (1, 4), "voc-segmentation": (1, 4)}  # imagenet: --imagenet-batch


def build_ann(arch: str, bit: int, width: float = 1.0) -> nn.Module:
    """The quantized ANN ``arch`` with ``bit``-bit activations (random weights; VOC class counts for the
    dense models, ``width`` scaling their channels)."""
    ds = ARCHS[arch][0]
    if ds == "voc-detection":
        from detection.models import get_model as det_model
        return det_model(arch, 20, bit=bit, width=width)
    if ds == "voc-segmentation":
        from segmentation.models import get_model as seg_model
        return seg_model(arch, 21, bit=bit, width=width)
    return get_model(arch, bit, dataset=ds)


def input_size(arch: str, size=None) -> int:
    """The input size of ``arch``: its own, or for a dense model given ``--size`` the largest valid size
    <= it (YOLO: a multiple of its stride 32; DeepLab: ``k * output stride + 1``)."""
    ds, default = ARCHS[arch]
    if size is None or ds not in DENSE:
        return default
    if ds == "voc-detection":
        from detection.models import STRIDE
        step, off = STRIDE, 0
    else:
        from segmentation.models import OUTPUT_STRIDE
        step, off = OUTPUT_STRIDE[arch], 1
    valid = (size - off) // step * step + off
    if valid < step + off:
        raise UserError(f"--size {size} is too small for {arch}", f"use at least {step + off}")
    return valid


class _WithTorchvision(dict):
    """The archs above, then any torchvision classification model (mobilenet_v2, resnet50, ...) at 224 px,
    built by ``get_model`` through ``quant.quantize`` (classification/models/torchvision_models.py)."""

    def _torchvision(self, arch) -> bool:
        from classification.models import list_archs
        from classification.models.torchvision_models import is_torchvision_arch
        return is_torchvision_arch(arch, list_archs())

    def __missing__(self, arch):
        if self._torchvision(arch):
            return ("imagenet", 224)
        raise KeyError(arch)

    def __contains__(self, arch):
        return dict.__contains__(self, arch) or self._torchvision(arch)


ARCHS = _WithTorchvision(ARCHS)


# ------------------------------------------------------------------------------------------ floors
class ConvReplay:
    """The conv / linear calls of a network, replayed alone on preallocated inputs in one layout."""

    def __init__(self, calls, layout: str):
        self.ops = []
        bufs = {}
        cl = layout == "channels_last"
        for mod, shape in calls:
            key = tuple(shape)
            if key not in bufs:
                x = torch.randn(shape, device=mod.weight.device)
                bufs[key] = x.contiguous(memory_format=torch.channels_last) if cl and x.dim() == 4 else x.contiguous()
            w = mod.weight.detach()
            w = w.contiguous(memory_format=torch.channels_last) if cl and w.dim() == 4 else w.contiguous()
            b = mod.bias.detach() if mod.bias is not None else None
            self.ops.append((mod, bufs[key], w, b))

    def input_bytes(self) -> int:
        """Bytes of the preallocated inputs (one per distinct shape)."""
        seen = {id(x): x for _, x, _, _ in self.ops}
        return sum(x.numel() * x.element_size() for x in seen.values())

    def __call__(self):
        for mod, x, w, b in self.ops:
            if isinstance(mod, nn.Linear):
                F.linear(x, w, b)
            else:
                F.conv2d(x, w, b, mod.stride, mod.padding, mod.dilation, mod.groups)


def _each_conv_call(model: nn.Module, x, fn):
    """One forward of ``model`` on ``x`` with ``fn(module, inputs, output)`` called at every conv / linear."""
    hooks = [m.register_forward_hook(fn) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()


def conv_calls(model: nn.Module, x) -> list:
    """(module, input shape) of every conv / linear call of one forward."""
    calls = []
    _each_conv_call(model, x, lambda m, i, o: calls.append((m, tuple(i[0].shape))))
    return calls


def working_set_mb(model: nn.Module, x) -> float:
    """MB of the largest conv / linear call's input plus output: the least memory any dense simulation of
    these layers needs (the floor, run with two buffers)."""
    sizes = []
    _each_conv_call(model, x, lambda m, i, o: sizes.append(i[0].numel() * i[0].element_size()
                                                           + o.numel() * o.element_size()))
    return max(sizes, default=0) / 2 ** 20


def best_replay(calls):
    """The faster layout's replay (2 timed calls each after one warm-up)."""
    best = None
    for layout in ("channels_last", "nchw"):
        r = ConvReplay(calls, layout)
        r()
        t = time.perf_counter()
        r()
        r()
        dt = time.perf_counter() - t
        if best is None or dt < best[0]:
            best = (dt, layout, r)
    return best[2], best[1]


class _PassNeuron(nn.Module):
    """A neuron that does nothing: returns its current (a constant-input one: a preallocated train)."""

    def __init__(self, T: int, constant: bool, channels_last: bool = True):
        super().__init__()
        self.T, self.constant, self.channels_last, self.buf = T, constant, channels_last, None

    def forward(self, current, residual=None):
        if not self.constant:
            return current
        shape = (self.T * current.shape[0],) + tuple(current.shape[1:])
        if self.buf is None or tuple(self.buf.shape) != shape:
            b = torch.randn(shape, device=current.device)
            self.buf = b.contiguous(memory_format=torch.channels_last) if b.dim() == 4 and self.channels_last else b
        return self.buf


class _PlainConv(nn.Conv2d):
    def forward(self, x, residual=None):
        return super().forward(x)


def conv_chain(net: nn.Module, T: int = 1) -> nn.Module:
    """``net`` with every neuron / quantizer a no-op, every BN an identity and the fused residual sums
    dropped: its convolutions / linears chained as in the network (outputs live as long as there)."""
    from quant.fused import Conv2dAdd, FusedQuantAct
    chain = copy.deepcopy(net)
    root = chain.net if isinstance(chain, snn.SpikingNetwork) else chain
    cl = getattr(net, "layout", "channels_last") == "channels_last"
    for name, m in list(root.named_modules()):
        if isinstance(m, IFNeuron):
            set_module(root, name, _PassNeuron(T, m.constant_input, cl))
        elif isinstance(m, FusedQuantAct):
            set_module(root, name, _PassNeuron(1, False))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            set_module(root, name, nn.Identity())
        elif isinstance(m, Conv2dAdd):
            m.__class__ = _PlainConv
    return chain.eval()


# ------------------------------------------------------------------------------------------ SpikingJelly
def sj_network(net_unsigned: snn.SpikingNetwork):
    """The converted (unoptimised, unsigned) network with SpikingJelly IF nodes in place of ours."""
    from spikingjelly.activation_based import neuron as sjn

    class SJNeuron(nn.Module):
        def __init__(self, src: IFNeuron, T: int):
            super().__init__()
            theta = float(src.act_alpha)
            self.theta, self.T, self.constant = theta, T, src.constant_input
            self.node = sjn.IFNode(v_threshold=theta, v_reset=None, step_mode="m")  # soft reset
            self.node.set_reset_value("v", theta / 2)  # V0 = theta / 2 after every reset()
            self.node.reset()

        def forward(self, x):
            if self.constant:  # analog input: the same current at every step
                seq = x.unsqueeze(0).expand(self.T, *x.shape)
            else:
                seq = x.view(self.T, x.shape[0] // self.T, *x.shape[1:])
            self.node.reset()
            s = self.node(seq)
            return (s * self.theta).flatten(0, 1)

    sj = copy.deepcopy(net_unsigned)
    gm = sj.net
    for name, m in list(gm.named_modules()):
        if isinstance(m, IFNeuron):
            set_module(gm, name, SJNeuron(m, sj.T))
        elif is_weight_layer(m):
            set_module(gm, name, frozen_weight_layer(m, None, channels_last=False))  # same weights, computed once
    return sj.eval()


def _pool_mb(net) -> float:
    """MB held by the network's reused output buffers, the neurons' and the convolutions' (allocated
    once; not in ``peak_mb``, which counts what one forward adds)."""
    from quant.fused import PooledConv2d
    pools = {id(m.pool): m.pool.nbytes() for m in net.neurons().values() if m.pool is not None}
    pools.update({id(m.out_pool): m.out_pool.nbytes for m in net.modules()
                  if isinstance(m, PooledConv2d) and m.out_pool is not None})
    return round(sum(pools.values()) / 2**20, 1)


# ------------------------------------------------------------------------------------------ checks
def spike_agreement(ref: snn.SpikingNetwork, opt: snn.SpikingNetwork, x) -> float:
    got = {}
    hooks = []
    for tag, net in (("r", ref), ("o", opt)):
        for k, m in net.neurons().items():
            hooks.append(m.register_forward_hook(
                lambda m, i, o, k=k, tag=tag: got.__setitem__((tag, k), o.detach().clone())))
    try:
        with torch.no_grad():
            ref(x)
            opt(x)
    finally:
        for h in hooks:
            h.remove()
    same = total = 0
    for k in ref.neurons():
        same += int((got[("r", k)] == got[("o", k)]).sum())
        total += got[("r", k)].numel()
    return same / max(total, 1)


# ------------------------------------------------------------------------------------------ profile
@contextlib.contextmanager
def labelled_neurons():
    """Label every neuron call in the profiler (class-level wrapper, no hooks: in-place stays on)."""
    orig = IFNeuron.forward

    def fwd(self, *a, **k):
        with torch.profiler.record_function("fused_if_neuron"):
            return orig(self, *a, **k)
    IFNeuron.forward = fwd
    try:
        yield
    finally:
        IFNeuron.forward = orig


def profile_breakdown(fn, label: str, runs: int = 3) -> dict:
    """Self-CPU time per op category (ms per forward): convolutions, IF kernels, everything else."""
    with labelled_neurons(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            fn()
    cats = {}
    for e in prof.key_averages():
        name = e.key
        ms = e.self_cpu_time_total / 1e3 / runs
        if "convolution" in name or name in ("aten::addmm", "aten::mm", "aten::linear"):
            cat = "conv/linear"
        elif name.startswith("fastsnn::") or "fastsnn" in name or "cpp_fused" in name:
            cat = "IF kernels (incl. constant-input)"
        elif name == "fused_if_neuron":  # the neuron's Python wrapper, self time (dispatch, checks)
            cat = "IF neuron wrapper (Python)"
        elif name.startswith("aten::empty") or name in ("aten::resize_",):
            cat = "allocation"
        else:
            cat = "other ops"
        cats[cat] = cats.get(cat, 0.0) + ms
    total = sum(cats.values())
    print(f"\n  profile of {label} (self CPU ms per forward, {runs} runs):")
    for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"    {k:36s} {v:8.2f}  ({100 * v / max(total, 1e-9):4.1f} %)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return {k: round(v, 3) for k, v in cats.items()}


# ------------------------------------------------------------------------------------------ main loop
def batches_of(arch, args) -> list:
    ds = ARCHS[arch][0]
    if args.batch:
        return args.batch
    return [args.imagenet_batch] if ds == "imagenet" else list(DEFAULT_BATCH[ds])


def bench_arch(arch, Ts, neurons, args, records, log):
    for B in batches_of(arch, args):
        bench_arch_batch(arch, B, Ts, neurons, args, records, log)


def bench_arch_batch(arch, B, Ts, neurons, args, records, log):
    ds = ARCHS[arch][0]
    size = input_size(arch, args.size)
    width = args.width if ds in DENSE else 1.0
    torch.manual_seed(0)
    dev = torch.device(args.device)
    x = torch.randn(B, 3, size, size, device=dev)
    for T in Ts:
        bit = int(round(math.log2(T + 1)))
        ann = random_bn(build_ann(arch, bit, width), seed=bit).to(dev)
        for p in ann.parameters():
            p.requires_grad_(False)
        log(f"\n== {arch} ({ds}, batch {B}, {size} px, width {width:g}), T={T} (bit {bit})")
        t0 = time.time()
        pop = args.conv_add_postop
        reuse = not args.no_reuse_buffers
        ann_opt = optimize_ann(ann, example=x, conv_add_postop=pop, reuse_buffers=reuse)  # layout: the faster here
        ann_fresh = optimize_ann(ann, channels_last=ann_opt.layout == "channels_last", conv_add_postop=pop,
                                 reuse_buffers=False) if reuse else None
        nets = {s: snn.convert(ann, T=T, signed=(s == "signed")) for s in neurons}
        first = snn.optimize(nets[neurons[0]], example=x, conv_add_postop=pop, reuse_buffers=reuse)
        ours = {s: first if s == neurons[0] else snn.optimize(nets[s], channels_last=first.layout == "channels_last",
                                                              conv_add_postop=pop, reuse_buffers=reuse)
                for s in neurons}
        ann_replay, ann_layout = best_replay(conv_calls(ann_opt, x))
        floor_replay, floor_layout = best_replay(conv_calls(first, x))
        floor_inputs_mb = floor_replay.input_bytes() / 2 ** 20
        floor_ws_mb = working_set_mb(first, x)
        ann_chain = conv_chain(ann_opt)
        floor_chain = conv_chain(first, T)
        fns = {
            "ann": lambda: ann_opt(x),
            "ann_eager": lambda: ann(x),
            **({"ann_fresh": lambda: ann_fresh(x)} if ann_fresh is not None else {}),
            "ann_convs": ann_replay,
            "ann_chain": lambda: ann_chain(x),
            "floor": floor_replay,
            "floor_chain": lambda: floor_chain(x),
        }
        for s in neurons:
            fns["snn_" + s] = (lambda net: (lambda: net(x)))(ours[s])
            if not args.no_compile_kernel:  # the same optimised network, neurons through torch.compile
                fns["snn_compile_" + s] = (lambda net: (lambda: net(x)))(snn.optimize(
                    nets[s], channels_last=first.layout == "channels_last", backend="compile", conv_add_postop=pop,
                    reuse_buffers=reuse))
        sj = sj_cl = None
        if not args.no_sj:
            try:
                ref_u = nets.get("unsigned") or snn.convert(ann, T=T, signed=False)
                sj = sj_network(ref_u).to(dev)
                fns["sj"] = lambda: sj(x)
                if args.sj_channels_last:  # the same with channels-last weights and input (not SJ's default)
                    sj_cl = copy.deepcopy(sj).to(memory_format=torch.channels_last)
                    x_cl = x.contiguous(memory_format=torch.channels_last)
                    fns["sj_cl"] = lambda: sj_cl(x_cl)
            except ImportError as e:
                log(f"  SpikingJelly not available ({e}); pip install -r requirements-bench.txt")
        if args.naive:
            for s in neurons:
                ref = kernels.set_backend(snn.convert(ann, T=T, signed=(s == "signed")), "reference")
                fns["naive_" + s] = (lambda net: (lambda: net(x)))(ref)
        # correctness of what is timed (small batch; one image of a dense model)
        xs = x[:1] if ds in DENSE else x[:4]
        checks = {}
        with torch.no_grad():
            for s in neurons:
                ref = kernels.set_backend(snn.convert(ann, T=T, signed=(s == "signed")), "reference")
                checks[s] = {"spike_agreement": spike_agreement(ref, ours[s], xs),
                             "max_abs_diff": float((ref(xs) - ours[s](xs)).abs().max())}
            if sj is not None:  # SpikingJelly vs our unsigned reference: equal but for the first layer, whose
                # closed form (ours, bit-exact with the ANN) and step loop (SJ) can round differently at ties
                ref = kernels.set_backend(snn.convert(ann, T=T, signed=False), "reference")
                a, b = sj(xs), ref(xs)
                checks["sj_max_abs_diff"] = float((a - b).abs().max())
        log(f"  set-up {time.time() - t0:.1f} s; layouts: SNN {first.layout}, floor {floor_layout}, "
            f"ANN {ann_opt.layout}, ANN convs {ann_layout}; checks {checks}")
        if dev.type == "cuda":  # time until the GPU is done
            fns = {k: (lambda f: (lambda: (f(), torch.cuda.synchronize())))(f) for k, f in fns.items()}
        with torch.no_grad():
            res = interleaved(fns, repeats=args.repeats, warmup=args.warmup, log=log if args.verbose else None,
                              quiet=not args.no_wait,
                              clock=time.process_time if args.clock == "cpu" else time.perf_counter)
            mem = {k: peak_extra_mb(f) for k, f in fns.items()} if not args.no_memory and dev.type == "cpu" else {}
            prof = None
            if args.profile and T in args.profile_T:
                prof = profile_breakdown(fns["snn_" + neurons[0]], f"{arch} T={T} {neurons[0]} (ours)")
                profile_breakdown(fns["floor"], f"{arch} T={T} floor")
        med = {k: v[args.stat] for k, v in res.items()}  # the table's statistic (median; min on a busy machine)
        for s in neurons:
            snn_ms = med["snn_" + s]
            peak, bufs = mem.get("snn_" + s), _pool_mb(ours[s])
            peak_total = peak + bufs if peak is not None else None
            floor_total = mem["floor"] + floor_inputs_mb if mem.get("floor") is not None else None
            rec = {
                "arch": arch, "dataset": ds, "batch": B, "T": T, "neuron": s, "size": size, "width": width,
                "ann_ms": med["ann"], "ann_eager_ms": med["ann_eager"], "ann_convs_ms": med["ann_convs"],
                "snn_ms": snn_ms, "sj_ms": med.get("sj"), "floor_ms": med["floor"],
                "naive_ms": med.get("naive_" + s),
                "snn_compile_ms": med.get("snn_compile_" + s),
                "ratio_floor_compile": med["snn_compile_" + s] / med["floor"] if "snn_compile_" + s in med else None,
                "ratio_floor": snn_ms / med["floor"],
                "ratio_t_ann": snn_ms / (T * med["ann"]),
                "ratio_t_ann_eager": snn_ms / (T * med["ann_eager"]),
                "ratio_sj": snn_ms / med["sj"] if "sj" in med else None,
                "speedup_sj": med["sj"] / snn_ms if "sj" in med else None,
                "sj_cl_ms": med.get("sj_cl"),
                "speedup_sj_cl": med["sj_cl"] / snn_ms if "sj_cl" in med else None,
                "ratio_ann_convs": med["ann"] / med["ann_convs"],
                "ann_chain_ms": med["ann_chain"], "floor_chain_ms": med["floor_chain"],
                "ratio_floor_chain": snn_ms / med["floor_chain"],
                "ratio_ann_chain": med["ann"] / med["ann_chain"],
                "ratio_ann_eager_convs": med["ann_eager"] / med["ann_convs"],
                "ann_fresh_ms": med.get("ann_fresh"),
                "ratio_ann_fresh_convs": med["ann_fresh"] / med["ann_convs"] if "ann_fresh" in med else None,
                "peak_mb": mem.get("snn_" + s), "peak_mb_sj": mem.get("sj"), "peak_mb_floor": mem.get("floor"),
                "buffers_mb": bufs, "reuse_buffers": reuse,
                "peak_mb_total": peak_total, "floor_inputs_mb": round(floor_inputs_mb, 1), "floor_mb_total": floor_total,
                "ratio_peak_floor": peak_total / floor_total if peak_total is not None and floor_total else None,
                "floor_ws_mb": floor_ws_mb,
                "ratio_peak_ws": peak_total / floor_ws_mb if peak_total is not None and floor_ws_mb else None,
                "peak_mb_ann": mem.get("ann"),
                "floor_layout": floor_layout, "snn_layout": first.layout, "ann_layout": ann_opt.layout,
                "sj_neuron": "IFNode (unsigned; SpikingJelly has no signed IF)" if s == "signed" else "IFNode",
                "kernel": kernels.resolve("auto", x), "conv_add_postop": bool(pop),
                "ratio_compile_native": (med["snn_compile_" + s] / snn_ms) if "snn_compile_" + s in med else None,
                "spike_agreement": checks[s]["spike_agreement"], "max_abs_diff_vs_reference": checks[s]["max_abs_diff"],
                "sj_max_abs_diff_vs_unsigned_reference": checks.get("sj_max_abs_diff"),
                "times_ms": {k: v["all"] for k, v in res.items() if k in ("snn_" + s, "sj", "floor", "ann")},
            }
            if prof is not None and s == neurons[0]:
                rec["profile_ms"] = prof
            records.append(rec)
        fns = ours = nets = sj = sj_cl = ann_chain = floor_chain = ann_fresh = None  # free before the next T


COLS = [("arch", "arch", None), ("B", "batch", None), ("px", "size", None), ("T", "T", None),
        ("neuron", "neuron", None), ("ANN ms", "ann_ms", "{:.1f}"),
        ("ANN eager", "ann_eager_ms", "{:.1f}"), ("ANN convs", "ann_convs_ms", "{:.1f}"),
        ("ANN fresh/convs", "ratio_ann_fresh_convs", "{:.2f}"),
        ("floor ms", "floor_ms", "{:.1f}"), ("SNN ms", "snn_ms", "{:.1f}"), ("SJ ms", "sj_ms", "{:.1f}"),
        ("SNN compile", "snn_compile_ms", "{:.1f}"), ("compile/native", "ratio_compile_native", "{:.2f}"),
        ("SNN/floor", "ratio_floor", "{:.2f}"), ("compile/floor", "ratio_floor_compile", "{:.2f}"), ("SNN/(T·ANN)", "ratio_t_ann", "{:.2f}"),
        ("SNN/SJ", "ratio_sj", "{:.2f}"), ("SJ/SNN", "speedup_sj", "{:.2f}"), ("SJ-cl/SNN", "speedup_sj_cl", "{:.2f}"),
        ("ANN/convs", "ratio_ann_convs", "{:.2f}"), ("chain floor", "floor_chain_ms", "{:.1f}"),
        ("SNN/chain", "ratio_floor_chain", "{:.2f}"), ("ANN/chain", "ratio_ann_chain", "{:.2f}"),
        ("peak MB", "peak_mb", "{:.0f}"), ("buffers MB", "buffers_mb", "{:.0f}"),
        ("SJ MB", "peak_mb_sj", "{:.0f}"), ("floor MB", "peak_mb_floor", "{:.0f}"),
        ("SNN MB all", "peak_mb_total", "{:.0f}"), ("floor MB all", "floor_mb_total", "{:.0f}"),
        ("mem/floor", "ratio_peak_floor", "{:.2f}"), ("floor WS MB", "floor_ws_mb", "{:.0f}"),
        ("mem/WS", "ratio_peak_ws", "{:.2f}")]


def targets(records) -> list:
    out = []
    for r in records:
        if r["arch"] in ("yolov2_tiny", "deeplabv1_vgg9") and r["neuron"] == "signed" and r["T"] in (3, 15):
            tag = f"{r['arch']} B={r['batch']} T={r['T']} signed"
            out.append((f"{tag}: SNN/floor {r['ratio_floor']:.2f} (target <= 1.15)", r["ratio_floor"] <= 1.15))
        if ARCHS[r["arch"]][0] in DENSE and r["neuron"] == "signed" and r["T"] == 15 and r.get("ratio_peak_floor"):
            out.append((f"{r['arch']} B={r['batch']} T=15: memory / floor {r['ratio_peak_floor']:.2f}, / the floor's "
                        f"working set {r['ratio_peak_ws']:.2f} (target <= 1.3)", r["ratio_peak_floor"] <= 1.3))
        if ARCHS[r["arch"]][0] in DENSE and r["neuron"] == "signed":
            out.append((f"{r['arch']} B={r['batch']} T={r['T']}: ANN/convs {r['ratio_ann_convs']:.2f} (target <= 1.15)",
                        r["ratio_ann_convs"] <= 1.15))
        if r["arch"] == "resnet20" and r["neuron"] == "signed" and r["T"] in (3, 7):
            out.append((f"resnet20 T={r['T']} signed: SNN/floor {r['ratio_floor']:.2f} (target <= 1.15)",
                        r["ratio_floor"] <= 1.15))
            if r.get("speedup_sj") is not None:
                out.append((f"resnet20 T={r['T']} signed: SJ/SNN {r['speedup_sj']:.2f}x (target >= 1.8)",
                            r["speedup_sj"] >= 1.8))
            out.append((f"resnet20 T={r['T']}: ANN/convs {r['ratio_ann_convs']:.2f} (target <= 1.15)",
                        r["ratio_ann_convs"] <= 1.15))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20,vgg11,alex,alexnet", help="comma list of " + ", ".join(ARCHS))
    ap.add_argument("--T", default="3,7,15", help="comma list of time steps (2**bit - 1)")
    ap.add_argument("--neurons", default="signed,unsigned", help="comma list of signed, unsigned (default both)")
    ap.add_argument("--batch", default=None,
                    help="comma list of batch sizes, for every arch (default: 64 CIFAR, --imagenet-batch ImageNet, "
                         "1,4 for the dense models)")
    ap.add_argument("--imagenet-batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=None,
                    help="input size of the dense models, each rounded down to a size it takes (YOLO: a multiple "
                         "of 32, DeepLab: k * output stride + 1; default: 416 YOLO, 513 DeepLab)")
    ap.add_argument("--width", type=float, default=1.0, help="channel width multiplier of the dense models")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (benchmarks/gpu_check.sh)")
    ap.add_argument("--stat", choices=("median", "min"), default="median",
                    help="statistic of the timed rounds in the table (min: on a machine shared with other jobs)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: time by this process's CPU time (for a machine shared with other jobs; use with "
                         "--threads 1 --no-wait)")
    ap.add_argument("--quick", action="store_true", help="resnet20 at T = 3 and 7 only")
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--no-sj", action="store_true", help="skip SpikingJelly")
    ap.add_argument("--sj-channels-last", action="store_true",
                    help="also time SpikingJelly with channels-last weights / input (not its default layout)")
    ap.add_argument("--naive", action="store_true", help="also time the unoptimised SNN with the reference loop")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-compile-kernel", action="store_true",
                    help="do not time our optimised network with the torch.compile neuron backend")
    ap.add_argument("--conv-add-postop", action="store_true",
                    help="residual sums as oneDNN convolution post-ops (private torch.ops.mkldnn op; opt-in)")
    ap.add_argument("--no-reuse-buffers", action="store_true",
                    help="ablation: the optimised SNN and ANN without reused output buffers (every neuron / "
                         "quantizer writes a new tensor; the heap grows and shrinks every forward)")
    ap.add_argument("--profile", action="store_true", help="print the op breakdown of ours and of the floor")
    ap.add_argument("--profile-T", default="3,7")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--malloc-tune", action="store_true",
                    help="opt-in: keep freed tensors in the heap (glibc mallopt, process-wide); by default glibc "
                         "returns them to the OS and they are page-faulted in again")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for an idle machine before each round")
    args = ap.parse_args(argv)
    if args.quick:
        args.arch, args.T = "resnet20", "3,7"
    args.profile_T = [int(t) for t in args.profile_T.split(",")]
    check_args(args)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    malloc_tuned = tune_malloc() if args.malloc_tune else False
    archs = [a for a in args.arch.split(",") if a]
    for a in archs:
        if a not in ARCHS:
            raise UserError(f"unknown arch {a!r}", f"choose from {', '.join(ARCHS)}, or a torchvision model name")
    Ts = _int_list(args.T, "--T")
    for T in Ts:
        if T < 1 or 2 ** int(round(math.log2(T + 1))) - 1 != T:
            raise UserError(f"--T {T} is not 2**bit - 1", "use 1, 3, 7, 15, ...")
    args.batch = _int_list(args.batch, "--batch") if args.batch else None
    if args.batch and min(args.batch) < 1:
        raise UserError(f"--batch {args.batch} must be positive")
    if not args.width > 0:
        raise UserError(f"--width {args.width} must be positive")
    if args.size is not None and args.size < 1:
        raise UserError(f"--size {args.size} must be positive")
    for a in archs:
        input_size(a, args.size)  # a --size too small for a model: the error before any work
    neurons = [n for n in args.neurons.split(",") if n]
    bad = [n for n in neurons if n not in ("signed", "unsigned")]
    if bad or not neurons:
        raise UserError(f"--neurons {args.neurons!r}: {', '.join(bad) or 'none given'}", "a comma list of signed, unsigned")
    meta = machine()
    meta.update({"command": " ".join(sys.argv), "batch": args.batch, "imagenet_batch": args.imagenet_batch,
                 "size": args.size, "width": args.width,
                 "repeats": args.repeats, "stat": args.stat, "kernel": kernels.default_backend(),
                 "cpp_kernel": kernels.cpp_available(), "malloc_tuned": malloc_tuned,
                 "reuse_buffers": not args.no_reuse_buffers, "clock": args.clock, "threads": args.threads})
    print(f"machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs, torch {meta['torch']} "
          f"({args.threads} threads), load average {meta['load_avg']}")
    if meta["load_avg"] and meta["load_avg"][0] > 0.5 * (os.cpu_count() or 1):
        print("WARNING: the machine is busy (load average above); timings will be noisy")
    records = []
    t_start = time.time()
    for arch in archs:
        bench_arch(arch, Ts, neurons, args, records, print)
        if args.json:
            write_json(args.json, records, meta)
    meta["seconds"] = time.time() - t_start
    meta["waited_for_idle_s"], meta["rounds_on_busy_machine"] = QUIET["waited_s"], QUIET["busy_rounds"]
    try:
        meta["load_avg_end"] = os.getloadavg()
    except OSError:
        pass
    print()
    print(fmt_table(records, COLS))
    tg = targets(records)
    if tg:
        print("\ntargets:")
        for text, ok in tg:
            print(f"  [{'met' if ok else 'MISSED'}] {text}")
    meta["targets"] = [{"target": t, "met": ok} for t, ok in tg]
    if args.json:
        write_json(args.json, records, meta)
        print(f"\nwrote {args.json} ({len(records)} records, {meta['seconds']:.0f} s)")


def _int_list(text: str, flag: str) -> list:
    try:
        return [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma list of integers", f"e.g. {flag} 3,7") from None


if __name__ == "__main__":
    run_cli(main)
