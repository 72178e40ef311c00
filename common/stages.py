"""The stages of a demo: each printed with its command, its time and an estimate of the time left.

The estimate scales the planned work of the stages still to run (a weight per stage, e.g. its epochs
times a per-epoch cost measured once on a CPU) by the seconds per unit of work the stages run so far
took on this machine; stages found finished (a resumed demo) leave the plan without counting.
"""
from __future__ import annotations

import os
import shlex
import shutil
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple


def command(script: str, argv: List[str]) -> str:
    return f"python {script} " + " ".join(shlex.quote(a) for a in argv)


class StageClock:
    def __init__(self, plan: Dict[str, float]):
        self.plan = dict(plan)                 # stage name -> planned work (arbitrary units)
        self.t0 = time.time()
        self.ran_work = self.ran_seconds = 0.0
        self.steps: List[dict] = []

    def left(self) -> Optional[float]:
        """Seconds still needed, or ``None`` before a stage with planned work has run."""
        if self.ran_work <= 0:
            return None
        return sum(self.plan.values()) * self.ran_seconds / self.ran_work

    def _line(self, name: str, secs: float) -> str:
        left = self.left()
        tail = f", about {left / 60:.1f} min left" if left is not None and self.plan else ""
        return f"=== {name}: {secs:.0f} s (total {(time.time() - self.t0) / 60:.1f} min{tail})"

    def run(self, name: str, script: str, fn: Callable, argv: List[str]):
        """Print the equivalent command, run ``fn(argv)``, print its time and the estimate; return its result."""
        cmd = command(script, argv)
        print(f"\n=== {name}\n+ {cmd}", flush=True)
        t = time.time()
        res = fn(argv)
        secs = time.time() - t
        work = self.plan.pop(name, 0.0)
        self.ran_work, self.ran_seconds = self.ran_work + work, self.ran_seconds + secs
        self.steps.append({"step": name, "command": cmd, "seconds": round(secs, 1)})
        print(self._line(name, secs), flush=True)
        return res

    def skip(self, name: str, why: str):
        """A stage found finished: it leaves the plan."""
        self.plan.pop(name, None)
        self.steps.append({"step": name, "skipped": why, "seconds": 0.0})
        print(f"\n=== {name}: done before ({why})", flush=True)

    def once(self, name: str, result: str, script: str, fn: Callable, argv: List[str], *, also: str = ""):
        """A stage whose result JSON ``result`` (and file ``also``, when given) mark it finished: read it
        back if they exist, else :meth:`run` it."""
        from common.metrics import read_json
        if os.path.isfile(result) and (not also or os.path.isfile(also)):
            self.skip(name, result)
            return read_json(result)
        return self.run(name, script, fn, argv)


# ---------------------------------------------------------------------------------- the bit chain of a demo
CHAIN = (32, 4, 3, 2)              # the progressive chain of a demo: float, then 4 -> 3 -> 2 bits
SNN_T = {4: 15, 3: 7, 2: 3}        # the bits whose SNN a demo evaluates, at T = 2^bit - 1
NEURONS = ("signed", "unsigned")
BEST = "model_best.pth.tar"


def finished_training(run_dir: str, epochs: int) -> Optional[dict]:
    """The record of a ``train.py`` run in ``run_dir`` that finished ``epochs`` epochs (its metrics_ann.json,
    written once the last epoch is done, and its best checkpoint), else ``None``."""
    from common.metrics import read_json
    done = os.path.join(run_dir, "metrics_ann.json")
    if not (os.path.isfile(done) and os.path.isfile(os.path.join(run_dir, BEST))):
        return None
    rec = read_json(done)
    return rec if rec.get("epochs") == epochs else None


def train_chain(clock: "StageClock", *, run_dir: Callable[[int], str], epochs: Callable[[int], int],
                argv: Callable[[int, Optional[str]], List[str]], script: str, fn: Callable,
                stage: Callable[[int], str], init: Optional[str] = None, bits: Sequence[int] = CHAIN) -> Dict[int, dict]:
    """Train each bit of the chain ``--init`` from the previous one's best checkpoint (the first from
    ``init``): ``argv(bit, init_path)`` is its command line. A run found finished is reused. Returns
    bit -> ``train.py``'s record."""
    ann: Dict[int, dict] = {}
    prev = init
    for bit in bits:
        d = run_dir(bit)
        rec = finished_training(d, epochs(bit))
        if rec is None:
            rec = clock.run(stage(bit), script, fn, argv(bit, prev))
        else:
            clock.skip(stage(bit), os.path.join(d, "metrics_ann.json"))
        ann[bit], prev = rec, os.path.join(d, BEST)
    return ann


def snn_grid(clock: "StageClock", *, path: Callable[[int, str], str], argv: Callable[[int, str, str], List[str]],
             script: str, fn: Callable, stage: Callable[[int, str], str]) -> Dict[Tuple[int, str], dict]:
    """The SNN of each bit's ANN (``SNN_T``), signed and unsigned: ``argv(bit, neuron, json_path)`` evaluates
    it into ``path(bit, neuron)``, which marks the stage finished. Returns ``(bit, neuron)`` -> the record."""
    return {(bit, n): clock.once(stage(bit, n), path(bit, n), script, fn, argv(bit, n, path(bit, n)))
            for bit in SNN_T for n in NEURONS}


