"""The classification workflows behind the CIFAR and ImageNet scripts: :func:`train_ann` (``main.py``),
:func:`evaluate_snn` (``snn.py``), :func:`finetune_snn` (``snn_ft.py``).

A :class:`Task` says what differs between datasets (archs, loaders, LR schedule); the stages shared with
detection and segmentation are :mod:`common.runner`'s, with the top-k metric of :mod:`classification.metrics`.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, dist, pipeline, runner, runs
from common.checkpoint import BEST, CHECKPOINT, load_checkpoint, load_scheduler_state, \
    plain_scheduler_state
from common.cli import ArgumentParser, plain_args
from common.logger import log
from common.pipeline import add_snn_args  # noqa: F401 - the conversion flags of snn.py / snn_ft.py
from common.pipeline import check_method, check_method_args, method_options  # noqa: F401
from common.runner import FT_CACHE, select_layers  # noqa: F401

from . import engine
from .metrics import TopK, format_acc
from .plots import plot_snn_metrics

BITS = (32, 5, 4, 3, 2)
FT_METHOD = "fastsnn+e2e"      # snn_ft.py's default --method (its run folder is <arch>_<bit>bit_ft)
WBITS = (2, 3, 4, 5, 6, 7, 8, 32)


# ---------------------------------------------------------------------------------------- task description
@dataclass
class Data:
    """What a task's data builder returns."""

    name: str
    num_classes: int
    train_loader: object
    val_loader: object
    info: dict = field(default_factory=dict)


@dataclass
class Task:
    """Dataset-specific parts of the workflows."""

    name: str                                   # "cifar10", "imagenet"
    model_dataset: str                          # get_model(dataset=...): "cifar" / "imagenet"
    archs: Sequence[str]
    default_arch: str
    build_data: Callable[[object, dist.Context], Data]
    milestones: Callable[[int], List[int]]      # epochs -> LR decay epochs (x0.1 each)
    input_size: int = 32
    extra_args: Optional[Callable[[ArgumentParser], None]] = None   # task-specific flags (e.g. data paths)
    train_script: str = "main.py"               # the script that trains the ANN (named in error hints)
    # sub-folder of --out for this run's dataset ("" = --out itself; CIFAR-10 keeps the original's
    # result/<arch>_<bit>bit, every other dataset gets result/<dataset>/<arch>_<bit>bit)
    namespace: Callable[[object], str] = lambda args: ""
    dataset_name: Callable[[object], str] = lambda args: ""  # the Data.name a run will have (before loading)


# ---------------------------------------------------------------------------------------- command line
SCRIPTS = ("train", "snn", "ft")


default_workers = runs.default_workers


