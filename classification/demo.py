"""The README's demo: the whole Fast-SNN pipeline, offline, on Fashion-MNIST, in minutes on a CPU.

1. a progressive 32 -> 4 -> 3 -> 2-bit ResNet-20 chain (main.py; the original's lr / wd recipe, on a
   fixed subset of the training images and a few epochs so it fits the time budget);
2. SNN evaluation (snn.py) of the 3-bit (T = 7) and 2-bit (T = 3) ANNs, signed and unsigned IF neurons;
   then the 2-bit signed SNN with ``--settle K`` extra steps (default 9: input and biases off, each
   neuron's count moves to the quantized ANN's level);
3. fine-tuning (snn_ft.py -n 1 --method fastsnn+e2e by default: the layer-wise algorithm, each layer kept
   only if the train-batch top-1 improves, then a short end-to-end pass) of the 2-bit signed SNN;
4. a table ``bits | T | ANN top-1 | SNN signed | SNN unsigned | fine-tuned | settle (K = 9)``,
   ``summary.json`` and figures in ``--out`` (default ``demo_out/``).

Every step calls the CIFAR scripts' ``main(argv)`` -- the same code as the command line -- and prints
the equivalent command, and after it the time it took, the time so far and an estimate of the time
left (from the steps' shares of a reference run on an idle 2-core machine, ~7 min in all, scaled
by how fast this machine has been so far). Data: ``<out>/data`` (Fashion-MNIST copied there from
Debian's ``dataset-fashion-mnist``, or downloaded by torchvision when online).

One run is one seed (``--seed``, default 0). Its numbers repeat on the same machine with the same
thread count; another CPU or thread count gives other float rounding, and a few epochs of training
amplify that -- ``python -m classification.demo_seeds`` reports the mean and spread over seeds.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import time
from typing import Dict, List, Optional

from common import run_cli
from common.cli import ArgumentParser
from common.metrics import write_json

# (bit, lr, weight decay) of the progressive chain, as in the original README
CHAIN = ((32, 0.1, 5e-4), (4, 4e-2, 1e-4), (3, 4e-2, 1e-4), (2, 4e-2, 3e-5))
SNN_BITS = (3, 2)
FT_BIT = 2
# seconds of each step on an idle 2-core machine (the default budget): the shares the time-left
# estimate uses. Training: per epoch; SNN evaluation: per (bit, neuron); settle: the 2-bit signed SNN with
# K = 9 settle steps (12 steps); fine-tuning: the layer-wise stage over 63 batches ("ft") plus each
# end-to-end epoch of 63 batches ("e2e_epoch").
REF_SECONDS = {"epoch_fp": 20.0, "epoch_q": 24.0, "snn": {3: 9.0, 2: 4.0}, "settle": 14.0, "ft": 115.0, "ft_local": 55.0,
               "e2e_epoch": 45.0}
FT_METHOD = "fastsnn+e2e"


def get_parser() -> ArgumentParser:
    p = ArgumentParser(description="Fast-SNN demo on Fashion-MNIST (CPU, offline)")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    p.add_argument("--data", default=None, help="data folder (default <out>/data)")
    p.add_argument("--dataset", default="fashionmnist", choices=("fashionmnist", "cifar10", "folder"))
    p.add_argument("-a", "--arch", default="resnet20")
    p.add_argument("--train-subset", type=int, default=8000, help="training images used (default 8000)")
    p.add_argument("--val-subset", type=int, default=1000, help="test images used (default 1000)")
    p.add_argument("--epochs-fp", type=int, default=4, help="epochs of the 32-bit stage (default 4)")
    p.add_argument("--epochs-q", type=int, default=2, help="epochs of each 4/3/2-bit stage (default 2)")
    p.add_argument("--ft-batches", type=int, default=63,
                   help="fine-tuning batches per layer (default 63: one epoch of the 8000 images)")
    p.add_argument("--score-batches", type=int, default=8,
                   help="an end-to-end epoch (and, with --ft-accept score, a tuned layer) is kept only if the SNN's "
                        "top-1 on this many training batches improves (default 8)")
    p.add_argument("--ft-cache-mb", type=int, default=6144,
                   help="memory for the fine-tuner's prefix cache (default 6144; one epoch needs ~3.6 GB)")
    p.add_argument("--alpha-init", type=float, default=3.0,
                   help="initial activation clip of the quantized stages (default 3: with a few epochs the "
                        "learned clip barely moves from its start, and the models' 6 leaves most levels unused)")
    p.add_argument("--ft-layers", default="", help="fine-tune only these layers (globs; default all)")
    p.add_argument("--ft-method", default=FT_METHOD, metavar="STAGES",
                   help=f"snn_ft.py --method: fine-tuning stages joined by '+' (fastsnn, bias, bnstats, e2e; "
                        f"default {FT_METHOD}; fastsnn alone is the original algorithm)")
    p.add_argument("--ft-accept", choices=("auto", "score", "local"), default="auto",
                   help="snn_ft.py --ft-accept: how a layer-wise step is judged (auto, the default: the layer's own "
                        "error for every method but fastsnn, which keeps the original's whole-SNN score)")
    p.add_argument("--e2e-epochs", type=int, default=3,
                   help="epochs of the end-to-end fine-tuning stage (snn_ft.py --e2e-epochs; default 3)")
    p.add_argument("--e2e-batches", type=int, default=None,
                   help="batches of the end-to-end fine-tuning stage (snn_ft.py --e2e-batches; default: "
                        "--ft-batches, one pass over the layer-wise stage's batches)")
    p.add_argument("--e2e-loss", default="ce", choices=("ce", "kl", "mse"),
                   help="loss of the end-to-end stage (snn_ft.py --e2e-loss; default ce: cross-entropy with the labels)")
    p.add_argument("--settle", type=int, default=9, metavar="K",
                   help="also evaluate the 2-bit signed SNN with K settle steps (snn.py --settle K; default 9, "
                        "0: skip that step)")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("-j", "--workers", type=int, default=0, help="loader processes (default 0: in-process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (tests)")
    p.add_argument("--keep", action="store_true", help="keep earlier results in <out>/result (default: start fresh)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm bars (display only: the numbers are the same without)")
    p.add_argument("--tune-malloc", action="store_true",
                   help="pass --tune-malloc to the SNN steps (glibc heap tuning, process-wide; a little faster)")
    return p


def _minutes(sec: float) -> str:
    return f"{sec / 60:.1f} min" if sec >= 60 else f"{sec:.0f} s"


class Clock:
    """Elapsed time and an estimate of the time left: the steps' reference shares (``weights``),
    scaled by how much slower or faster than the reference the finished steps ran."""

    def __init__(self, weights: List[float]):
        self.weights, self.done, self.t0 = list(weights), 0, time.time()

    def elapsed(self) -> float:
        return time.time() - self.t0

    def remaining(self) -> float:
        done_w, left_w = sum(self.weights[:self.done]), sum(self.weights[self.done:])
        if self.done == 0 or done_w <= 0:
            return left_w
        return left_w * self.elapsed() / done_w

    def step_done(self) -> str:
        self.done += 1
        left = self.remaining()
        return (f"elapsed {_minutes(self.elapsed())}, step {self.done}/{len(self.weights)}"
                + (f", about {_minutes(left)} left" if self.done < len(self.weights) else ", done"))


def _step(title: str, script: str, argv: List[str], fn, log: List[dict], clock: Optional[Clock] = None):
    print(f"\n=== {title}\n$ python classification/cifar10/{script} {shlex.join(argv)}", flush=True)
    t0 = time.time()
    rec = fn(argv)
    log.append({"step": title, "script": script, "argv": argv, "seconds": round(time.time() - t0, 1)})
    print(f"--- {title}: {_minutes(time.time() - t0)}" + (f" ({clock.step_done()})" if clock else ""), flush=True)
    return rec


def step_weights(args) -> List[float]:
    """Reference seconds of the demo's steps, in order (train x4, SNN x4, settle, fine-tune), for ``args``'s
    budget."""
    scale = args.train_subset / 8000
    train = [REF_SECONDS["epoch_fp"] * args.epochs_fp * scale] + \
        [REF_SECONDS["epoch_q"] * args.epochs_q * scale] * (len(CHAIN) - 1)
    val = args.val_subset / 1000
    snn = [REF_SECONDS["snn"][b] * val for b in SNN_BITS for _ in ("signed", "unsigned")]
    settle = [REF_SECONDS["settle"] * val * (2 ** FT_BIT - 1 + args.settle) / 12] if args.settle else []
    e2e = REF_SECONDS["e2e_epoch"] * args.e2e_epochs * (args.e2e_batches or args.ft_batches) / 63 \
        if "e2e" in args.ft_method.split("+") else 0.0
    from common.pipeline import accept_mode
    local = accept_mode(args.ft_accept, args.ft_method) == "local"
    ft = REF_SECONDS["ft_local" if local else "ft"] * args.ft_batches / 63
    return train + snn + settle + [ft + e2e]


def _fmt(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}"


def table(rows: List[Dict], settle: int = 0) -> str:
    head = ("bits", "T", "ANN top-1", "SNN signed", "SNN unsigned", "fine-tuned") + \
        ((f"settle (K = {settle})",) if settle else ())
    body = [(str(r["bits"]), "–" if r["T"] is None else str(r["T"]), _fmt(r["ann_top1"]), _fmt(r["snn_signed"]),
             _fmt(r["snn_unsigned"]), _fmt(r["finetuned"])) + ((_fmt(r.get("settle")),) if settle else ())
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    line = lambda cells: " | ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), "-+-".join("-" * w for w in widths)] + [line(b) for b in body])


def _plots(out: str, snn_recs: Dict, ft_rec: Optional[Dict], train_hist: Dict,
           settle_rec: Optional[Dict] = None) -> List[str]:
    from classification.plots import plot_accuracy_vs_t
    from common.plots import plot_layers, plot_training
    paths = []
    curves = {f"{b}-bit {n} (T={r['T']})": r["per_step_top1"] for (b, n), r in snn_recs.items()}
    if ft_rec is not None:
        curves[f"{FT_BIT}-bit fine-tuned (T={ft_rec['T']})"] = ft_rec["per_step_top1"]
    if settle_rec is not None:  # t = 1..T + K
        curves[f"{FT_BIT}-bit signed + settle (K={settle_rec['settle']})"] = settle_rec["per_step_top1"]
    anns = {f"ANN {b}-bit": snn_recs[(b, "signed")]["ann_top1"] for b in SNN_BITS if (b, "signed") in snn_recs}
    paths.append(plot_accuracy_vs_t(curves, os.path.join(out, "accuracy_vs_t.png"), anns,
                                    "SNN top-1 vs time step (Fashion-MNIST demo)"))
    runs = {f"{n}": r["layers"] for (b, n), r in snn_recs.items() if b == FT_BIT}
    if ft_rec is not None:
        runs["signed, fine-tuned"] = ft_rec["layers"]
    if runs:
        paths.append(plot_layers(runs, os.path.join(out, f"layers_{FT_BIT}bit.png"),
                                 f"{FT_BIT}-bit SNN: agreement with the ANN and firing rate per layer"))
    hist = [h for b in train_hist for h in train_hist[b]]
    hist = [dict(h, epoch=i + 1) for i, h in enumerate(hist)]
    if hist:
        paths.append(plot_training(hist, os.path.join(out, "training_chain.png"),
                                   "32 -> 4 -> 3 -> 2-bit chain (epochs concatenated)"))
    return paths


def _history(run: str) -> list:
    import json
    path = os.path.join(run, "history.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["history"]


def main(argv=None) -> Dict:
    args = get_parser().parse_args(argv)
    check_args(args)
    if args.quick:
        args.train_subset, args.val_subset, args.batch_size = min(args.train_subset, 32), min(args.val_subset, 16), 8
        args.epochs_fp, args.epochs_q, args.ft_batches, args.e2e_batches, args.e2e_epochs = 1, 1, 1, 1, 1
        args.ft_layers = args.ft_layers or "layer1.0.*"
    from classification.cifar10 import main as train_script
    from classification.cifar10 import snn as snn_script
    from classification.cifar10 import snn_ft as ft_script
    t_start = time.time()
    clock = Clock(step_weights(args))
    print(f"Fast-SNN demo: {len(clock.weights)} steps, about {_minutes(sum(clock.weights))} on an idle 2-core "
          "machine (longer when the CPU is shared)", flush=True)
    result = os.path.join(args.out, "result")
    if os.path.isdir(result) and not args.keep:
        shutil.rmtree(result)
    runs = os.path.join(result, "" if args.dataset == "cifar10" else args.dataset)  # the scripts' run folders
    base = ["--arch", args.arch, "--dataset", args.dataset, "--data", args.data or os.path.join(args.out, "data"),
            "--out", result, "--train-subset", str(args.train_subset), "--val-subset", str(args.val_subset),
            "-b", str(args.batch_size), "-j", str(args.workers), "--plot",
            "--progress" if args.progress else "--no-progress"]
    snn_base = base + (["--tune-malloc"] if args.tune_malloc else [])
    base = base + ["--seed", str(args.seed)]
    steps: List[dict] = []
    ann, prev = {}, None
    for bit, lr, wd in CHAIN:
        epochs = args.epochs_fp if bit == 32 else args.epochs_q
        argv_ = base + ["--bit", str(bit), "--epochs", str(epochs), "--lr", str(lr), "--wd", str(wd),
                        "--alpha-init", str(args.alpha_init), "-p", "5", "--fresh"]
        if prev:
            argv_ += ["--init", prev]
        ann[bit] = _step(f"train {bit}-bit ANN", "main.py", argv_, train_script.main, steps, clock)
        prev = os.path.join(runs, f"{args.arch}_{bit}bit", "model_best.pth.tar")
    snn_recs = {}
    for bit in SNN_BITS:
        for neuron in ("signed", "unsigned"):
            argv_ = snn_base + ["--bit", str(bit), "-e"] + (["-u"] if neuron == "unsigned" else [])
            snn_recs[(bit, neuron)] = _step(f"SNN {bit}-bit {neuron}", "snn.py", argv_, snn_script.main, steps, clock)
    settle = None
    if args.settle:
        settle = _step(f"SNN {FT_BIT}-bit signed + settle (K = {args.settle})", "snn.py",
                       snn_base + ["--bit", str(FT_BIT), "-e", "--settle", str(args.settle)], snn_script.main, steps,
                       clock)
    ft = _step(f"fine-tune {FT_BIT}-bit SNN ({args.ft_method})", "snn_ft.py",
               snn_base + ["--seed", str(args.seed), "--fresh", "--bit", str(FT_BIT), "-n", "1", "--max-iters", str(args.ft_batches),
                           "--score-batches", str(args.score_batches), "--method", args.ft_method]
               + (["--ft-accept", args.ft_accept] if args.ft_accept != "auto" else [])
               + ["--e2e-loss", args.e2e_loss, "--e2e-epochs", str(args.e2e_epochs)]
               + (["--e2e-batches", str(args.e2e_batches)] if args.e2e_batches is not None else [])
               + ["--no-eval-before", "--ft-cache-mb", str(args.ft_cache_mb)]
               + (["--ft-layers", args.ft_layers] if args.ft_layers else []),
               ft_script.main, steps, clock)
    rows = []
    for bit, _, _ in CHAIN:
        s, u = snn_recs.get((bit, "signed")), snn_recs.get((bit, "unsigned"))
        rows.append({"bits": bit, "T": s["T"] if s else (None if bit == 32 else 2 ** bit - 1),
                     "ann_top1": ann[bit]["top1"], "snn_signed": s["top1"] if s else None,
                     "snn_unsigned": u["top1"] if u else None, "finetuned": ft["top1"] if bit == FT_BIT else None,
                     "settle": settle["top1"] if settle and bit == FT_BIT else None})
    text = table(rows, args.settle)
    hist = {b: _history(os.path.join(runs, f"{args.arch}_{b}bit")) for b, _, _ in CHAIN}
    plots = _plots(args.out, snn_recs, ft, hist, settle)
    wall = time.time() - t_start
    keys = ("T", "top1", "top5", "ann_top1", "per_step_top1", "sops", "ann_macs", "energy")
    snn_summary = {f"{b}bit_{n}": {k: r[k] for k in keys} for (b, n), r in snn_recs.items()}
    if settle is not None:
        snn_summary[f"{FT_BIT}bit_settle"] = {k: settle[k] for k in keys + ("settle",)}
    summary = {"dataset": args.dataset, "arch": args.arch, "seed": args.seed, "train_subset": args.train_subset,
               "val_subset": args.val_subset, "ft_method": args.ft_method, "ft_accept": args.ft_accept,
               "e2e_batches": args.e2e_batches,
               "e2e_epochs": args.e2e_epochs,
               "e2e_loss": args.e2e_loss,
               "settle": args.settle, "table": rows, "wall_seconds": round(wall, 1), "steps": steps,
               "plots": plots, "snn": snn_summary,
               "finetuned": {k: ft.get(k) for k in ("T", "top1", "top5", "ann_top1", "per_step_top1")},
               "finetune_history": ft.get("finetune")}
    write_json(os.path.join(args.out, "summary.json"), summary)
    print(f"\nFast-SNN demo: {args.arch} on {args.dataset} ({args.train_subset} training / {args.val_subset} test "
          f"images), top-1 % on the test images\n{caption(args)}\n\n{text}\n")
    print(f"wall time {wall / 60:.1f} min; summary -> {os.path.join(args.out, 'summary.json')}; "
          f"figures -> {', '.join(plots)}", flush=True)
    return summary


def caption(args) -> str:
    """What the last columns of the table are."""
    return (f"fine-tuned ({args.ft_method}): the signed SNN after snn_ft.py --method {args.ft_method}"
            + (f"; settle (K = {args.settle}): the signed SNN with {args.settle} settle steps after T "
               f"(snn.py --settle {args.settle})" if args.settle else ""))


def check_args(args):
    """One-line errors for bad demo flags, before the first (minutes-long) step."""
    from classification import workflow
    from common import UserError
    workflow.check_method(args.ft_method, "--ft-method")
    workflow.check_args(args)  # the scripts' own checks of the flags the demo shares (-b, -j, --e2e-*)
    if args.settle < 0:
        raise UserError(f"--settle {args.settle} must not be negative", "pass K >= 0 (0 skips the settle step)")


if __name__ == "__main__":
    run_cli(main)
