"""Fidelity ablation: which fine-tuning method closes the SNN-ANN gap at exactly T, and how
many settle steps make the SNN equal its quantized ANN.

On the demo's data and chain (:mod:`classification.demo`: Fashion-MNIST subset, the 32 -> 4 -> 3 -> 2-bit
recipe), trained once and cached in ``<out>/fidelity/result`` (a later run reuses the checkpoints):

* every fine-tuning method of :func:`snn.finetune` (``--methods``) on the 2-bit signed SNN, from the
  same ANN -> top-1 at T on the test images, seconds of fine-tuning;
* settle mode: top-1 and the per-layer agreement with the ANN for K = 0, 1, ...; the smallest K whose
  top-1 equals the ANN's within 0.1 point with every layer's agreement >= 0.999;
* the figure "accuracy vs total time steps" (unsigned, signed, signed + fine-tuned, signed + settle)
  -> ``<out>/fidelity_<arch>.png``; all numbers -> ``<out>/fidelity_<arch>.json``.

    python -m classification.fidelity                       # ResNet-20, every method
    python -m classification.fidelity -a vgg11 --methods fastsnn,<best>
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Dict, List

from common.runs import ReshuffledLoader
from common import run_cli
from common.cli import ArgumentParser


def get_parser() -> ArgumentParser:
    from snn.finetune import METHODS
    p = ArgumentParser(description="Fast-SNN fidelity ablation: fine-tuning methods and settle steps")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/); checkpoints are cached "
                                                      "in <out>/fidelity/result")
    p.add_argument("--data", default=None, help="data folder (default <out>/data, the demo's)")
    p.add_argument("--dataset", default="fashionmnist", choices=("fashionmnist", "cifar10", "folder"))
    p.add_argument("-a", "--arch", default="resnet20")
    p.add_argument("--bit", type=int, default=2, help="bit-width of the SNN studied (default 2: T = 3)")
    p.add_argument("--train-subset", type=int, default=8000)
    p.add_argument("--val-subset", type=int, default=1000)
    p.add_argument("--epochs-fp", type=int, default=4)
    p.add_argument("--epochs-q", type=int, default=2)
    p.add_argument("--alpha-init", type=float, default=3.0)
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="multiplies every training stage's learning rate (the demo's 0.1 / 4e-2; default 1; "
                        "0.1 for vgg11, which diverges at lr 0.1)")
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help="seed of the ANN chain (and of the fine-tuning, without --ft-seed)")
    p.add_argument("--ft-seed", type=int, default=None,
                   help="seed of the fine-tuning's shuffles and augmentation (default --seed), on the chain of --seed")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"fine-tuning methods, comma-separated (default all: {','.join(METHODS)}; '' for none); "
                        "a method may carry options after ':' (then separate methods with ';'), e.g. "
                        "'fastsnn+e2e:e2e_lr=0.01,e2e_loss=ce,score=fixed' (keys: snn.finetune's arguments, "
                        "epochs, lr, batches, score=reshuffled|fixed|none, score_batches)")
    p.add_argument("--ft-subset", type=int, default=None,
                   help="fine-tuning set: this many training images (default --train-subset, the chain's own)")
    p.add_argument("--ft-batch-size", type=int, default=None, help="fine-tuning batch size (default -b)")
    p.add_argument("--ft-batches", type=int, default=63, help="fine-tuning batches per layer (default 63, the demo's)")
    p.add_argument("--score-batches", type=int, default=8,
                   help="accept / revert score: SNN top-1 on this many training batches (default 8, the demo's)")
    p.add_argument("--eval-batches", type=int, default=None, help="test batches (default all of --val-subset)")
    p.add_argument("--settle-max", type=int, default=None, help="largest K tried (default 3 x depth x T)")
    p.add_argument("--settle-k", default="", metavar="K,K,...",
                   help="try only these K (default every K up to --settle-max, stopping at the first that passes)")
    p.add_argument("--no-settle", action="store_true", help="skip the settle sweep")
    p.add_argument("--no-figure", action="store_true", help="after the settle sweep, skip the figure's curves")
    p.add_argument("--backend", default=None, help="IF neuron kernel backend (default: snn's choice)")
    p.add_argument("--cache-mb", type=int, default=6144, help="fine-tuner prefix cache memory (default 6144, the demo's)")
    p.add_argument("--ft-from", default=None, metavar="JSON",
                   help="without --methods: take the figure's fine-tuned curve (t = 1..T) from the best method of "
                        "an earlier run's fidelity_<arch>.json")
    p.add_argument("--tag", default="", help="suffix of the output names (fidelity_<arch><tag>.json / .png)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run (tests)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=False)
    return p


def _runs(args):
    """The run folders of the cached chain: one per training budget (subset, epochs, clip init, seed)."""
    folder = f"{os.path.basename(os.path.normpath(args.data))}_" if args.dataset == "folder" else ""  # which folder
    result = os.path.join(args.out, "fidelity", f"{folder}n{args.train_subset}_e{args.epochs_fp}-{args.epochs_q}"
                                                f"_a{args.alpha_init:g}_b{args.batch_size}_s{args.seed}"
                                                + (f"_lr{args.lr_scale:g}" if args.lr_scale != 1 else ""))
    return os.path.join(result, "" if args.dataset == "cifar10" else args.dataset), result


def train_chain(args) -> str:
    """The demo's progressive chain up to ``args.bit`` (each stage skipped when its checkpoint exists);
    returns the path of the ``args.bit`` checkpoint."""
    from classification.cifar10 import main as train_script
    from classification.demo import CHAIN
    runs, result = _runs(args)
    base = ["--arch", args.arch, "--dataset", args.dataset, "--data", args.data, "--out", result,
            "--train-subset", str(args.train_subset), "--val-subset", str(args.val_subset),
            "-b", str(args.batch_size), "-j", "0", "--seed", str(args.seed),
            "--progress" if args.progress else "--no-progress"]
    prev = None
    for bit, lr, wd in CHAIN:
        path = os.path.join(runs, f"{args.arch}_{bit}bit", "model_best.pth.tar")
        if not os.path.exists(path):
            epochs = args.epochs_fp if bit == 32 else args.epochs_q
            argv = base + ["--bit", str(bit), "--epochs", str(epochs), "--lr", f"{lr * args.lr_scale:g}",
                           "--wd", str(wd),
                           "--alpha-init", str(args.alpha_init), "-p", "20", "--resume", "auto"] + \
                (["--init", prev] if prev else [])
            print(f"train {bit}-bit: python classification/cifar10/main.py {' '.join(argv)}", flush=True)
            train_script.main(argv)
        prev = path
        if bit == args.bit:
            return path
    raise SystemExit(f"--bit {args.bit} is not a stage of the demo chain {[c[0] for c in CHAIN]}")


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_method(spec: str):
    """``"fastsnn+e2e:e2e_lr=0.01,e2e_loss=ce,score=fixed"`` -> ``("fastsnn+e2e", {options})``."""
    name, _, opts = spec.partition(":")
    kw = {}
    for item in filter(None, opts.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"method option {item!r} in {spec!r}: write key=value")
        kw[k.strip()] = _value(v.strip())
    return name.strip(), kw


#: the option keys a ``--methods`` entry may carry: snn.finetune's (its method stages' settings) and this
#: script's own; a value of the wrong kind or name is refused before the chain trains
_OPTIONS = {"epochs": int, "lr": float, "batches": int, "score_batches": int, "bias_iters": int, "e2e_epochs": int,
            "e2e_batches": int, "e2e_lr": float, "local_batches": int, "min_steps": int,
            "score": ("reshuffled", "fixed", "none"), "e2e_loss": ("auto", "mse", "kl", "ce"),
            "accept": ("score", "local"), "schedule": ("constant", "cosine")}


def check_methods(specs: List[str]):
    """One-line errors for a ``--methods`` entry that is not a method or carries an unknown / ill-typed
    option -- at the start, not after the chain has trained."""
    from common import UserError
    from common.pipeline import check_method
    for spec in specs:
        try:
            name, kw = parse_method(spec)
        except ValueError as e:
            raise UserError(f"--methods: {e}", "write name:key=value,key=value") from None
        check_method(name, "--methods")
        for k, v in kw.items():
            kind = _OPTIONS.get(k)
            if kind is None:
                raise UserError(f"--methods {spec!r}: unknown option {k!r}", f"use one of {', '.join(sorted(_OPTIONS))}")
            if isinstance(kind, tuple):
                ok, want = v in kind, " | ".join(kind)
            elif kind is int:   # counts of epochs / batches / steps: at least 1
                ok, want = isinstance(v, int) and v >= 1, "a whole number >= 1"
            else:
                ok, want = isinstance(v, (int, float)) and v >= 0, "a number >= 0"
            if not ok:
                raise UserError(f"--methods {spec!r}: {k}={v} is not {want}", f"pass {k}=<{want}>")


def _ft_seed(args) -> int:
    return args.seed if args.ft_seed is None else args.ft_seed


def _ft_args(args, path: str):
    from classification import workflow
    from classification.cifar10 import snn_ft
    from classification.cifar10.task import TASK
    runs, result = _runs(args)
    argv = ["--arch", args.arch, "--dataset", args.dataset, "--data", args.data, "--out", result,
            "--train-subset", str(args.ft_subset or args.train_subset), "--val-subset", str(args.val_subset),
            "-b", str(args.ft_batch_size or args.batch_size), "-j", "0", "--seed", str(_ft_seed(args)), "--bit", str(args.bit),
            "--init", path, "--no-progress"]
    a = snn_ft.get_parser().parse_args(argv)
    a.run_kind = "ft"
    workflow.setup_run(a, TASK)
    return a


class Study:
    """The trained ANN, its data and the measurements on it."""

    def __init__(self, args, ann, data, device):
        self.args, self.ann, self.data, self.device = args, ann, data, device
        self.done: Dict[str, tuple] = {}  # method spec -> (tuned net, seconds), for "<spec>+e2e" to continue

    def convert(self, **kw):
        from common import pipeline
        return pipeline.convert(self.ann, backend=self.args.backend, **kw).to(self.device)

    def evaluate(self, net) -> dict:
        """ANN and SNN side by side on the test images (:func:`common.pipeline.evaluate_snn`: per-step top-1
        over all T + settle steps, per-layer agreement)."""
        from common import pipeline
        from classification.metrics import TopK
        res = pipeline.evaluate_snn(self.ann, net, self.data.val_loader, TopK.factory((1,)), key="top1", device=self.device,
                                    progress=self.args.progress, max_batches=self.args.eval_batches)
        res["min_agreement"] = min(l["agreement"] for l in res["layers"])
        return res

    def finetune(self, spec: str):
        from classification import engine, workflow
        from common import dist, pipeline
        name, kw = parse_method(spec)
        dist.seed_all(_ft_seed(self.args), 0)  # every method sees the same shuffles
        net, before, reused = self.convert(), 0.0, None
        stages = name.split("+")
        layerwise = ("epochs", "lr", "batches", "bias_iters", "schedule", "accept", "local_batches", "min_steps")
        if stages[-1] == "e2e" and len(stages) > 1 and not any(k in kw for k in layerwise):
            prior = "+".join(stages[:-1])
            if prior in self.done:  # continue from that run's tuned net: only the end-to-end stage is new
                reused, (net, before) = prior, (copy.deepcopy(self.done[prior][0]), self.done[prior][1])
                name = "e2e"
        loader = ReshuffledLoader(self.data.train_loader)
        score_kind = kw.pop("score", "reshuffled")
        score_batches = int(kw.pop("score_batches", self.args.score_batches))
        if score_kind == "none":
            score = None
        elif score_kind == "fixed":  # the same training batches for every score
            fixed = engine.fixed_batches(self.data.train_loader, score_batches)
            score = engine.top1_score(fixed, show_progress=False)
        elif score_kind == "reshuffled":  # the first N batches of a new shuffle (the default here; snn_ft.py
            # and the demo draw their N batches once: score=fixed)
            score = engine.top1_score(loader, max_batches=score_batches, show_progress=False)
        else:
            raise ValueError(f"score={score_kind!r}: use reshuffled, fixed or none")
        if kw.get("e2e_loss") == "ce":
            kw["e2e_loss"] = workflow.cross_entropy_loss
        epochs = int(kw.pop("epochs", 1))
        lr = float(kw.pop("lr", 1e-3))
        batches = kw.pop("batches", self.args.ft_batches)
        t0 = time.time()
        lines: List[str] = []

        def log(line: str):
            lines.append(line)
            print(f"  [{spec}] {line}", flush=True)
        hist = pipeline.finetune(self.ann, net, loader, score=score, epochs=epochs, lr=lr,
                                 weight_decay=getattr(self.ann, "ft_weight_decay", 1e-4),
                                 bn_mode=getattr(self.ann, "ft_bn_mode", "recalibrate"), max_batches=batches,
                                 cache="auto", cache_mb=self.args.cache_mb, progress=self.args.progress,
                                 log=log, device=self.device, method=name, method_options=kw)
        seconds = time.time() - t0 + before
        if reused is None:
            self.done[spec] = (copy.deepcopy(net), seconds)
        res = self.evaluate(net)
        accepted = sum(bool(h["accepted"]) for h in hist)
        return net, {"method": spec, "top1": res["top1"], "ann_top1": res["ann_top1"], "seconds": round(seconds, 1),
                     "min_agreement": res["min_agreement"], "per_step_top1": res["per_step_top1"],
                     "accepted": f"{accepted}/{len(hist)}", "continued_from": reused, "log": lines}

    def settle(self, kmax: int, ks=None) -> dict:
        """Smallest K with top-1 within 0.1 of the ANN and every layer agreeing >= 0.999 (K = 0, 1, ... or
        the given ``ks``)."""
        sweep = []
        for K in (range(kmax + 1) if ks is None else ks):
            res = self.evaluate(self.convert(settle=K)) if K else self.evaluate(self.convert())
            sweep.append({"K": K, "top1": res["top1"], "ann_top1": res["ann_top1"],
                          "min_agreement": res["min_agreement"], "per_step_top1": res["per_step_top1"],
                          "agreement": {l["name"]: l["agreement"] for l in res["layers"]}})
            print(f"settle K={K}: top-1 {res['top1']:.2f} (ANN {res['ann_top1']:.2f}), "
                  f"min layer agreement {res['min_agreement']:.4f}", flush=True)
            if abs(res["top1"] - res["ann_top1"]) <= 0.1 and res["min_agreement"] >= 0.999:
                return {"K": K, "sweep": sweep}
        return {"K": None, "sweep": sweep}


def main(argv=None) -> Dict:
    import torch
    from classification import workflow
    from classification.cifar10.task import TASK
    from common import dist
    from common.metrics import write_json
    from classification.plots import plot_accuracy_vs_t
    args = get_parser().parse_args(argv)
    if args.quick:
        args.train_subset, args.val_subset, args.batch_size = min(args.train_subset, 64), min(args.val_subset, 32), 16
        args.epochs_fp, args.epochs_q, args.ft_batches, args.score_batches = 1, 1, 2, 1
        args.ft_subset = args.ft_subset and min(args.ft_subset, 48)
        args.ft_batch_size = args.ft_batch_size and min(args.ft_batch_size, 16)
        args.settle_max = 2 if args.settle_max is None else args.settle_max
    methods = [m for m in args.methods.split(";" if ":" in args.methods else ",") if m.strip()]
    check_methods(methods)
    args.data = args.data or os.path.join(args.out, "data")
    path = train_chain(args)
    fa = _ft_args(args, path)
    out: Dict = {"arch": args.arch, "dataset": args.dataset, "bit": args.bit, "train_subset": args.train_subset,
                 "ft_subset": args.ft_subset or args.train_subset, "ft_batch_size": args.ft_batch_size or args.batch_size,
                 "val_subset": args.val_subset, "seed": args.seed, "ft_seed": _ft_seed(args), "checkpoint": path, "argv": argv, "threads": torch.get_num_threads()}
    with dist.session(fa.device, fa.local_rank) as ctx:
        dist.seed_all(_ft_seed(args), ctx.rank)
        data = TASK.build_data(fa, ctx)
        _, ann, _, _ = workflow.open_trained(fa, TASK, ctx, data)
        st = Study(args, ann, data, ctx.device)
        base = st.evaluate(st.convert())
        T = base["T"]
        out.update(T=T, ann_top1=base["ann_top1"], snn_top1=base["top1"], snn_min_agreement=base["min_agreement"])
        print(f"{args.arch} {args.bit}-bit: ANN {base['ann_top1']:.2f}, SNN (signed, T={T}) {base['top1']:.2f}",
              flush=True)
        rows, best = [], None
        for spec in methods:
            net, row = st.finetune(spec)
            rows.append(row)
            print(f"method {spec}: top-1 {row['top1']:.2f} (ANN {row['ann_top1']:.2f}, gap "
                  f"{row['ann_top1'] - row['top1']:.2f}), {row['seconds']:.0f} s, layers accepted {row['accepted']}",
                  flush=True)
            if best is None or row["top1"] > best[1]["top1"]:
                best = (net, row)
            write_json(os.path.join(args.out, f"fidelity_{args.arch}{args.tag}.json"), dict(out, methods=rows))
        out["methods"] = rows
        if not args.no_settle:
            depth = len(st.convert().neurons())
            kmax = args.settle_max if args.settle_max is not None else depth * T
            ks = [int(k) for k in args.settle_k.split(",")] if args.settle_k else None
            out["settle"] = st.settle(kmax if ks is None else max(ks), ks)
        if not args.no_settle and not args.no_figure:
            K = out["settle"]["K"]
            steps = T + (K if K is not None else out["settle"]["sweep"][-1]["K"])
            curves = {}
            for label, kw in (("unsigned", {"signed": False}), ("signed", {})):
                curves[label] = st.evaluate(st.convert(T=steps, **kw))["per_step_top1"]
            if best is not None:
                best[0].set_T(steps)
                curves[f"signed + fine-tuned ({best[1]['method']})"] = st.evaluate(best[0])["per_step_top1"]
            elif args.ft_from:  # the best method of an earlier run (its t = 1..T)
                import json
                with open(args.ft_from) as f:
                    rows_ = json.load(f).get("methods") or []
                if rows_:
                    r = max(rows_, key=lambda r: r["top1"])
                    curves[f"signed + fine-tuned ({r['method']})"] = r["per_step_top1"]
            curves[f"signed + settle (K = {out['settle']['sweep'][-1]['K']})"] = out["settle"]["sweep"][-1]["per_step_top1"]
            out["curves"] = curves
            out["figure"] = plot_accuracy_vs_t(
                curves, os.path.join(args.out, f"fidelity_{args.arch}{args.tag}_accuracy_vs_steps.png"),
                {f"ANN {args.bit}-bit": base["ann_top1"]},
                f"{args.arch} {args.bit}-bit (T = {T}): accuracy vs total time steps")
    write_json(os.path.join(args.out, f"fidelity_{args.arch}{args.tag}.json"), out)
    print(f"\n{args.arch} {args.bit}-bit on {args.dataset}: ANN {out['ann_top1']:.2f}, SNN {out['snn_top1']:.2f} "
          f"(T = {out['T']})\n" + "\n".join(f"  {r['method']:40s} {r['top1']:6.2f}  {r['seconds']:7.1f} s"
                                             for r in out.get("methods", [])))
    if "settle" in out:
        print(f"  settle: smallest K = {out['settle']['K']}" + (f"; figure -> {out['figure']}" if "figure" in out else ""))
    return out


if __name__ == "__main__":
    run_cli(main)
