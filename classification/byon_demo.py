"""Bring your own network, end to end on a CPU: torchvision's MobileNetV2 on Fashion-MNIST.

    python -m classification.byon_demo                       # ~ a few minutes on 2 cores
    python -m classification.byon_demo --width 1.0 --train-subset 60000 --val-subset 10000 --epochs 10

1. ``torchvision.models.mobilenet_v2(num_classes=10, width_mult=--width)``, random weights, unchanged;
2. ``quant.quantize(model, --bit)``: every ReLU6 a ``QuantAct`` (alpha = 6), hidden weights at ``--bit``
   bits (APoT), first / last layers 8-bit; ``quant.calibrate`` on ``--calib-batches`` training batches;
3. ``--epochs`` epochs of SGD (momentum 0.9, cosine learning rate) on a fixed subset of the training
   images (``--train-subset``), evaluated on ``--val-subset`` test images;
4. ``snn.convert``: signed IF neurons, T = 2^bit - 1 (15 at 4 bits); the SNN's top-1 after every step,
   per-layer firing rates and agreement with the ANN (``snn.Monitor``).

Data: Fashion-MNIST (``classification.data``: Debian's ``dataset-fashion-mnist`` copied into
``<out>/data``, or torchvision's download when online), zero-padded to 32 x 32, grey replicated to 3
channels. Writes ``<out>/summary.json`` (the figures, the per-step accuracy, the per-layer statistics)
and ``<out>/model.pth`` (the quantized ANN's state dict). See docs/own-network.md.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional, Sequence

import torch

from common import run_cli
from common.cli import ArgumentParser
from common.logger import log


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="byon_out", help="output folder (default byon_out/)")
    p.add_argument("--data", default=None, help="data folder (default <out>/data)")
    p.add_argument("--width", type=float, default=0.5, help="MobileNetV2 width_mult (default 0.5)")
    p.add_argument("--bit", type=int, default=4, choices=(2, 3, 4, 5), help="activation and hidden-weight bits "
                   "(default 4: T = 15)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    p.add_argument("--train-subset", type=int, default=10000, help="training images used (default 10000)")
    p.add_argument("--val-subset", type=int, default=1000, help="test images used (default 1000)")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=0.05, help="initial learning rate, cosine decay (default 0.05)")
    p.add_argument("--wd", type=float, default=4e-5, help="weight decay (default 4e-5, MobileNetV2's)")
    p.add_argument("--calib-batches", type=int, default=4, help="batches for quant.calibrate (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the subsets and the data order")
    p.add_argument("-j", "--workers", type=int, default=0, help="loader processes (default 0)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: torch's; 1 is faster on cores shared with other jobs)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    import torchvision

    import quant
    import snn
    from classification import engine
    from classification.data import build_datasets, build_loaders
    from classification.metrics import TopK
    from common import UserError, dist, pipeline, runner
    from common.checkpoint import atomic_save
    from common.metrics import write_json

    args = get_parser().parse_args(argv)
    for flag, v in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                    ("--calib-batches", args.calib_batches)):
        if v < 1:
            raise UserError(f"{flag} {v} must be at least 1", f"pass {flag} N with N >= 1")
    if not args.width > 0:
        raise UserError(f"--width {args.width} must be > 0", "pass e.g. --width 0.5")
    for flag, v in (("--lr", args.lr), ("--wd", args.wd), ("-j/--workers", args.workers)):
        if v < 0:
            raise UserError(f"{flag} {v} must not be negative", f"pass {flag} 0 or more")
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads {args.threads} must be at least 1", "pass --threads N with N >= 1")
        torch.set_num_threads(args.threads)
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    spec = build_datasets("fashionmnist", args.data or os.path.join(args.out, "data"),
                          args.train_subset, args.val_subset)
    train, val = build_loaders(spec, dist.context(), args.batch_size, args.workers, test_batch_size=100,
                               seed=args.seed)
    float_model = torchvision.models.mobilenet_v2(num_classes=spec.num_classes, width_mult=args.width)
    ann = quant.quantize(float_model, args.bit)
    acts = sum(isinstance(m, quant.QuantAct) for m in ann.modules())
    log(f"mobilenet_v2 (width {args.width}) quantized at {args.bit} bits: {acts} QuantAct call sites, "
        f"{len(spec.train)} train / {len(spec.val)} test images")
    calib = [b for _, b in zip(range(args.calib_batches), train)]
    quant.calibrate(ann, calib)
    opt = torch.optim.SGD(ann.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / args.epochs)))
    t0 = time.time()
    train_epoch, evaluate = engine.epoch_steps(ann, ann, train, val, opt, sched, show_progress=args.progress)
    _, history = runner.epochs(args, dist.context(), args.out, start=0, best=None, history=[], key="test_top1",
                               best_name="best_acc1", train_epoch=train_epoch, evaluate=evaluate, state=None,
                               summary={})
    train_s = time.time() - t0
    ann.eval()
    atomic_save(ann.state_dict(), os.path.join(args.out, "model.pth"))
    net = snn.convert(ann)
    log(f"SNN: {len(net.neurons())} IF layers, T = {net.T}, signed")
    res = pipeline.evaluate_snn(ann, net, val, TopK.factory(), key="top1", progress=args.progress)
    summary = {
        "command": "python -m classification.byon_demo " + " ".join(sys.argv[1:] if argv is None else argv),
        "arch": "mobilenet_v2", "width_mult": args.width, "bit": args.bit, "T": res["T"], "epochs": args.epochs,
        "train_images": len(spec.train), "test_images": len(spec.val), "ann_top1": res["ann_top1"],
        "snn_top1": res["top1"], "per_step_top1": res["per_step_top1"], "history": history,
        "layers": res["layers"], "sops": res["sops"], "ann_macs": res["ann_macs"], "energy": res["energy"],
        "train_seconds": train_s, "snn_seconds": res["seconds"], "seconds": time.time() - t_start,
    }
    write_json(os.path.join(args.out, "summary.json"), summary)
    agree = min(layer["agreement"] for layer in res["layers"])
    log(f"mobilenet_v2 {args.bit}-bit on Fashion-MNIST: ANN top-1 {res['ann_top1']:.2f}, SNN (T = {res['T']}) "
        f"top-1 {res['top1']:.2f}; first layer agreement {res['layers'][0]['agreement']:.3f}, lowest {agree:.3f}; "
        f"{summary['seconds'] / 60:.1f} min -> {os.path.join(args.out, 'summary.json')}")
    return summary


if __name__ == "__main__":
    run_cli(main)
