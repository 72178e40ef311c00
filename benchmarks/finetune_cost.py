"""Cost of the layer-wise SNN fine-tuning (``snn.finetune``): seconds per layer-epoch.

ResNet-20 (2-bit, T = 3) on the demo's data: Fashion-MNIST from ``/usr/share/datasets/fashion-mnist``
(Debian's ``dataset-fashion-mnist``), padded to 32x32 and repeated to 3 channels, ``--images`` of
them (a few hundred are enough for a rate). The ANN is untrained (weights do not change the cost);
its BN statistics are estimated on the same images. Every tunable layer is tuned for one epoch
(``force=True``), first with the reference neuron loop, then with the default (fused) kernels, then
with the fused kernels and the prefix cache (``snn.finetune(cache=True)``: the frozen prefixes carried
from one layer to the next instead of recomputed; the batches are a fixed list here, so all three
tune on the same batches). ``snn.finetune`` reports each layer's ``seconds``; the breakdown times the
pieces: the ANN prefix (targets), the SNN prefix (input trains; with the cache these include the
one-batch dry run that sizes it), and the rest (the layer's spiking forward, its rate forward /
backward, the SGD step).

    python benchmarks/finetune_cost.py --json finetune_cost.json
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import gzip
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import QUIET, machine, wait_quiet, write_json  # noqa: E402

import snn  # noqa: E402
import importlib  # noqa: E402
ft = importlib.import_module("snn.finetune")  # the module (snn.finetune is also the function)
from classification.models import get_model  # noqa: E402
from snn import kernels  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530


def fashion_mnist(n: int, root: str = FMNIST) -> torch.Tensor:
    """The first ``n`` training images as a normalised float tensor [n, 3, 32, 32]."""
    path = os.path.join(root, "train-images-idx3-ubyte.gz")
    with gzip.open(path, "rb") as f:
        raw = f.read(16 + n * 28 * 28)
    x = torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(n, 1, 28, 28).float() / 255.0
    x = F.pad(x, (2, 2, 2, 2))
    return ((x - MEAN) / STD).expand(n, 3, 32, 32).contiguous()


@contextlib.contextmanager
def breakdown(acc, snn_graph):
    """Time the ANN prefix (targets: the hooked ANN, or run_until on its graph with the cache) and the
    SNN prefix (run_until on ``snn_graph``) inside snn.finetune."""
    orig_run, orig_ann = ft.run_until, ft._ann_activation

    def run_until(gm, *a, **k):
        t = time.perf_counter()
        try:
            return orig_run(gm, *a, **k)
        finally:
            acc["snn_prefix" if gm is snn_graph else "ann_prefix"] += time.perf_counter() - t

    def ann_activation(ann, name):
        fn = orig_ann(ann, name)

        def timed(x):
            t = time.perf_counter()
            try:
                return fn(x)
            finally:
                acc["ann_prefix"] += time.perf_counter() - t
        return timed
    ft.run_until, ft._ann_activation = run_until, ann_activation
    try:
        yield
    finally:
        ft.run_until, ft._ann_activation = orig_run, orig_ann


def run(ann, x, batch, T, variant, log):
    backend, _, cache = variant.partition("+")
    net = snn.convert(ann, T=T)
    if backend == "reference":
        kernels.set_backend(net, "reference")
    batches = [(xb, torch.zeros(len(xb), dtype=torch.long)) for xb in x.split(batch)]
    acc = collections.defaultdict(float)
    quiet = wait_quiet()  # no other process on the CPUs (up to 60 s)
    with breakdown(acc, net.net):
        t = time.perf_counter()
        hist = snn.finetune(ann, net, batches, epochs=1, force=True, progress=False, log=lambda s: None,
                           bn_mode=getattr(ann, "ft_bn_mode", "recalibrate"), cache=cache == "cache")
        total = time.perf_counter() - t
    secs = [h["seconds"] for h in hist]
    rec = {"backend": backend, "cache": cache == "cache", "quiet_start": quiet, "layers": len(hist),
           "total_s": total,
           "s_per_layer_epoch": statistics.mean(secs), "s_per_layer_epoch_median": statistics.median(secs),
           "per_layer": {h["layer"]: round(h["seconds"], 4) for h in hist},
           "loss_mean": [h["epochs"][0]["loss_mean"] for h in hist],
           "ann_prefix_s": acc["ann_prefix"], "snn_prefix_s": acc["snn_prefix"],
           "rest_s": total - acc["ann_prefix"] - acc["snn_prefix"]}
    log(f"  {variant:10s}: {len(hist)} layers, {rec['s_per_layer_epoch']:.3f} s per layer-epoch "
        f"({len(batches)} batches of {batch}); total {total:.1f} s = ANN prefix {acc['ann_prefix']:.1f} + "
        f"SNN prefix {acc['snn_prefix']:.1f} + rest {rec['rest_s']:.1f}")
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=384)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--bit", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", "--backends", dest="variants", default="reference,auto,auto+cache",
                    help="neuron backends to compare; '+cache': with the prefix cache")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = fashion_mnist(args.images)
    ann = get_model("resnet20", args.bit, dataset="cifar")
    with torch.no_grad():  # BN statistics from the data (cumulative average)
        for m in ann.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = None
        ann.train()
        for xb in x.split(args.batch):
            ann(xb)
    ann.eval()
    T = 2 ** args.bit - 1
    meta = machine()
    meta.update({"command": " ".join(sys.argv), "images": args.images, "batch": args.batch, "T": T})
    print(f"machine: {meta['cpu']}, {meta['logical_cpus']} logical CPUs, torch {meta['torch']} "
          f"({args.threads} threads), load average {meta['load_avg']}")
    print(f"resnet20 {args.bit}-bit (T={T}), Fashion-MNIST {args.images} images padded to 32x32x3:")
    records = [run(ann, x, args.batch, T, v, print) for v in args.variants.split(",")]
    same = [r for r in records if r["backend"] == "auto"]
    if len(same) == 2:  # the cache changes the cost, not the result
        diff = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(same[0]["loss_mean"], same[1]["loss_mean"]))
        print(f"per-layer mean losses with / without the prefix cache: max relative difference {diff:.1e}")
        meta["cache_loss_max_rel_diff"] = diff
    if args.json:
        meta["quiet"] = dict(QUIET)
        write_json(args.json, records, meta)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
