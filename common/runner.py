"""The stages every task shares, written once: the epoch loop of training, evaluating a trained
checkpoint's SNN, fine-tuning the SNN, drawing predictions on a folder of images.

A task describes itself with a :class:`Task` -- how it opens a checkpoint with its data, its metric,
its record and figures, its accept / revert score -- and its scripts call :func:`evaluate_snn`,
:func:`finetune` and :func:`predict`. The run-folder and metrics-file rules are :mod:`common.runs`';
conversion, side-by-side evaluation and the fine-tuner are :mod:`common.pipeline`'s.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import UserError, dist, pipeline, runs
from .checkpoint import BEST, load_checkpoint, rng_state, set_rng_state
from .cli import plain_args
from .logger import TensorBoard, log, progress


def _same(res: dict, *_) -> dict:
    return res


@dataclass
class Task:
    """What a task supplies to the shared stages (everything else is the runner's)."""

    name: str                                   # "classification" | "detection" | "segmentation"
    key: str                                    # headline metric of the records: "top1" | "map" | "miou"
    ft_method: str                              # snn_ft.py's default --method (its run folder is <run>_ft)
    # (args, ctx, train) -> (data, model, ckpt, path): the checkpoint to read, its data (train: the
    # training split too), the trained model it holds in eval mode
    open: Callable[[Any, Any, bool], Tuple[Any, Any, dict, str]]
    run_dir: Callable[..., str]                 # (args, suffix="") -> the run folder
    loaders: Callable[[Any, Any, Any], Tuple[Any, Any]]          # (args, data, ctx) -> (train, val)
    make_metric: Callable[[Any, Any, Any], Callable[[], Any]]    # (args, data, model) -> metric factory
    record: Callable[..., Dict]                 # (args, data, model, result, script=, checkpoint=, **extra)
    plot: Callable[[Dict, str], List[str]]      # (record, json path) -> PNG paths (--plot)
    snn_line: Callable[[Dict], str]             # the log line of an SNN result
    score: Callable[[Any, Any, Any, Any, Any], Callable]  # (args, data, ctx, model, train) -> score(net)
    score_text: Callable[[Any], str]            # what the score is, for the log
    ft_meta: Callable[[Any, Any, Any, Dict], Dict]  # (args, data, model, result) -> fine-tuned checkpoint's
    e2e_losses: Callable[[Any], Dict] = lambda model: {}   # --e2e-loss names -> loss(out, ann_out, batch)
    flatten: Callable[[Dict], Dict] = _same     # pipeline.evaluate_snn's dict -> the record's keys
    reference: Callable[[Dict, dict], Dict] = _same  # (result, ckpt): the ANN figures of a fine-tuned file
    inputs: Optional[Callable] = None           # batch -> model input (default: the batch's first item)
    before_keys: Sequence[str] = ()             # further keys of the "before" result kept in the record
    root_flag: str = "--save_folder"            # the flag naming the runs' root (error hints)
    device: Callable[[Any], Optional[str]] = lambda args: args.device
    # (args, data, model, the ANN's metric dict) -> the record's figures of eval.py's ANN, its line logged
    ann_result: Optional[Callable[[Any, Any, Any, Dict], Dict]] = None


# ---------------------------------------------------------------------------------------- flags
FT_CACHE = {"auto": "auto", "on": True, "off": False}  # --ft-cache -> snn.finetune(cache=...)


def add_finetune_args(p, *, method: str, losses: Sequence[str], default_loss: str, loss_help: str,
                      score_default: Optional[int], score_help: str, bn_default: Optional[str] = None,
                      e2e_epochs: int = 1, e2e_epochs_help: str = ""):
    """The flags of every ``snn_ft.py``: epochs per layer, the accept test, BN, the layers to tune, the
    prefix cache, the SNN before tuning, and the method (:func:`common.pipeline.add_method_args`)."""
    p.add_argument("-n", "--num_epochs", "--num-epochs", dest="num_epochs", type=int, default=1,
                   help="fine-tuning epochs per layer (default 1)")
    p.add_argument("--force", action="store_true", help="accept every tuned layer (no accept / revert test)")
    p.add_argument("--ft-bn", "--ft_bn", dest="ft_bn", choices=("frozen", "recalibrate"), default=bn_default,
                   help="BN during fine-tuning (default " + (bn_default or "the model's ft_bn_mode, else recalibrate")
                        + ")")
    p.add_argument("--score-batches", "--score_batches", dest="score_batches", type=int, default=score_default,
                   help=score_help)
    p.add_argument("--ft-layers", "--ft_layers", dest="ft_layers", default="", metavar="PATTERNS",
                   help="tune only the spiking layers whose names match these comma-separated globs "
                        "(e.g. 'layer1.*,layer2.0.act2'; default: every layer from the 2nd on)")
    p.add_argument("--ft-cache", "--ft_cache", dest="ft_cache", choices=tuple(FT_CACHE), default="auto",
                   help="prefix cache: draw the fine-tuning batches once and carry the frozen layers' outputs "
                        "from one tuned layer to the next instead of recomputing them (auto: when --max-iters "
                        "bounds the batches; on: always, reusing the same batches for every layer; default auto)")
    p.add_argument("--ft-cache-mb", "--ft_cache_mb", dest="ft_cache_mb", type=int, default=2048, metavar="MB",
                   help="memory the prefix cache may use; when the batches' cached values need more, the "
                        "prefixes are recomputed instead (default 2048)")
    p.add_argument("--eval-before", "--eval_before", dest="eval_before", action=argparse.BooleanOptionalAction,
                   default=True, help="also evaluate the SNN before fine-tuning (default on)")
    pipeline.add_method_args(p, default=method, losses=losses, default_loss=default_loss, loss_help=loss_help,
                             epochs_default=e2e_epochs, epochs_help=e2e_epochs_help)
    return p


def select_layers(net, patterns: str) -> Optional[List[str]]:
    """Spiking-layer names matching comma-separated globs (``None``: all layers)."""
    if not patterns:
        return None
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    names = list(net.neurons())
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    if not chosen:
        raise UserError(f"--ft-layers {patterns!r} matches none of the spiking layers",
                        f"choose from {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}")
    return chosen


# ---------------------------------------------------------------------------------------- training
def open_run(args, out_dir: str, root_flag: str = "--save_folder") -> Tuple[str, Optional[dict], Optional[dict]]:
    """A training run's folder and what it starts from: ``(resume path, its checkpoint, the --init
    checkpoint)``. A folder holding another run is refused unless resumed or ``--fresh``
    (:func:`common.runs.claim_run_folder`); ``--resume`` must hold a training state; ``--init`` is not read
    when the run resumes (nor when it names a source that is not a file, e.g. ``torchvision``)."""
    resume = runs.resume_path(args.resume, out_dir, getattr(args, "fresh", False))
    runs.claim_run_folder(out_dir, args, resuming=bool(resume), root_flag=root_flag)
    rckpt = ickpt = None
    if resume:
        rckpt = load_checkpoint(resume, "--resume", "pass the checkpoint.pth.tar of the run to continue, or 'auto'")
        runs.require_training_state(rckpt, resume)
        if args.init:
            log("--init ignored: the run continues from its checkpoint")
    elif args.init and args.init != "torchvision":
        ickpt = load_checkpoint(args.init, "--init", "train that stage first, or check the path")
    return resume, rckpt, ickpt


def hint_small_data(task: str, num_images: int, has_init: bool):
    """One line pointing to backbone pretraining when a dense task trains from scratch on few images
    (:func:`common.pretrain.small_data_hint`)."""
    from .pretrain import small_data_hint
    hint = small_data_hint(task, num_images, has_init)
    if hint:
        log(hint)


def rng_states(ctx, generators: Optional[Dict] = None) -> List[dict]:
    """Every rank's RNG states (:func:`common.checkpoint.rng_state`), rank order; a collective under DDP."""
    mine = rng_state(generators)
    if not ctx.distributed:
        return [mine]
    states = [None] * ctx.world_size
    torch.distributed.all_gather_object(states, mine)
    return states


def restore_rng(ckpt: dict, ctx, generators: Optional[Dict] = None) -> str:
    """Put this rank's RNG states of a resumed run back (augmentation and shuffling continue as in the
    uninterrupted run); says what was done."""
    states = ckpt.get("rng_state")
    if states and len(states) == ctx.world_size:
        set_rng_state(states[ctx.rank], generators)
        return "RNG states restored"
    if not states:
        return "RNG states not restored (the checkpoint holds none)"
    return f"RNG states not restored (saved by {len(states)} process(es), this run has {ctx.world_size})"


def resume(ckpt: dict, path: str, ctx, model, optimizer, *, best_name: str, label: str, what: str,
           generators: Optional[Dict] = None, weights: str = "state_dict",
           root_flag: str = "--save_folder") -> Tuple[int, Optional[float], List[dict]]:
    """Continue a run from its checkpoint: the model's weights (``ckpt[weights]``) and the optimizer's
    state (a file of another model is a one-line error), this rank's RNG states (:func:`restore_rng`).
    Returns ``(epochs done, best, history)``."""
    import quant
    saved = (ckpt.get("args") or {}).get("optimizer", "sgd")
    this = "adam" if isinstance(optimizer, torch.optim.Adam) else "sgd"
    if saved != this:
        raise UserError(f"--resume {path} was trained with --optimizer {saved}, this run has {this}",
                        f"resume with --optimizer {saved}, or start a new run in another {root_flag}")
    try:
        model.load_state_dict(quant.strip_prefix(ckpt.get(weights, ckpt["state_dict"])))
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--resume {path} does not fit this {what} model ({' '.join(str(e).split())[:300]})",
                        f"resume with the flags of that run, or start a new run in another {root_flag}") from None
    start, best = int(ckpt["epoch"]), ckpt.get(best_name)
    log(f"resumed {path}: {start} epochs done, best {label} {best or 0.0:.2f}; {restore_rng(ckpt, ctx, generators)}")
    return start, best, list(ckpt.get("history", []))