def add_common_args(p: ArgumentParser, task: Task, *, bit_default: int, print_freq_default: int = 10,
                    lr_default: Optional[float] = 0.1, lr_help: str = "initial learning rate",
                    wd_default: Optional[float] = 1e-4, init_help: str = "", script: str = "train"):
    """The flags of a classification script (seed flags first). ``script``: ``"train"`` (main.py /
    dali_main.py), ``"snn"`` (snn.py) or ``"ft"`` (snn_ft.py) -- each script lists only the flags it uses."""
    if script not in SCRIPTS:
        raise ValueError(f"script must be one of {SCRIPTS}, not {script!r}")
    train, ft = script == "train", script == "ft"
    p.add_argument("-a", "--arch", default=task.default_arch, choices=task.archs, metavar="ARCH",
                   help=f"model: {', '.join(task.archs)} (default {task.default_arch})")
    p.add_argument("--bit", type=int, default=bit_default, choices=BITS, metavar="BIT",
                   help=(f"activation bits: 32 (float ANN), 5, 4, 3, 2 (default {bit_default})" if train else
                         f"activation bits of the ANN to convert: 5, 4, 3, 2 (T = 2^bit - 1; default {bit_default})"))
    p.add_argument("--wbit", type=int, default=None, choices=WBITS, metavar="WBIT",
                   help="hidden-weight bits (default: " + ("the model's own rule, see classification.models)"
                                                          if train else "the checkpoint's)"))
    if train:
        p.add_argument("--alpha-init", type=float, default=None, metavar="A",
                       help="initial activation clip of the quantizers (default: the model's own, 8 for alex / "
                            "vgg11, 6 otherwise); clips missing from an --init checkpoint start here")
    dist.add_dist_args(p)
    if train:
        p.add_argument("--epochs", type=int, default=300, help="training epochs (default 300)")
        p.add_argument("--start-epoch", type=int, default=0, help="manual epoch number to start at (LR schedule)")
    p.add_argument("-b", "--batch-size", type=int, default=128,
                   help="batch size per process (default 128)" + ("" if train or ft else "; evaluation uses "
                                                                  "--test-batch-size"))
    p.add_argument("--test-batch-size", type=int, default=100, help="evaluation batch size (default 100)")
    if train or ft:
        p.add_argument("--lr", "--learning-rate", dest="lr", type=float, default=lr_default,
                       help=f"{lr_help} (default {lr_default})")
        p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
        p.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=wd_default,
                       help=f"weight decay (default {wd_default if wd_default is not None else 'per model'})")
    if train:
        p.add_argument("-p", "--print-freq", type=int, default=print_freq_default,
                       help=f"progress update every N iterations (default {print_freq_default})")
        p.add_argument("--resume", default="", metavar="PATH|auto",
                       help="continue a killed run from its checkpoint (model, optimizer, schedule, RNG states; "
                            "'auto': the run folder's checkpoint.pth.tar, if there is one)")
        runs.add_amp_arg(p)
    if train or ft:
        runs.add_fresh_arg(p)
    p.add_argument("-e", "--evaluate", action="store_true",
                   help={"train": "evaluate only (writes metrics_ann_eval.json beside the checkpoint)",
                         "snn": "accepted for compatibility: this script always evaluates",
                         "ft": "only evaluate the SNN of --init on the test set"}[script])
    p.add_argument("--init", default="", metavar="PATH", help=init_help or "checkpoint to initialise from")
    if train or ft:
        p.add_argument("--seed", type=int, default=None,
                       help="random seed of Python / NumPy / torch and the loader order (default: not seeded)")
    p.add_argument("-j", "--workers", type=int, default=default_workers(),
                   help="data-loading processes per process (default: min(4, CPU cores / processes on this node)"
                        f" = {default_workers()} here)")
    p.add_argument("--out", "--save_folder", "--save-folder", dest="out", default="result", metavar="DIR",
                   help="output root, relative to the working directory; runs go to DIR/<arch>_<bit>bit "
                        "(CIFAR-10) or DIR/<dataset>/<arch>_<bit>bit (default result/)")
    p.add_argument("--metrics-out", default="", metavar="FILE",
                   help="metrics JSON path (default: " + ("in the run folder" if train else
                                                          "beside the evaluated checkpoint") + ")")
    p.add_argument("--plot", action="store_true", help="write PNG figures next to the metrics JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bars (rank 0; display only: the numbers do not depend on it)")
    if train or ft:
        p.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                       help="TensorBoard logs in the run folder's tb/ (rank 0)")
    p.add_argument("--max-iters", type=int, default=None,
                   help={"train": "cap iterations per epoch (smoke tests)",
                         "snn": "evaluate only the first N test batches (smoke tests)",
                         "ft": "cap the fine-tuning batches per layer (smoke tests, the prefix cache)"}[script])
    if task.extra_args is not None:
        task.extra_args(p)
    return p


def check_args(args):
    runs.check_positive(args, "epochs", "batch_size", "test_batch_size", "print_freq", "chunk", "max_iters")
    runs.check_non_negative(args, "workers", "lr", "weight_decay", "momentum")
    check_method_args(args)


def run_dir(args, suffix: str = "") -> str:
    """``<out>/<arch>_<bit>bit<suffix>`` for CIFAR-10 (the original's ``result/alex_4bit`` layout),
    ``<out>/<dataset>/<arch>_<bit>bit<suffix>`` for every other dataset (``args.run_namespace``, set by
    :func:`setup_run`): runs of the same arch on two datasets never share a folder."""
    return os.path.join(args.out, getattr(args, "run_namespace", "") or "", f"{args.arch}_{args.bit}bit{suffix}")