def chain_rows(ann: Dict[int, dict], snn: Dict[Tuple[int, str], dict], ft: dict, key: str,
               ft_bit: int = 2) -> List[dict]:
    """One row per bit: the ANN's ``key`` (the float one from training, the quantized ones as evaluated beside
    their SNN), the signed / unsigned SNN's, the fine-tuned SNN's on ``ft_bit``, the per-step curves."""
    rows = [{"bit": 32, "T": None, f"ann_{key}": ann[32][key]}]
    for bit, T in SNN_T.items():
        s, u = snn[(bit, "signed")], snn[(bit, "unsigned")]
        rows.append({"bit": bit, "T": T, f"ann_{key}": s[f"ann_{key}"], f"train_best_{key}": ann[bit][key],
                     "signed": s[key], "unsigned": u[key], "finetuned": ft[key] if bit == ft_bit else None,
                     "per_step_signed": s[f"per_step_{key}"], "per_step_unsigned": u[f"per_step_{key}"],
                     "first_layer_agreement": s["layers"][0]["agreement"] if s.get("layers") else None,
                     "sops": s.get("sops"), "energy": s.get("energy")})
        if bit == ft_bit:
            rows[-1]["per_step_finetuned"] = ft[f"per_step_{key}"]
    return rows


def chain_table(rows: List[dict], key: str, label: str) -> str:
    """``bits | T | ANN <label> | SNN signed | SNN unsigned | SNN signed, fine-tuned`` (Markdown)."""
    def f(v):
        return "-" if v is None else f"{v:.2f}"
    lines = [f"| bits | T | ANN {label} | SNN signed | SNN unsigned | SNN signed, fine-tuned |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['bit']} | {r['T'] or '-'} | {f(r[f'ann_{key}'])} | {f(r.get('signed'))} | {f(r.get('unsigned'))} | "
              f"{f(r.get('finetuned'))} |" for r in rows]
    return "\n".join(lines)


def chain_figures(out: str, rows: List[dict], snn: Dict[Tuple[int, str], dict], ft: dict, *, key: str, ylabel: str,
                  title: str) -> List[str]:
    """``<out>/<key>_vs_t.png`` (every SNN's curve, the quantized ANNs as reference lines) and
    ``<out>/layers.png`` (per-layer agreement with the ANN and firing rate)."""
    from common.plots import plot_layers, plot_metric_vs_t
    curves, refs = {}, {}
    for r in rows[1:]:
        for n in NEURONS:
            curves[f"{r['bit']}-bit {n}, T={r['T']}"] = r[f"per_step_{n}"]
        if r.get("per_step_finetuned") is not None:
            curves[f"{r['bit']}-bit signed, fine-tuned, T={r['T']}"] = r["per_step_finetuned"]
        refs[f"ANN {r['bit']}-bit"] = r[f"ann_{key}"]
    layers = {f"{b}-bit signed, T={T}": snn[(b, "signed")]["layers"] for b, T in SNN_T.items()}
    if ft.get("layers"):
        layers["fine-tuned"] = ft["layers"]
    return [plot_metric_vs_t(curves, os.path.join(out, f"{key}_vs_t.png"), refs, title, ylabel=ylabel),
            plot_layers(layers, os.path.join(out, "layers.png"), "per-layer agreement with the ANN and firing rate")]


def add_scene_args(p, *, out: str, train: int, test: int, max_items: int, train_help: str):
    """The flags every scene-set demo has: where it writes, the scene set's size, the seed, ``--fresh``."""
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    p.add_argument("--train", type=int, default=train, help=f"training scenes (default {train}: {train_help})")
    p.add_argument("--test", type=int, default=test,
                   help=f"test scenes (default {test}: a smaller split moves the score by several points between seeds)")
    p.add_argument("--max-items", type=int, default=max_items, help=f"items per scene: 1..N (default {max_items})")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and of every stage (default 0)")
    p.add_argument("--fresh", action="store_true",
                   help="delete <out> first (default: continue the run there, which must have the same settings)")