def sync_bn(model, ctx, wanted: bool):
    """``--sybn``: SyncBatchNorm across the processes (GPUs only; otherwise one warning and plain BN)."""
    if wanted and ctx.distributed and ctx.device.type == "cuda":
        log("SyncBatchNorm across the processes (--sybn)")
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if wanted:
        dist.warn_once("--sybn ignored: " + ("SyncBatchNorm needs GPUs (PyTorch has no CPU kernel for it); each "
                                             "process keeps its own BatchNorm statistics" if ctx.distributed
                                             else "one process, plain BatchNorm"))
    return model


def epochs(args, ctx, out_dir: str, *, start: int, best: Optional[float], history: List[dict], key: str,
           best_name: str, train_epoch: Callable[[int], dict], evaluate: Callable[[int], dict],
           state: Optional[Callable[[int, Optional[float], List[dict]], dict]], summary: dict, every: int = 1,
           tb=None) -> Tuple[Optional[float], List[dict]]:
    """The epoch loop of every ``train.py``, epochs ``start .. args.epochs - 1``: ``train_epoch(epoch)``
    gives the epoch's record (``train_loss``, ``lr``, ...); ``evaluate(epoch)`` runs every ``every`` epochs
    and after the last, its ``key`` deciding the best; the record goes to ``history`` (with ``best_name``),
    TensorBoard and one log line; ``state(done, best, history)`` (on every rank: it may gather) is saved by
    rank 0 as checkpoint.pth.tar, and as model_best.pth.tar when best (``state=None``: nothing saved).
    Returns ``(best, history)``."""
    history = list(history)
    if start > 0 and start >= args.epochs:
        log(f"the run has trained {start} epochs already (--epochs {args.epochs}): nothing to train; a larger "
            "--epochs continues it")
    for epoch in range(start, args.epochs):
        rec = {"epoch": epoch + 1, **train_epoch(epoch)}
        is_best = False
        if (epoch + 1) % every == 0 or epoch + 1 == args.epochs:
            res = evaluate(epoch)
            rec.update(res)
            is_best = best is None or res[key] > best
            best = res[key] if is_best else best
        rec[best_name] = best
        history.append(rec)
        shown = {k: v for k, v in rec.items() if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if tb is not None:
            tb.scalars(epoch + 1, "epoch/", **shown)
        log(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
        saved = state(epoch + 1, best, history) if state is not None else None
        if saved is not None and ctx.is_main:
            runs.save_epoch(saved, out_dir, is_best, summary)
    return best, history


def train(args, ctx, out_dir: str, *, train_epoch: Callable[[int, Any], dict], result: Callable[[dict], dict],
          record: Callable[[dict, List[dict]], dict], title: str, label: str, train_key: Optional[str] = None,
          start_flag: str = "--start_epoch", first: Optional[int] = None, **loop) -> Dict:
    """A training run: :func:`epochs` (``loop``: its keywords) with TensorBoard logs in ``<out_dir>/tb``
    under ``--tensorboard`` (``train_epoch(epoch, tb)``), then :func:`write_training` (``record(result,
    history)``; ``first``: the start epoch its error names, default the loop's)."""
    runs.start_run(out_dir)
    with TensorBoard(os.path.join(out_dir, "tb") if args.tensorboard else None) as tb:
        _, history = epochs(args, ctx, out_dir, train_epoch=lambda e: train_epoch(e, tb), tb=tb, **loop)
    return write_training(args, out_dir, history, start=loop["start"] if first is None else first, key=loop["key"],
                          result=result, record=lambda res: record(res, history), title=title, label=label, train_key=train_key,
                          start_flag=start_flag)


def write_training(args, out_dir: str, history: List[dict], *, start: int, key: str, result: Callable[[dict], dict],
                   record: Callable[[dict, List[dict]], dict], title: str, label: str, train_key: Optional[str] = None,
                   start_flag: str = "--start_epoch") -> Dict:
    """After training: the best epoch's figures (``result(best epoch's record)``) into ``metrics_ann.json``
    of the run folder (``record`` makes the record), with its training curves under ``--plot``."""
    from .plots import plot_training
    top = runs.best_epoch(history, key, start, args.epochs, start_flag)
    rec = record({**result(top), "best_epoch": top["epoch"], "epochs": history[-1]["epoch"]})

    def curves(r, path):
        return [plot_training(history, os.path.splitext(path)[0] + "_curves.png", title, key, label, train_key)]
    runs.write_metrics(args, rec, os.path.join(out_dir, "metrics_ann.json"), curves)
    best = top.get(key)
    log(f"best {key} {best if best is None else f'{best:.2f}'} (epoch {top['epoch']}) -> {os.path.join(out_dir, BEST)}")
    return rec


# ---------------------------------------------------------------------------------------- SNN evaluation
def run_snn(task: Task, args, data, model, net, loader, ctx, *, desc: str = "snn eval",
            max_batches: Optional[int] = None) -> Dict:
    """The ANN and its SNN side by side on ``loader`` (:func:`common.pipeline.evaluate_snn`), flattened
    into the record's keys."""
    res = pipeline.evaluate_snn(model, net, loader, task.make_metric(args, data, model), key=task.key,
                                inputs=task.inputs, device=ctx.device, progress=args.progress, desc=desc,
                                max_batches=max_batches)
    return task.flatten(res)


def check_convertible(args):
    """A full-precision ANN has no clips to become thresholds: a one-line error before anything is read."""
    if args.bit == 32:
        raise UserError("--bit 32 is a full-precision ANN: it has no activation clips to become thresholds"
                        + (" (so -u/--unsigned has nothing to act on)" if getattr(args, "unsigned", False) else ""),
                        "pass --bit 2/3/4/5 with a checkpoint trained at that bit-width")


def convert(task: Task, args, model, ckpt, ctx):
    check_convertible(args)
    name = getattr(args, "arch", None) or getattr(args, "version", None) or getattr(args, "model", None)
    return pipeline.convert_trained(model, ckpt, args, f"{name} {args.bit}-bit", ctx.device)


def data_tag(data, ckpt) -> str:
    """``_<dataset>`` when the evaluated data is not the dataset the checkpoint was trained on (e.g. a VOC
    model scored on a COCO root of the same classes): two datasets' evaluations never share a file."""
    trained, now = ckpt.get("dataset"), getattr(data, "name", None)
    if not trained or not now or str(trained).split("-")[0] == str(now).split("-")[0]:
        return ""
    return "_" + str(now).split("-")[0]


def snn_eval(task: Task, args, ctx, data, model, ckpt, path: str, *, script: str, loader=None,
             folder: Optional[str] = None) -> Dict:
    """Convert the trained ``model`` and evaluate its SNN; the record goes beside the checkpoint
    (``metrics_snn_<neuron>_T<T>[_settle<K>][_<dataset>].json``, or ``--metrics-out``). Returns the record."""
    net = convert(task, args, model, ckpt, ctx)
    if loader is None:
        loader = task.loaders(args, data, ctx)[1]
    res = task.reference(run_snn(task, args, data, model, net, loader, ctx, max_batches=args.max_iters), ckpt)
    log(task.snn_line(res))
    finetuned = bool(ckpt.get("snn_finetuned"))
    rec = task.record(args, data, model, res, script=script, checkpoint=path, finetuned=finetuned)
    folder = folder or runs.eval_dir(path, task.run_dir(args, "_ft" if finetuned else ""))
    name = runs.metrics_name(res)
    out = runs.write_metrics(args, rec, os.path.join(folder, name[:-5] + data_tag(data, ckpt) + ".json"), task.plot)
    rec["path"] = out
    return rec


def evaluate(task: Task, args, ctx, data, model, ckpt, path: str, *, script: str, loader) -> Dict:
    """``eval.py``: with ``--spike`` :func:`snn_eval`; else the ANN's figures (``task.ann_result``) into
    ``metrics_ann_eval.json`` beside the checkpoint (or ``--metrics-out``). Returns the record."""
    if args.spike:
        pipeline.tune_malloc_if_asked(args, log)
        return snn_eval(task, args, ctx, data, model, ckpt, path, script=script, loader=loader)
    if getattr(args, "plot", False):
        dist.warn_once("--plot draws the SNN's figures (metric vs t, per-layer statistics): add --spike for them")
    full = pipeline.evaluate(model, loader, task.make_metric(args, data, model), inputs=task.inputs,
                             device=ctx.device, progress=args.progress, max_batches=args.max_iters)
    return write_ann_eval(task, args, data, model, ckpt, path, task.ann_result(args, data, model, full),
                          script=script)


def write_ann_eval(task: Task, args, data, model, ckpt, path: str, res: Dict, *, script: str, **extra) -> Dict:
    """An ANN evaluation's record of checkpoint ``path`` into ``metrics_ann_eval.json`` beside it (or
    ``--metrics-out``); returns the record, ``path`` naming the file."""
    finetuned = bool(ckpt.get("snn_finetuned"))
    rec = task.record(args, data, model, res, script=script, checkpoint=path, finetuned=finetuned, **extra)
    folder = runs.eval_dir(path, task.run_dir(args, "_ft" if finetuned else ""))
    rec["path"] = runs.write_metrics(args, rec, os.path.join(folder, f"metrics_ann_eval{data_tag(data, ckpt)}.json"),
                                     task.plot)
    return rec


# ---------------------------------------------------------------------------------------- fine-tuning
def finetune(task: Task, args) -> Dict:
    """``snn_ft.py``: layer-wise fine-tuning of the converted SNN in its own run folder
    (``<run>_ft``, or ``<run>_ft_<method>`` for another method), saved in ANN format with the record
    of the SNN before and after. ``-e`` (where a task has it): only evaluate the SNN of ``--init``."""
    pipeline.tune_malloc_if_asked(args, log)
    if args.num_epochs < 1:
        raise UserError(f"-n/--num_epochs {args.num_epochs} must be at least 1", "pass -n 1 or more")
    with dist.session(task.device(args), args.local_rank) as ctx:
        dist.seed_all(args.seed, ctx.rank)
        data, model, ckpt, path = task.open(args, ctx, True)
        out_dir = task.run_dir(args, runs.ft_suffix(args.method, task.ft_method))
        evaluate_only = getattr(args, "evaluate", False)
        if not evaluate_only:  # a used folder is refused before the loaders and the conversion
            runs.claim_run_folder(out_dir, args, can_resume=False, root_flag=task.root_flag)
        train_loader, val_loader = task.loaders(args, data, ctx)
        if evaluate_only:  # the SNN on the test set (the original evaluated the ANN on the train set)
            return snn_eval(task, args, ctx, data, model, ckpt, path, script="snn_ft.py -e", loader=val_loader,
                            folder=runs.eval_dir(path, out_dir))
        net = convert(task, args, model, ckpt, ctx).to(ctx.device)
        return _finetune(task, args, ctx, data, model, net, path, out_dir, train_loader, val_loader)


def _finetune(task, args, ctx, data, model, net, init_path, out_dir, train_loader, val_loader) -> Dict:
    key = task.key
    layers = select_layers(net, args.ft_layers)  # a pattern that matches nothing: the error before any work
    runs.start_run(out_dir)
    bn_mode = args.ft_bn or getattr(model, "ft_bn_mode", "recalibrate")
    wd = args.weight_decay if args.weight_decay is not None else getattr(model, "ft_weight_decay", 1e-4)
    before = None
    if args.eval_before:
        log("SNN before fine-tuning:")
        before = run_snn(task, args, data, model, net, val_loader, ctx, desc="snn test (before)")
        log("  " + task.snn_line(before))
    loader = runs.ReshuffledLoader(train_loader)
    score = None if args.force else task.score(args, data, ctx, model, loader)
    log(f"fine-tuning {net.T}-step {'signed' if net.signed else 'unsigned'} SNN of {init_path}: {args.num_epochs} "
        f"epoch(s) per layer, lr {args.lr}, wd {wd}, BN {bn_mode}, method "
        + pipeline.method_text(args, args.max_iters, task.score_text(args)))
    t0 = time.time()
    with TensorBoard(os.path.join(out_dir, "tb") if args.tensorboard else None) as tb:
        history = pipeline.finetune(model, net, loader, score=score, inputs=task.inputs, epochs=args.num_epochs,
                                    lr=args.lr, momentum=args.momentum, weight_decay=wd, bn_mode=bn_mode,
                                    max_batches=args.max_iters, layers=layers,
                                    cache=FT_CACHE[args.ft_cache], cache_mb=args.ft_cache_mb, progress=args.progress,
                                    log=log, tb=tb, device=ctx.device, method=args.method,
                                    method_options=pipeline.finetune_options(args, task.e2e_losses(model)))
    seconds = time.time() - t0
    log("SNN after fine-tuning:")
    after = run_snn(task, args, data, model, net, val_loader, ctx, desc="snn test (after)")
    log("  " + task.snn_line(after))
    ckpt_path = os.path.join(out_dir, BEST)
    # the source ANN (not the tuned weights run as an ANN) is this SNN's reference: its figures,
    # measured beside the SNN on the same images, and its checkpoint go into the file
    pipeline.save_finetuned(ckpt_path, net, {
        **task.ft_meta(args, data, model, after), "init": init_path, key: after[key], f"ann_{key}": after[f"ann_{key}"],
        "ann_samples": after.get("samples"), "bn_mode": bn_mode, "epoch": args.num_epochs, "method": args.method,
        "method_options": pipeline.method_options(args), "seed": args.seed, "args": plain_args(args),
        "history": history})
    log(f"fine-tuned SNN (ANN-format state dict) -> {ckpt_path}")
    kept = (key, f"ann_{key}", f"per_step_{key}", "layers", *task.before_keys)
    rec = task.record(args, data, model, after, script="snn_ft.py", checkpoint=ckpt_path, finetuned=True,
                      init=init_path, ann_checkpoint=init_path, bn_mode=bn_mode, weight_decay=wd, method=args.method,
                      method_options=pipeline.method_options(args), finetune_seconds=seconds, finetune=history,
                      before={k: before.get(k) for k in kept} if before else None)
    runs.write_metrics(args, rec, os.path.join(out_dir, runs.metrics_name(after, "metrics_snn_ft")), task.plot)
    if before is not None:
        log(f"SNN {key} {before[key]:.2f} -> {after[key]:.2f} after fine-tuning (ANN {after[f'ann_{key}']:.2f})")
    return rec


# ---------------------------------------------------------------------------------------- drawing
def output_paths(files: Sequence[str], out_dir: str, suffixes: Sequence[str], flag: str) -> List[List[str]]:
    """Per input image, the files its drawings go to: ``<out_dir>/<stem><suffix>``, one name per input (the
    extension joins a stem two inputs share: ``x.jpg``, ``x.png`` -> ``x_jpg``, ``x_png``; a name still
    taken gets ``_2``, ``_3``, ...). Refused: a drawing that would replace an input, the folder of several
    inputs as the output folder (the drawings would mix with them and be read as inputs next time), and a
    single image drawn into its own folder over a file that exists there."""
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    shared = {s for s in stems if stems.count(s) > 1}
    taken, out = set(), []
    for f, s in zip(files, stems):
        name = os.path.basename(f).replace(".", "_") if s in shared else s
        base, k = name, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        out.append([os.path.join(out_dir, name + suffix) for suffix in suffixes])
    inputs = {os.path.realpath(f) for f in files}
    out_real = os.path.realpath(out_dir)
    clash = next((f for f, paths in zip(files, out) if any(os.path.realpath(p) in inputs for p in paths)), None)
    if clash is None and len(files) > 1:
        clash = next((f for f in files if os.path.dirname(os.path.realpath(f)) == out_real), None)
    if clash is not None:
        raise UserError(f"{flag} {out_dir} holds the input images ({os.path.basename(clash)}, ...): the drawings "
                        "would replace or mix with them", f"pass another {flag} folder")
    if any(os.path.dirname(os.path.realpath(f)) == out_real for f in files):   # one image, into its own folder
        existing = next((p for paths in out for p in paths if os.path.exists(p)), None)
        if existing is not None:
            raise UserError(f"{flag} {out_dir}: {os.path.basename(existing)} exists beside the input image (another "
                            "photo, or an earlier drawing)", f"pass another {flag} folder")
    return out


def predict(files: Sequence[str], read: Callable[[str], Any], draw: Callable[[str, Any, List[str]], List[str]],
            out_dir: str, *, suffixes: Sequence[str], flag: str, show_progress: bool = True) -> List[str]:
    """Draw a folder's predictions: ``draw(path, image, outputs)`` writes one image's drawings to the paths
    :func:`output_paths` gives it (one per suffix) and returns them; an image that cannot be read is
    skipped with a warning (:func:`common.runs.read_each`)."""
    dst = dict(zip(files, output_paths(files, out_dir, suffixes, flag)))
    os.makedirs(out_dir, exist_ok=True)
    written: List[str] = []
    for path, img in progress(runs.read_each(files, read), "predict", show_progress, total=len(files)):
        written += draw(path, img, dst[path])
    return written