def setup_run(args, task: Task):
    """What every workflow does first: the task's names for error hints and run folders, the
    checks of the flags, the seed-compatible checkpoint paths."""
    args.train_script = task.train_script
    args.run_namespace = task.namespace(args)
    check_args(args)
    if getattr(args, "init", ""):
        args.init = resolve_checkpoint_path(args, args.init)
    if getattr(args, "resume", "") not in ("", "auto"):
        args.resume = resolve_checkpoint_path(args, args.resume)


def resolve_checkpoint_path(args, path: str) -> str:
    """Runs of datasets other than CIFAR-10 live in ``<out>/<dataset>/``; the original's commands name
    ``result/<arch>_<bit>bit/...`` (e.g. the ImageNet README's ``--init result/alexnet_4bit/model_best.pth.tar``).
    A path under ``--out`` that does not exist but has a twin in the dataset's folder means that twin."""
    ns = getattr(args, "run_namespace", "")
    if not path or not ns or os.path.exists(path):
        return path
    rel = os.path.relpath(path, args.out)
    if rel.startswith(os.pardir) or rel.split(os.sep)[0] == ns:
        return path
    twin = os.path.join(args.out, ns, rel)
    if os.path.exists(twin):
        log(f"{path}: using {twin} ({ns} runs live in {os.path.join(args.out, ns)}/)")
        return twin
    return path


# ---------------------------------------------------------------------------------------- models and weights
def build_model(args, task: Task, num_classes: int) -> nn.Module:
    from classification.models import get_model
    try:
        return get_model(args.arch, bit=args.bit, wbit=args.wbit, num_classes=num_classes,
                         dataset=task.model_dataset, alpha_init=getattr(args, "alpha_init", None))
    except ValueError as e:
        raise UserError(str(e), "see --help for the supported --arch / --bit / --wbit values") from None


def _script(args) -> str:
    """The task's ANN training script, for error hints (set by the workflow entry points)."""
    return getattr(args, "train_script", "main.py")


def _check_meta(ckpt: dict, args, path: str, what: str, same_bit: bool, data: Optional["Data"] = None,
                same_data: bool = False):
    """The flags must describe the checkpoint: its recorded arch (always), bits and weight bits
    (``same_bit``: the checkpoint *is* this model), class count (with ``data``) and dataset
    (``same_data``: resume / evaluation). One-line errors naming what differs."""
    arch = ckpt.get("arch")
    if arch is not None and arch != args.arch:
        raise UserError(f"{what} {path} was trained as --arch {arch}, not --arch {args.arch}",
                        f"pass --arch {arch}, or a checkpoint of --arch {args.arch}")
    bit = ckpt.get("bit")
    if same_bit and bit is not None and int(bit) != args.bit:
        if int(bit) == 32:
            hint = (f"train the {args.bit}-bit ANN from it first ({_script(args)} --bit {args.bit} --init {path})"
                    if getattr(args, "run_kind", "train") != "train" or getattr(args, "evaluate", False)
                    else f"pass --bit 32 to continue that run, or use the file as --init of a new {args.bit}-bit run")
        else:
            hint = (f"pass --bit {bit}, or the {args.bit}-bit checkpoint "
                    f"(train it with {_script(args)} --bit {args.bit})")
        raise UserError(f"{what} {path} holds a {bit}-bit model but --bit {args.bit} was given", hint)
    wbit = ckpt.get("wbit")
    if same_bit and wbit is not None and args.wbit is not None and int(wbit) != int(args.wbit):
        raise UserError(f"{what} {path} was trained with {wbit}-bit weights but --wbit {args.wbit} was given",
                        f"drop --wbit (the checkpoint's {wbit} bits are used) or pass --wbit {wbit}")
    if data is not None:
        n = ckpt.get("num_classes")
        if n is not None and int(n) != data.num_classes:
            raise UserError(f"{what} {path} holds a {n}-class model ({ckpt.get('dataset', '?')}), but this run's "
                            f"data ({data.name}) has {data.num_classes} classes",
                            ("pass a checkpoint of a " + data.name + " run, or another --out for this run")
                            if what == "--resume" else f"pass a checkpoint trained on {data.name}")
        ds = ckpt.get("dataset")
        if same_data and ds is not None and ds != data.name:
            raise UserError(f"{what} {path} was trained on {ds}, but this run uses {data.name}",
                            f"pass the data of {ds} (--dataset / data path), or a checkpoint trained on {data.name}")