def add_chain_args(p, *, pretrain_epochs: int, pretrain_lr: float, pretrain_size: Optional[int], pretrain_what: str,
                   epochs_fp: int, epochs_fp_help: str, epochs_q: int, optimizer_help: str, lr_fp: Optional[float],
                   lr_fp_help: str, lr_q: float, alpha_help: str, ft_batches: int,
                   pretrain_note: str = "", pretrain_size_help: str = "", amp: Optional[bool] = None,
                   lr_q_what: str = "the quantized stages"):
    """The flags of a demo's bit chain, the same names in every task: the backbone pretraining, the epochs,
    optimizer and learning rates of the 32-bit and the quantized stages, the batch, the clips' start, the
    fine-tuning batches, the loader processes."""
    p.add_argument("--pretrain-epochs", type=int, default=pretrain_epochs,
                   help=f"epochs of the backbone pretraining (default {pretrain_epochs}{pretrain_note})")
    p.add_argument("--pretrain-lr", type=float, default=pretrain_lr,
                   help=f"peak Adam lr of the pretraining (default {pretrain_lr:g})")
    p.add_argument("--pretrain-size", type=int, default=pretrain_size,
                   help=f"{pretrain_what} side of the pretraining ({pretrain_size_help or f'default {pretrain_size}'})")
    p.add_argument("--epochs-fp", type=int, default=epochs_fp, help=f"epochs of the 32-bit stage ({epochs_fp_help})")
    p.add_argument("--epochs-q", type=int, default=epochs_q, help=f"epochs of each 4/3/2-bit stage (default {epochs_q})")
    p.add_argument("--optimizer", default="adam", choices=("adam", "sgd"), help=f"optimizer of the 32-bit stage ({optimizer_help})")
    p.add_argument("--lr-fp", "--lr", dest="lr_fp", type=float, default=lr_fp,
                   help=f"learning rate of the 32-bit stage ({lr_fp_help})")
    p.add_argument("--lr-q", type=float, default=lr_q, help=f"learning rate of {lr_q_what} (default {lr_q:g})")
    p.add_argument("-b", "--batch-size", type=int, default=16, help="training batch (default 16)")
    p.add_argument("--alpha-init", type=float, default=3.0, help=f"initial activation clip of the quantized stages ({alpha_help})")
    p.add_argument("--ft-batches", "--ft-iters", dest="ft_batches", type=int, default=ft_batches,
                   help=f"fine-tuning batches per layer (default {ft_batches})")
    p.add_argument("-j", "--workers", type=int, default=0,
                   help="data-loading processes (default 0: in-process; on a small CPU a loader process competes "
                        "with training for the cores)")
    from common.runs import add_amp_arg
    add_amp_arg(p, amp, help="bfloat16 autocast (train.py / pretrain.py --amp) for the backbone pretraining and the "
                             "32-bit stage (" + ("default: on where the device has native bfloat16 kernels, off elsewhere"
                                                 if amp is None else f"default {'on' if amp else 'off'}") + ")")


def check_demo_args(args):
    """The scene and chain flags of a demo, before anything is rendered or trained: a one-line error for
    scene counts, a canvas or an item scale ``make_scenes`` would refuse, a count, epoch or batch below 1,
    a negative pretraining, epoch or worker count, a width, learning rate or clip that is not positive."""
    from common import UserError
    from common.runs import check_non_negative, check_positive
    from common.scenes import check_scene_params
    if hasattr(args, "scale"):                 # detection's flag; segmentation's is --item-scale
        check_scene_params(args.train, args.test, args.size, tuple(args.scale))
    else:
        check_scene_params(args.train, args.test, args.size, tuple(args.item_scale), "--item-scale")
    check_positive(args, "max_items", "pretrain_size", "epochs_fp", "epochs_q", "batch_size",
                   "ft_batches", "score_batches", "fov_dilation", "train_q")
    check_non_negative(args, "pretrain", "pretrain_canvases", "pretrain_epochs", "workers", "warmup_fp")
    if getattr(args, "pretrain", 0) and not args.pretrain_epochs:
        raise UserError(f"--pretrain {args.pretrain} with --pretrain-epochs 0", "pass --pretrain 0 to skip the pretraining")
    for name in ("width", "lr_fp", "lr_q", "lr_2bit", "pretrain_lr", "alpha_init"):
        v = getattr(args, name, None)
        if v is not None and not v > 0:
            raise UserError(f"--{name.replace('_', '-')} {v:g} must be positive", "pass a value above 0")


def open_demo(args, ignore: Iterable[str] = ()) -> str:
    """The demo's folder ``args.out`` (emptied first with ``--fresh``), once its flags pass
    :func:`check_demo_args`; a run continued there must have the same settings, since its finished stages
    are reused as they are: a one-line error names the flags that differ. ``ignore``: flags besides
    ``--out`` / ``--fresh`` that may change between runs (workers, bars)."""
    from common import UserError
    from common.metrics import read_json, write_json
    from common.runs import amp_default
    check_demo_args(args)
    if getattr(args, "amp", False) is None:
        args.amp = amp_default()
    out = args.out
    if args.fresh and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    skip = {"out", "fresh", *ignore}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k not in skip}
    stamp = os.path.join(out, "demo_args.json")
    if os.path.isfile(stamp):
        old = read_json(stamp)
        changed = sorted(k for k in set(old) | set(settings) if k != "env" and old.get(k) != settings.get(k))
        if changed:
            raise UserError(f"{out} holds a demo run with other settings "
                            f"({', '.join('--' + k.replace('_', '-') for k in changed)})",
                            "pass --fresh to start over there, or another --out")
    write_json(stamp, settings, env=False)
    return out


__all__ = ["CHAIN", "NEURONS", "SNN_T", "StageClock", "add_chain_args", "add_scene_args", "chain_figures", "chain_rows", "chain_table",
           "check_demo_args", "command", "finished_training", "open_demo", "snn_grid", "train_chain"]