def load_weights(model: nn.Module, path: str, args, *, what: str = "--init", same_bit: bool = False,
                 hint: Optional[str] = None, ckpt: Optional[dict] = None, data: Optional[Data] = None) -> dict:
    """Load a checkpoint into ``model`` with the ``--init`` semantics (``quant.load_init``: missing
    clips start at their defaults). ``same_bit``: the checkpoint must be *this* model -- same bit,
    every activation / weight clip present and none left over."""
    import quant
    if ckpt is None:
        ckpt = load_checkpoint(path, what, hint)
    _check_meta(ckpt, args, path, what, same_bit, data)
    try:
        report = quant.load_init(model, ckpt["state_dict"])
    except quant.CheckpointMismatchError as e:
        raise UserError(f"{what} {path} does not fit this {args.arch} {args.bit}-bit model ({e})",
                        "check --arch / --bit / --wbit and the dataset's class count against the checkpoint, "
                        "or pass the right file") from None
    missing, extra = report["missing_quantizer"], report["ignored_quantizer"]
    if same_bit and any(k.endswith("act_alpha") for k in missing):
        raise UserError(f"{what} {path} has no activation clips (act_alpha) for this {args.bit}-bit model: "
                        "it holds a full-precision or differently built ANN",
                        f"train the {args.bit}-bit ANN first ({_script(args)} --bit {args.bit} --init <higher-bit checkpoint>)")
    if same_bit and (missing or extra):
        keys = ", ".join((missing or extra)[:3])
        raise UserError(f"{what} {path} was trained with other weight bits than this model "
                        f"(weight clips {'missing' if missing else 'unexpected'}: {keys})",
                        "pass the --wbit it was trained with")
    if missing:
        log(f"{what}: {len(missing)} quantizer clips not in the checkpoint, initialised to their defaults")
    return ckpt


def load_trained(args, task: Task, data: Data, device, path: str, what: str, hint: str,
                 raw_as_init: bool = False):
    """Build the model a trained checkpoint holds and load it: its recorded arch / bits / weight bits,
    class count and dataset must be the flags' (``--wbit`` defaults to the checkpoint's), every clip
    present (see :func:`load_weights`). ``raw_as_init``: a file without that record (a plain state
    dict, e.g. torchvision's weights) is loaded with the ``--init`` semantics instead (missing clips
    at their defaults: ``main.py -e`` of a float model at ``--bit``). Returns ``(model, ckpt)``."""
    ckpt = load_checkpoint(path, what, hint)
    exact = not (raw_as_init and ckpt.get("bit") is None)
    _check_meta(ckpt, args, path, what, same_bit=True, data=data, same_data=True)
    if args.wbit is None and ckpt.get("wbit") is not None:
        args.wbit = int(ckpt["wbit"])
    model = build_model(args, task, data.num_classes).to(device)
    load_weights(model, path, args, what=what, same_bit=exact, ckpt=ckpt, data=data)
    if not exact:
        log(f"{path} records no arch / bits: loaded as --init (quantizer clips it lacks start at their defaults)")
    return model, ckpt


def _set_lr(optimizer, scheduler, milestones: List[int], epoch: int):
    """Put the step schedule at ``epoch``: lr = base * 0.1^(milestones passed)."""
    scheduler.milestones = collections.Counter(milestones)
    scheduler.last_epoch = epoch
    factor = scheduler.gamma ** bisect.bisect_right(sorted(milestones), epoch)
    for g, base in zip(optimizer.param_groups, scheduler.base_lrs):
        g["lr"] = base * factor
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


# ---------------------------------------------------------------------------------------- metrics records
def _record(args, data: Data, model: nn.Module, result: Dict, *, script: str, checkpoint: str,
            finetuned: bool = False, **extra) -> Dict:
    rec = {"script": script, "dataset": data.name, "arch": args.arch, "bit": args.bit,
           "wbit": getattr(model, "wbit", None), "num_classes": data.num_classes, "split": "test",
           "T": None, "neuron": None, "samples": None, "top1": None, "top5": None, "ann_top1": None,
           "ann_top5": None, "per_step_top1": [], "layers": [], "sops": None, "snn_macs": None,
           "ann_macs": None, "energy": None}
    rec.update(result)
    rec.update(checkpoint=checkpoint, finetuned=finetuned, seed=getattr(args, "seed", None), **extra)
    return runs.stamp(rec, args)


def _ann_result(model: nn.Module, task: Task, top1: float, top5: float, samples: Optional[int]) -> Dict:
    macs = runs.count_macs(model, task.input_size)
    return {"top1": top1, "top5": top5, "ann_top1": top1, "ann_top5": top5, "samples": samples,
            "ann_macs": macs, "energy": runs.ann_energy(macs)}


# ---------------------------------------------------------------------------------------- main.py
def train_ann(args, task: Task) -> Dict:
    """``main.py``: train the ANN (or ``-e``: evaluate it). Returns the metrics record."""
    args.run_kind = "train"
    setup_run(args, task)
    with dist.session(args.device, args.local_rank) as ctx:
        dist.seed_all(args.seed, ctx.rank)
        runs.check_amp(args.amp, ctx.device)
        data = task.build_data(args, ctx)
        out_dir = run_dir(args)
        if args.evaluate:
            return _evaluate_ann(args, task, data, ctx, out_dir)
        model = build_model(args, task, data.num_classes).to(ctx.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        milestones = task.milestones(args.epochs)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        generators = runs.loader_generators(data.train_loader)
        start, best, history = _resume_or_init(args, model, optimizer, scheduler, out_dir, milestones, data, ctx,
                                               generators)
        log(f"{args.arch} {args.bit}-bit (weights {model.wbit}-bit) on {data.name}: "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {ctx.world_size} process(es) "
            f"on {ctx.device}; epochs {start}->{args.epochs}, lr {args.lr} x0.1 at {milestones} -> {out_dir}")
        train_epoch, evaluate = engine.epoch_steps(dist.wrap_ddp(model, ctx), model, data.train_loader, data.val_loader,
                                                   optimizer, scheduler, print_freq=args.print_freq,
                                                   show_progress=args.progress, max_iters=args.max_iters, amp=args.amp)

        def state(done, best_acc1, hist):
            return {"arch": args.arch, "bit": args.bit, "wbit": model.wbit, "num_classes": data.num_classes,
                    "dataset": data.name, "epoch": done, "best_acc1": best_acc1, "state_dict": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": plain_scheduler_state(scheduler),
                    "rng_state": runner.rng_states(ctx, generators),  # collective: every rank
                    "seed": args.seed, "args": plain_args(args), "history": hist}
        return runner.train(
            args, ctx, out_dir, start=start, best=best, history=history, key="test_top1", best_name="best_acc1",
            train_epoch=train_epoch, evaluate=evaluate, state=state,
            summary={"arch": args.arch, "bit": args.bit, "dataset": data.name}, first=args.start_epoch,
            label="top-1 (%)", train_key="train_top1", title=f"{args.arch} {args.bit}-bit on {data.name}",
            start_flag="--start-epoch",
            result=lambda top: _ann_result(model, task, top["test_top1"], top["test_top5"], None),
            record=lambda res, _: _record(args, data, model, res, script="main.py", checkpoint=os.path.join(out_dir, BEST)))


def _resume_or_init(args, model, optimizer, scheduler, out_dir, milestones, data, ctx, generators):
    """Returns ``(start_epoch, best_acc1, history)`` after ``--resume`` / ``--init`` / ``--start-epoch``."""
    path, ckpt, init_ckpt = runner.open_run(args, out_dir, root_flag="--out")
    if path:
        _check_meta(ckpt, args, path, "--resume", same_bit=True, data=data, same_data=True)
        wbit = ckpt.get("wbit")
        if wbit is not None and int(wbit) != model.wbit:
            raise UserError(f"--resume {path} was trained with {wbit}-bit weights, this model has {model.wbit}-bit",
                            f"pass --wbit {wbit}")
        done = runner.resume(ckpt, path, ctx, model, optimizer, best_name="best_acc1", label="top-1",
                             what=f"{args.arch} {args.bit}-bit", generators=generators, root_flag="--out")
        if "scheduler" in ckpt:
            load_scheduler_state(scheduler, ckpt["scheduler"])
        _set_lr(optimizer, scheduler, milestones, done[0])
        return done
    if args.init:
        ck = load_weights(model, args.init, args, what=getattr(args, "init_flag", "--init"), data=data,
                          hint="train that stage first, or check the path", ckpt=init_ckpt)
        if ck.get("dataset") not in (None, data.name):
            log(f"--init {args.init} was trained on {ck['dataset']}; this run trains on {data.name}")
        log(f"initialised from {args.init}")
    if args.start_epoch:
        _set_lr(optimizer, scheduler, milestones, args.start_epoch)
    return args.start_epoch, None, []


def _evaluate_ann(args, task, data, ctx, out_dir) -> Dict:
    path = args.init or (os.path.join(out_dir, CHECKPOINT) if args.resume == "auto" else args.resume) \
        or os.path.join(out_dir, BEST)
    model, ckpt = load_trained(args, task, data, ctx.device, path, "checkpoint",
                               f"pass --init PATH, or train first ({task.train_script} without -e)", raw_as_init=True)
    res = engine.evaluate(model, data.val_loader, nn.CrossEntropyLoss(), desc="test", show_progress=args.progress)
    return runner.write_ann_eval(runner_task(task), args, data, model, ckpt, path, script="main.py -e",
                                 res=_ann_result(model, task, res["top1"], res["top5"], res["samples"]), loss=res["loss"])


# ---------------------------------------------------------------------------------------- snn.py / snn_ft.py
def open_trained(args, task: Task, ctx, data: Optional[Data] = None):
    """``(data, model, ckpt, path)``: the task's data (built unless given) and the trained ANN of ``--init``
    (default: the run's model_best) in eval mode."""
    runner.check_convertible(args)
    data = data or task.build_data(args, ctx)
    path = args.init or os.path.join(run_dir(args), BEST)
    model, ckpt = load_trained(args, task, data, ctx.device, path, "--init",
                               f"train it first ({task.train_script} --arch {args.arch} --bit {args.bit} ...) or pass --init PATH")
    return data, model.eval(), ckpt, path


def ann_reference(res: Dict, ckpt: dict) -> Dict:
    """The ANN figures of an SNN evaluation. For a fine-tuned checkpoint the ANN run beside the SNN holds
    the *tuned* weights (their BN statistics recalibrated to SNN rates): that is not the ANN anybody
    trained. ``ann_top1`` / ``ann_top5`` are then the source ANN's, recorded by snn_ft.py in the file
    (``None`` for files written before they were), and the other figures are kept as
    ``finetuned_weights_ann_top1`` / ``_top5``."""
    if not ckpt.get("snn_finetuned"):
        return res
    res = dict(res)
    res["finetuned_weights_ann_top1"], res["finetuned_weights_ann_top5"] = res["ann_top1"], res["ann_top5"]
    res["ann_top1"], res["ann_top5"] = ckpt.get("ann_top1"), ckpt.get("ann_top5")
    res["ann_checkpoint"] = ckpt.get("init")
    res["ann_samples"] = ckpt.get("ann_samples")
    return res


def _snn_line(res: Dict) -> str:
    if "finetuned_weights_ann_top1" in res:
        ann = ("source ANN " + (f"{res['ann_top1']:.2f}" if res["ann_top1"] is not None else "not recorded")
               + (f" ({res['ann_checkpoint']})" if res.get("ann_checkpoint") else "")
               + f"; the fine-tuned weights run as an ANN: {res['finetuned_weights_ann_top1']:.2f}")
    else:
        ann = f"ANN {res['ann_top1']:.2f}"
    return f"SNN top-1 {res['top1']:.2f} ({ann}); per step " + " ".join(f"{a:.1f}" for a in res["per_step_top1"])


def _flatten(res: Dict) -> Dict:
    """:func:`common.pipeline.evaluate_snn`'s dict as the record's keys (``top5`` / ``ann_top5`` added);
    prints the ``* Acc@1 .. Acc@5 ..`` line."""
    snn_res, ann_res = res.pop("snn"), res.pop("ann")
    res.update(top5=snn_res["top5"], ann_top5=ann_res["top5"])
    log(format_acc(res["top1"], res["top5"]))
    return res


def cross_entropy_loss(out, ann_out, batch):
    """The end-to-end loss ``--e2e-loss ce``: cross-entropy of the SNN's logits with the batch's labels."""
    return F.cross_entropy(out, batch[1].to(out.device))


def _score(args, data, ctx, model, loader):
    """The accept / revert score: the SNN's train top-1 on a pass over the training set (the original's
    test), or on ``--score-batches`` N batches drawn once -- every decision then compares the SNN before
    and after on the same images (the first N batches of a new shuffle each time made it an unpaired
    comparison, whose noise at N = 8, about 2 points, decided about as many layers as the tuning did)."""
    batches = loader if args.score_batches is None else engine.fixed_batches(loader, args.score_batches)
    return engine.top1_score(batches, show_progress=args.progress)


def runner_task(task: Task) -> runner.Task:
    """The classification task as the shared stages see it (:mod:`common.runner`)."""
    return runner.Task(
        name="classification", key="top1", ft_method=FT_METHOD, root_flag="--out",
        open=lambda args, ctx, train: open_trained(args, task, ctx), run_dir=run_dir,
        loaders=lambda args, data, ctx: (data.train_loader, data.val_loader),
        make_metric=lambda args, data, model: TopK.factory(), record=_record, plot=plot_snn_metrics, snn_line=_snn_line,
        score=_score, flatten=_flatten, reference=ann_reference, before_keys=("top5",),
        score_text=lambda args: "the train top-1 (" + ("the whole training set" if args.score_batches is None
                                                       else f"{args.score_batches} batches") + ")",
        ft_meta=lambda args, data, model, res: {
            "arch": args.arch, "bit": args.bit, "wbit": model.wbit, "num_classes": data.num_classes,
            "dataset": data.name, "best_acc1": res["top1"], "ann_top5": res["ann_top5"]},
        e2e_losses=lambda model: {"ce": cross_entropy_loss})


def evaluate_snn(args, task: Task) -> Dict:
    """``snn.py``: convert the ANN and evaluate the SNN on the test set (``-e`` or not). The metrics go
    beside the evaluated checkpoint (or to ``--metrics-out``)."""
    args.run_kind = "snn"
    setup_run(args, task)
    pipeline.tune_malloc_if_asked(args, log)
    rt = runner_task(task)
    with dist.session(args.device, args.local_rank) as ctx:
        data, model, ckpt, path = rt.open(args, ctx, False)
        return runner.snn_eval(rt, args, ctx, data, model, ckpt, path, script="snn.py", loader=data.val_loader)


def finetune_snn(args, task: Task) -> Dict:
    """``snn_ft.py``: layer-wise fine-tuning of the converted SNN (``-e``: only evaluate the SNN)."""
    args.run_kind = "ft"
    setup_run(args, task)
    return runner.finetune(runner_task(task), args)


def add_finetune_args(p: ArgumentParser):
    p.add_argument("--ft-lr", dest="lr", type=float, help="alias of --lr (fine-tuning learning rate)")
    runner.add_finetune_args(
        p, method=FT_METHOD, losses=("ce", "kl", "mse"), default_loss="ce",
        loss_help="loss of the end-to-end stage: ce = cross-entropy with the labels (default; the best measured, "
                  "docs/fidelity.md), kl = KL divergence to the quantized ANN's logits, mse = squared error to them",
        score_default=None, score_help="without --force: judge each tuning step on N training batches, drawn once "
                                       "and the same for every decision (default: a pass over the whole training "
                                       "set, the original's)",
        e2e_epochs=3, e2e_epochs_help="epochs of the end-to-end stage, each kept only if the accept / revert score "
                                      "improves (default 3: the best measured, docs/fidelity.md)")
