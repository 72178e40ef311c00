"""The detection workflows behind ``train.py`` (quantized YOLOv2: warm-up, step LR, multi-scale, EMA),
``eval.py`` (mAP of the ANN or, with ``--spike``, of its SNN), ``snn_ft.py`` and ``demo.py``.

Checkpoints carry the model's description (``version``, ``bit``, ``num_classes``, ``classes``,
``anchors``, ``width``, ``val_size``): the reading scripts rebuild exactly the trained net and take
those settings from it unless a flag gives them. The shared stages are :mod:`common.runner`'s.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
import time
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, dist, pipeline, runner, runs
from common.checkpoint import BEST, check_class_names, load_checkpoint
from common.cli import ArgumentParser, plain_args
from common.logger import log, progress
from common.metrics import write_json

from . import data as D
from .boxes import kmeans_anchors, postprocess
from .loss import build_targets, distill_loss, yolo_loss
from .metrics import DetectionMetric
from .models import CONF_THRESH, NMS_THRESH, STRIDE, VERSIONS, default_anchors, get_model
from .plots import plot_snn_metrics

BITS = (32, 5, 4, 3, 2)
DATASETS_TRAIN = ("voc", "coco")
DATASETS_EVAL = ("voc", "coco-val", "coco-test")
DEFAULT_VERSION = "yolov2_tiny"
FT_METHOD = "fastsnn"          # snn_ft.py's default --method (its run folder is <run>_ft)


# ---------------------------------------------------------------------------------------- flags
def add_model_args(p: ArgumentParser, bit_default: Optional[int], train: bool = False):
    """``-v``, ``--bit``, ``--width``, ``--init``. Scripts that read a trained checkpoint take the
    version, bits and width from it (``None`` defaults); ``bit_default`` then names the run folder of
    the default ``--init``."""
    ck = "" if train else "; default: the checkpoint's"
    p.add_argument("-v", "--version", default=DEFAULT_VERSION if train else None, choices=VERSIONS,
                   help=f"yolov2_tiny or yolov2_r34 (default {DEFAULT_VERSION}{ck})")
    p.add_argument("--bit", type=int, default=bit_default if train else None, choices=BITS, metavar="BIT",
                   help=f"activation bits: 32 (float ANN), 5, 4, 3, 2 (default {bit_default}{ck})")
    p.add_argument("--width", type=float, default=None,
                   help="channel multiplier (default 1.0 = the paper's nets; with --init: the checkpoint's)")
    p.add_argument("--init", default="", metavar="PATH", help="checkpoint to start from / to evaluate")
    p.set_defaults(bit_default=bit_default)


def add_data_args(p: ArgumentParser, datasets, default_dataset: str):
    p.add_argument("-d", "--dataset", default=default_dataset, choices=datasets, help="dataset (default %(default)s)")
    p.add_argument("-root", "--root", "--data_root", "--data-root", dest="data_root", default=D.DEFAULT_ROOT,
                   metavar="DIR", help="folder holding VOCdevkit/ or coco/ (default: the repository's data/)")
    p.add_argument("--classes", default="", metavar="FILE",
                   help="class names, one per line, for a VOC-format root with other classes (default: a "
                        "classes.txt / class_names.txt beside the data, else the checkpoint's, else the 20 VOC ones)")
    runs.add_workers_arg(p, "--num_workers", "--num-workers")


def add_runtime_args(p: ArgumentParser, train: bool = False):
    dist.add_dist_args(p)
    p.add_argument("--cuda", action="store_true", help="use the GPU (the default when there is one; "
                                                       "without one: a warning and the CPU)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars (rank 0)")
    p.add_argument("--metrics-out", "--metrics_out", dest="metrics_out", default="", metavar="FILE",
                   help="metrics JSON path (default: next to the checkpoint)")
    p.add_argument("--plot", action="store_true", help="write PNG figures next to the metrics JSON")
    p.add_argument("--max-iters", "--max_iters", "--max-batches", dest="max_iters", type=int, default=None,
                   help="cap the batches per epoch / evaluation (smoke tests)")
    p.add_argument("--save_folder", "--save-folder", dest="save_folder", default="weights/",
                   help="runs live in DIR/<dataset>/<version>_<bit>bit (default weights/)")
    # the scripts that do not train accept these (a command line shared by a chain's steps) unlisted
    shown = (lambda text: text) if train else (lambda text: argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=None, help=shown("random seed (default: not seeded)"))
    p.add_argument("--tensorboard", "--tfboard", dest="tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help=shown("TensorBoard logs in the run folder's tb/"))
    if train:
        runs.add_fresh_arg(p)


def add_size_arg(p: ArgumentParser):
    p.add_argument("-size", "--input_size", "--input-size", dest="input_size", type=int, default=None,
                   help="input size (default: the checkpoint's evaluation size, else 416)")


def add_post_args(p: ArgumentParser):
    p.add_argument("--conf_thresh", "--conf-thresh", dest="conf_thresh", type=float, default=CONF_THRESH,
                   help=f"score threshold before NMS (default {CONF_THRESH})")
    p.add_argument("--nms_thresh", "--nms-thresh", dest="nms_thresh", type=float, default=None,
                   help="NMS IoU threshold (default 0.5 yolov2_tiny, 0.6 yolov2_r34)")
    p.add_argument("--max_det", "--max-det", dest="max_det", type=int, default=100,
                   help="detections kept per image after NMS (default 100)")


def _device_arg(args) -> Optional[str]:
    if getattr(args, "cuda", False) and not torch.cuda.is_available() and args.device is None:
        dist.warn_once("--cuda: no GPU found, running on the CPU (slow)")
        return "cpu"
    return args.device


def check_size(flag: str, v: Optional[int]):
    if v is not None and (v < STRIDE or v % STRIDE):
        raise UserError(f"{flag} {v} is not a multiple of {STRIDE}", f"use a multiple of {STRIDE} (e.g. {max(STRIDE, round(v / STRIDE) * STRIDE)})")


def _check_read_args(args, spike: bool):
    """The flags of the scripts that read a trained checkpoint, before anything is loaded."""
    runs.check_positive(args, "batch_size", "max_iters", "score_batches", "num_epochs", "max_det")
    runs.check_non_negative(args, "workers", "lr", "momentum", "weight_decay")
    check_size("-size", args.input_size)
    for flag in ("conf_thresh", "nms_thresh", "vis_thresh"):
        v = getattr(args, flag, None)
        if v is not None and not 0 <= v <= 1:
            raise UserError(f"--{flag} {v} is not in [0, 1]", f"pass a score / IoU between 0 and 1 (e.g. --{flag} 0.5)")
    if getattr(args, "unsigned", False) and not spike:
        raise UserError("-u/--unsigned only applies to the SNN", "add --spike")
    if spike and args.bit == 32:
        raise UserError("--spike with --bit 32: a full-precision ANN has no activation clips to become thresholds",
                        "pass --bit 2/3/4/5 with a checkpoint trained at that bit-width")
    if getattr(args, "method", None) is not None:
        pipeline.check_method_args(args)


def _auto_count(spec: str) -> int:
    """K of ``--anchors auto`` (5) / ``auto:K``."""
    k = spec[5:] if spec.startswith("auto:") else ("5" if spec == "auto" else "")
    if not k.isdigit() or int(k) < 1:
        raise UserError(f"--anchors {spec}: not auto or auto:K with a positive whole number K",
                        "use e.g. --anchors auto:5")
    return int(k)


def parse_anchors(spec: Optional[str], dataset: str, train_ds=None, size: int = 416) -> List[List[float]]:
    """``voc`` / ``coco`` / ``auto`` (k-means of the training boxes at ``size``) / ``"w,h w,h ..."``."""
    if not spec:
        return default_anchors(dataset)
    if spec in ("voc", "coco"):
        return default_anchors(spec)
    if spec.startswith("auto"):
        k = _auto_count(spec)
        wh = D.train_box_sizes(train_ds) * (size / STRIDE)
        try:
            return kmeans_anchors(wh, k)
        except ValueError as e:
            raise UserError(f"--anchors {spec}: {e}", "use fewer anchors (auto:K) or give them explicitly") from None
    try:
        out = [[float(v) for v in pair.split(",")] for pair in spec.replace(";", " ").split()]
        assert out and all(len(a) == 2 and a[0] > 0 and a[1] > 0 for a in out)
    except (ValueError, AssertionError):
        raise UserError(f"--anchors {spec!r} is not a list of positive w,h pairs",
                        "use e.g. --anchors '1.2,2.0 2.8,4.6' (grid cells), voc, coco or auto") from None
    return out


# ---------------------------------------------------------------------------------------- checkpoints
def run_dir(args, suffix: str = "") -> str:
    return os.path.join(args.save_folder, args.dataset.split("-")[0], f"{args.version}_{args.bit}bit{suffix}")


def _meta(model, data: D.Data, args) -> dict:
    return {"version": model.version, "bit": model.bit, "width": model.width, "anchors": model.anchors,
            "num_classes": data.num_classes, "classes": data.classes, "dataset": data.name,
            "val_size": getattr(args, "val_size", None) or getattr(args, "input_size", None)}


def check_meta(ckpt: dict, path: str, version: str, num_classes: Optional[int], what: str,
               classes: Optional[List[str]] = None):
    """One-line errors for a checkpoint of another version, class count or class names."""
    v = ckpt.get("version")
    if v is not None and v != version:
        raise UserError(f"{what} {path} holds a {v} model, not -v {version}", f"pass -v {v}, or a {version} checkpoint")
    n = ckpt.get("num_classes")
    if n is not None and num_classes is not None and int(n) != int(num_classes):
        raise UserError(f"{what} {path} was trained for {n} classes but this dataset has {num_classes}",
                        "pass the matching -d / --classes, or a checkpoint trained on this dataset")
    check_class_names(ckpt.get("classes"), classes, what, path)


def _is_detector_state(sd: dict) -> bool:
    return any(k.startswith(("pred.", "module.pred.")) for k in sd)


def open_trained(args, what: str = "--init"):
    """Load the checkpoint to read (``--init``, default the run's ``model_best``) and take from it what
    the flags leave open: version, bits, evaluation size, classes. Returns ``(ckpt, path)``."""
    if args.version is None and not args.init:
        args.version = DEFAULT_VERSION
    if args.bit is None and not args.init:
        args.bit = args.bit_default
    if args.version is None or args.bit is None:
        ckpt = load_checkpoint(args.init, what, "pass --init PATH (a model_best.pth.tar of train.py / snn_ft.py)")
        args.version = args.version or ckpt.get("version") or DEFAULT_VERSION
        args.bit = args.bit if args.bit is not None else int(ckpt.get("bit") or 32)
    path = args.init or os.path.join(run_dir(args), BEST)
    ckpt = load_checkpoint(path, what, f"train it first (train.py -v {args.version} --bit {args.bit} ...) "
                                       "or pass --init PATH")
    if getattr(args, "input_size", 0) is None:
        args.input_size = runs.image_size_from(ckpt, "val_size", "input_size") or 416
        check_size(f"{path}'s evaluation size", args.input_size)
    if not args.classes and ckpt.get("classes") and getattr(args, "dataset", "voc") == "voc":
        args.checkpoint_classes = list(ckpt["classes"])
    return ckpt, path


def load_trained(args, num_classes: int, device, ckpt: dict, path: str, what: str = "--init",
                 classes: Optional[List[str]] = None):
    """Rebuild the detector a checkpoint holds (version / width / anchors from the checkpoint) and load
    it exactly (same activation bits). Returns ``(model, ckpt, path)``."""
    import quant
    sd = quant.strip_prefix(ckpt["state_dict"])
    if not _is_detector_state(sd):
        raise UserError(f"{what} {path} is not a detector checkpoint (no prediction layer 'pred')",
                        "pass a model_best.pth.tar written by detection/train.py or snn_ft.py")
    check_meta(ckpt, path, args.version, num_classes, what, classes)
    bit = ckpt.get("bit")
    has_clips = any(k.endswith("act_alpha") for k in sd)
    if bit is not None and int(bit) != args.bit:
        raise UserError(f"{what} {path} holds a {bit}-bit model but --bit {args.bit} was given",
                        f"pass --bit {bit}, or the {args.bit}-bit checkpoint")
    if args.bit != 32 and not has_clips:
        raise UserError(f"{what} {path} has no activation clips (act_alpha): it is a full-precision model",
                        f"train the {args.bit}-bit detector first (train.py --bit {args.bit} --init <higher-bit checkpoint>)")
    width = float(ckpt.get("width", args.width or 1.0))
    if args.width is not None and abs(args.width - width) > 1e-9:
        raise UserError(f"--width {args.width} differs from the checkpoint's {width}", "drop --width (it is read from the checkpoint)")
    anchors = ckpt.get("anchors") or default_anchors(args.dataset)
    model = get_model(args.version, num_classes, anchors, args.bit, width)
    n_pred = sd["pred.weight"].shape[0]
    if n_pred != len(anchors) * (5 + num_classes):
        raise UserError(f"{what} {path} predicts {n_pred} channels, not {len(anchors)} anchors x (5 + {num_classes} classes)",
                        "pass the checkpoint trained on this dataset (matching --classes)")
    try:
        quant.load_init(model, sd)
    except quant.CheckpointMismatchError as e:
        raise UserError(f"{what} {path} does not fit {args.version} (width {width}): {e}",
                        "check -v / --width, or pass the right checkpoint") from None
    model.classes = ckpt.get("classes")
    return model.to(device).eval(), ckpt, path


def load_teacher(args, data: D.Data, model, device) -> nn.Module:
    """``--teacher``: a trained detector of the same version, classes and anchors as the student (any bits),
    frozen in eval mode."""
    ckpt = load_checkpoint(args.teacher, "--teacher", "pass a model_best.pth.tar of train.py (e.g. the chain's 32-bit model)")
    targs = argparse.Namespace(**{**vars(args), "bit": int(ckpt.get("bit") or 32), "width": None})
    teacher = load_trained(targs, data.num_classes, device, ckpt, args.teacher, "--teacher", data.classes)[0]
    if [[float(v) for v in a] for a in teacher.anchors] != [[float(v) for v in a] for a in model.anchors]:
        raise UserError(f"--teacher {args.teacher} has the anchors {teacher.anchors}, the student {model.anchors}",
                        "give the student the teacher's anchors (--init a checkpoint of the teacher's chain, no --anchors)")
    teacher.requires_grad_(False)
    log(f"distilling from the {targs.bit}-bit {args.teacher} (weight {args.kd_weight})")
    return teacher


def _init_model(model, ckpt: dict, path: str, args, num_classes: int, classes: Optional[List[str]] = None):
    """``--init`` for training: a detector checkpoint of the same version (the bit chain: missing clips
    start at their defaults), or a backbone (ImageNet ResNet-34 of classification/ or torchvision)."""
    import quant
    sd = quant.strip_prefix(ckpt["state_dict"])
    if _is_detector_state(sd) or ckpt.get("version"):
        check_meta(ckpt, path, args.version, num_classes, "--init", classes)
        try:
            report = quant.load_init(model, sd)
        except quant.CheckpointMismatchError as e:
            raise UserError(f"--init {path} does not fit {args.version} (width {model.width}): {e}",
                            "pass the same --width as the checkpoint, or the right checkpoint") from None
        if report["missing_quantizer"]:
            start = next((m.alpha_init for m in model.modules() if isinstance(m, quant.QuantAct)), None)
            log(f"--init: {len(report['missing_quantizer'])} activation clips are not in {path}: they start at {start}")
        log(f"initialised from {path}")
        return
    prefix = {"fc.": None, "": "backbone."} if args.version == "yolov2_r34" else {"features.": "backbone.", "": "backbone."}
    if any(k.startswith("backbone.") for k in sd):
        prefix = None
    pipeline.load_backbone(model, sd, prefix_map=prefix, log=log, what="--init")


# ---------------------------------------------------------------------------------------- EMA
class ModelEMA:
    """Exponential moving average of the weights and BN statistics (yjh0410 / YOLOv5):
    ``decay(u) = 0.9999 * (1 - exp(-u / 2000))`` after ``u`` updates."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, updates

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        msd = model.state_dict()
        for k, v in self.ema.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


# ---------------------------------------------------------------------------------------- schedules
def ms_sizes(train_size: int) -> List[int]:
    """Multi-scale sizes: multiples of 32 from 0.5x to 0.95x ``train_size`` (640 -> 320, 352, ..., 608)."""
    lo, hi = math.ceil(0.5 * train_size / STRIDE), math.floor(0.95 * train_size / STRIDE)
    return [k * STRIDE for k in range(lo, max(lo, hi) + 1)]


def milestones(epochs: int) -> List[int]:
    """150 and 200 of the original's 250 epochs (60 % / 80 %)."""
    return sorted({m for m in (round(epochs * 0.6), round(epochs * 0.8)) if 0 < m < epochs})


def base_lr(args, epoch: int) -> float:
    return args.lr * (0.1 ** sum(epoch >= m for m in milestones(args.epochs)))


# ---------------------------------------------------------------------------------------- data
def _data(args, need_train: bool, need_val: bool, train_size: int, val_size: int) -> D.Data:
    return D.build_datasets(args.dataset, args.data_root, train_size=train_size, val_size=val_size,
                            classes_file=args.classes, classes=getattr(args, "checkpoint_classes", None),
                            need_train=need_train, need_val=need_val, aug=getattr(args, "aug", "ssd"))


def make_metric_fn(model, data: D.Data, args, on_val: bool = True):
    """The metric factory: COCO's AP through COCOeval on the COCO val set, else (and for other images, e.g.
    the fine-tuning score's training batches: ``on_val=False``) the VOC mAP."""
    nms = args.nms_thresh if getattr(args, "nms_thresh", None) is not None else NMS_THRESH[model.version]
    coco = data.val.coco if on_val and data.val is not None else None

    def make():
        return DetectionMetric(data.num_classes, model.anchors, data.classes, getattr(args, "conf_thresh", CONF_THRESH),
                               nms, getattr(args, "max_det", 100), coco=coco)
    return make


def _record(args, script: str, model, data: D.Data, res: dict, checkpoint: str, **extra) -> dict:
    rec = {"script": script, "dataset": args.dataset, "version": model.version, "bit": model.bit,
           "width": model.width, "num_classes": data.num_classes, "classes": data.classes, "anchors": model.anchors,
           "checkpoint": checkpoint, "map": None, "ann_map": None, "per_step_map": [], "T": None, "neuron": None,
           "layers": [], "sops": None}
    rec.update(res)
    rec.update(extra)
    return runs.stamp(rec, args)


# ---------------------------------------------------------------------------------------- train.py
def _check_train_args(args):
    runs.check_positive(args, "epochs", "batch_size", "eval_epoch", "max_iters", "iters_per_epoch")
    runs.check_non_negative(args, "workers", "momentum", "weight_decay", "start_epoch", "wp_epoch")
    for n in ("train_size", "val_size"):
        check_size(f"--{n}", getattr(args, n))
    if args.lr <= 0:
        raise UserError(f"--lr {args.lr} must be positive", "pass e.g. --lr 1e-3")
    if args.anchors and args.anchors.startswith("auto"):
        _auto_count(args.anchors)
    elif args.anchors:
        parse_anchors(args.anchors, args.dataset)
    if args.width is not None and not args.width > 0:
        raise UserError(f"--width {args.width} must be positive", "pass e.g. --width 0.5")
    if args.mosaic:
        dist.warn_once("--mosaic is accepted for compatibility and unused (as in the original)")
    runs.check_non_negative(args, "kd_weight")
    if args.teacher and not os.path.isfile(args.teacher):
        raise UserError(f"--teacher {args.teacher} does not exist", "pass a model_best.pth.tar of train.py")


def train(args) -> dict:
    _check_train_args(args)
    with dist.session(_device_arg(args), args.local_rank) as ctx:
        dist.seed_all(args.seed, ctx.rank)
        runs.check_amp(args.amp, ctx.device)
        out_dir = run_dir(args)
        resume, rckpt, ickpt = runner.open_run(args, out_dir)
        meta_src = rckpt or ickpt or {}
        if not args.classes and meta_src.get("classes") and args.dataset == "voc":
            args.checkpoint_classes = list(meta_src["classes"])
        data = _data(args, True, True, args.train_size, args.val_size)
        runner.hint_small_data("detection", len(data.train), bool(args.init or rckpt))
        if rckpt is not None:
            check_meta(rckpt, resume, args.version, data.num_classes, "--resume", data.classes)
            if int(rckpt.get("bit", args.bit)) != args.bit:
                raise UserError(f"--resume {resume} holds a {rckpt['bit']}-bit run but --bit {args.bit} was given",
                                f"pass --bit {rckpt['bit']}")
        width = args.width if args.width is not None else float(meta_src.get("width", 1.0))
        if args.anchors:
            anchors = parse_anchors(args.anchors, args.dataset, data.train, args.train_size)
        else:
            anchors = meta_src.get("anchors") or default_anchors(args.dataset)
        model = get_model(args.version, data.num_classes, anchors, args.bit, width, args.alpha_init).to(ctx.device)
        log(f"{args.version} {args.bit}-bit (width {width}) on {data.name}: {data.num_classes} classes, "
            f"{len(data.train)} train / {len(data.val)} test images, "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, anchors {anchors}, "
            f"{ctx.world_size} process(es) on {ctx.device}")
        if args.init and rckpt is None:
            _init_model(model, ickpt, args.init, args, data.num_classes, data.classes)
        teacher = load_teacher(args, data, model, ctx.device) if args.teacher else None
        optimizer = runs.make_optimizer(model.parameters(), args.optimizer, args.lr, args.momentum, args.weight_decay)
        ema = ModelEMA(model) if args.ema else None
        start, best, history = args.start_epoch, None, []
        if rckpt is not None:
            start, best, history = runner.resume(rckpt, resume, ctx, model, optimizer, best_name="best_map",
                                                 label="mAP", what=args.version, weights="model_state")
            if ema is not None:
                import quant
                ema = ModelEMA(model, updates=int(rckpt.get("ema_updates", 0)))
                ema.ema.load_state_dict(quant.strip_prefix(rckpt["state_dict"]))
        ddp = dist.wrap_ddp(runner.sync_bn(model, ctx, args.sybn), ctx)
        train_loader = D.make_loader(data.train, ctx, args.batch_size, args.workers, True,
                                     seed=args.seed or 0, drop_last=True)
        val_loader = D.make_loader(data.val, ctx, args.batch_size, args.workers, False)
        sizes = ms_sizes(args.train_size)
        iters = min([len(train_loader)] + [n for n in (args.max_iters, args.iters_per_epoch) if n is not None])
        if iters == 0:
            raise UserError(f"the training set ({len(data.train)} images) is smaller than one batch per process",
                            "lower --batch_size or use more images")
        warm = 0 if args.no_warmup else args.wp_epoch * iters
        log(f"epochs {start}->{args.epochs} of {iters} batch(es), lr {args.lr} x0.1 at {milestones(args.epochs)}, "
            f"warm-up {warm} iters"
            + (f", multi-scale {sizes[0]}-{sizes[-1]}" if args.multi_scale else f", size {args.train_size}")
            + (", EMA" if ema else ""))
        make_metric = make_metric_fn(model, data, args)

        def train_epoch(epoch, tb):
            D.set_epoch(train_loader, epoch)
            ddp.train()
            lr = base_lr(args, epoch)
            meters = dict.fromkeys(("loss", "conf", "cls", "box", "iou") + (("kd",) if teacher else ()), 0.0)
            n, t0, size = 0, time.time(), args.train_size
            bar = progress(train_loader, f"epoch {epoch + 1}/{args.epochs}", args.progress, total=iters)
            for i, batch in enumerate(bar):
                if i >= iters:
                    break
                D.check_batch(batch)
                it = epoch * iters + i
                cur = lr * (it / warm) ** 4 if it < warm else lr
                for g in optimizer.param_groups:
                    g["lr"] = cur
                if args.multi_scale and i % 10 == 0:
                    size = random.Random((args.seed or 0) * 1000003 + it).choice(sizes)  # same on every rank
                images = batch["image"].to(ctx.device, non_blocking=True)
                if images.shape[-1] != size:
                    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
                targets = build_targets(batch["boxes"], batch["labels"], model.anchors, (size, size))
                pred = runs.amp_forward(ddp, images, args.amp)
                loss, parts = yolo_loss(pred, targets, model.anchors, (size, size))
                if teacher is not None:
                    with torch.no_grad():
                        teacher_pred = runs.amp_forward(teacher, images, args.amp)
                    kd = distill_loss(pred, teacher_pred)
                    loss = loss + args.kd_weight * kd
                    parts["kd"] = float(kd.detach())
                runs.check_finite(loss, epoch + 1, i + 1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if ema is not None:
                    ema.update(model)
                meters["loss"] += float(loss.detach())
                for k, v in parts.items():
                    meters[k] += v
                n += 1
                if hasattr(bar, "set_postfix") and i % 5 == 0:
                    bar.set_postfix(loss=f"{meters['loss'] / n:.3f}", lr=f"{cur:.2e}", size=size)
                tb.scalars(it, "train/", loss=float(loss.detach()), lr=cur, **parts)
            avg = [v / ctx.world_size for v in dist.all_reduce_sum([v / max(n, 1) for v in meters.values()])]
            return {"lr": lr, **{f"train_{k}": v for k, v in zip(meters, avg)}, "seconds": time.time() - t0}

        def evaluate(epoch):
            res = pipeline.evaluate(ema.ema if ema is not None else model, val_loader, make_metric, inputs=D.inputs,
                                    device=ctx.device, progress=args.progress, desc=f"test {epoch + 1}",
                                    max_batches=args.max_iters)
            return {"test_map": res["map"], "test_map_all_point": res["map_all_point"],
                    "test_map_agnostic": res.get("map_agnostic"), "test_naming_acc": res.get("naming_acc")}

        def state(done, best, history):
            return {**_meta(model, data, args), "epoch": done, "best_map": best,
                    "state_dict": (ema.ema if ema is not None else model).state_dict(),
                    "model_state": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "ema_updates": ema.updates if ema is not None else 0, "train_size": args.train_size,
                    "rng_state": runner.rng_states(ctx), "args": plain_args(args), "history": history}
        return runner.train(
            args, ctx, out_dir, start=start, best=best, history=history, key="test_map", best_name="best_map",
            train_epoch=train_epoch, evaluate=evaluate, state=state, summary={"version": args.version, "bit": args.bit},
            every=args.eval_epoch, label="test mAP (%)", title=f"{args.version} {args.bit}-bit",
            result=lambda top: {"map": top.get("test_map"), "ann_map": top.get("test_map"),
                                "map_all_point": top.get("test_map_all_point"), "map_agnostic": top.get("test_map_agnostic"),
                                "naming_acc": top.get("test_naming_acc")},
            record=lambda res, history: _record(args, "train.py", model, data, res, os.path.join(out_dir, BEST),
                                                history=history))


# ---------------------------------------------------------------------------------------- eval.py
def _ap_lines(full: dict) -> List[str]:
    """Per-class AP (and COCO's AP family) of one metric dict."""
    lines = [f"  AP {c:<14s} {'-' if ap is None else f'{ap:6.2f}'}" for c, ap in full.get("ap", {}).items()]
    if "coco" in full:
        lines.append("  COCO " + " ".join(f"{k} {v:.2f}" for k, v in full["coco"].items()))
    return lines


def _open(args, ctx, *, train: bool):
    """The checkpoint, the data of its classes and the model it holds."""
    ckpt, path = open_trained(args)
    data = _data(args, train, True, args.input_size, args.input_size)
    model, ckpt, path = load_trained(args, data.num_classes, ctx.device, ckpt, path, classes=data.classes)
    return data, model, ckpt, path


def evaluate(args) -> dict:
    _check_read_args(args, args.spike)
    with dist.session(_device_arg(args), args.local_rank) as ctx:
        data, model, ckpt, path = _open(args, ctx, train=False)
        loader = D.make_loader(data.val, ctx, args.batch_size, args.workers, False)
        if args.dataset == "coco-test":
            return _coco_test(args, model, ckpt, data, loader, make_metric_fn(model, data, args), path, ctx)
        return runner.evaluate(TASK, args, ctx, data, model, ckpt, path, script="eval.py", loader=loader)


def _ann_result(args, data, model, full: dict) -> dict:
    res = {**full, "ann_map": full["map"], "per_step_map": []}
    log("\n".join(_ap_lines(res) + [f"mAP {res['map']:.2f} (VOC07 11-point {res['map_voc07']:.2f}, all-point "
                                     f"{res['map_all_point']:.2f}){_diagnosis(res)}"]))
    return res


def _diagnosis(res: dict) -> str:
    """Finding vs naming the objects (detection.metrics.finding_and_naming), for the log line."""
    if res.get("map_agnostic") is None or res.get("naming_acc") is None:
        return ""
    return f"; objects found (class-agnostic AP50) {res['map_agnostic']:.2f}, named right {res['naming_acc']:.2f} %"


def _flatten(res: dict) -> dict:
    """The SNN record's keys: the SNN's per-class AP and finding / naming figures, the ANN's as ``ann_*``."""
    snn, ann = res.get("snn") or {}, res.get("ann") or {}
    out = {**res, "ap": snn.get("ap", res.get("ap")), "per_step_map_all_point": None}
    for k in ("map_agnostic", "naming_acc", "confusion"):
        out[k], out[f"ann_{k}"] = snn.get(k), ann.get(k)
    return out


@torch.no_grad()
def _coco_test(args, model, ckpt, data, loader, make_metric, path, ctx) -> dict:
    """COCO test-dev has no public annotations: write the detections JSON for the evaluation server."""
    fwd = runner.convert(TASK, args, model, ckpt, ctx) if args.spike else model
    metric = make_metric()
    for i, batch in enumerate(progress(loader, "coco test-dev", args.progress)):
        if args.max_iters is not None and i >= args.max_iters:
            break
        metric.update(fwd(D.inputs(batch).to(ctx.device)), batch)
    images = metric._gathered()
    out = args.metrics_out or os.path.join(runs.eval_dir(path, run_dir(args)), "detections_test-dev2017_results.json")
    if dist.is_main():
        write_json(out, metric.results_coco(images), env=False)
        log(f"{len(images)} test-dev images -> {out} (submit it to the COCO evaluation server)")
    return {"results": out, "images": len(images)}


# ---------------------------------------------------------------------------------------- snn_ft.py
def e2e_yolo_loss(anchors):
    """The end-to-end loss ``--e2e-loss yolo``: the YOLO training loss of the SNN's predictions against the
    batch's ground-truth boxes (at the batch's image size)."""
    def loss(out, ann_out, batch):
        size = tuple(batch["image"].shape[-2:])
        targets = build_targets(batch["boxes"], batch["labels"], anchors, size)
        return yolo_loss(out, targets, anchors, size)[0]
    return loss


def _score(args, data, ctx, model, loader):
    """The accept / revert score: the SNN's mAP on the first --score-batches training images, without
    augmentation."""
    plain = D.DetectionDataset(data.train.records, args.input_size, False, data.classes, data.name)
    score_loader = D.make_loader(plain, ctx, args.batch_size, args.workers, False)
    make_metric = make_metric_fn(model, data, args, on_val=False)   # training images: not in the val COCO set
    return lambda net: pipeline.evaluate(net, score_loader, make_metric, inputs=D.inputs, device=ctx.device,
                                         progress=False, max_batches=args.score_batches)["map"]


def _loaders(args, data, ctx):
    train = None if data.train is None else D.make_loader(data.train, ctx, args.batch_size, args.workers, True,
                                                          seed=args.seed or 0)
    return train, D.make_loader(data.val, ctx, args.batch_size, args.workers, False)


def _snn_line(res: dict) -> str:
    return "\n".join(_ap_lines(res.get("snn") or res) + [
        f"SNN mAP {res['map']:.2f} (ANN {res['ann_map']:.2f}), {res['neuron']} IF, T={res['T']}{_diagnosis(res)}; per step "
        + " ".join(f"{m:.1f}" for m in res["per_step_map"])])


TASK = runner.Task(
    name="detection", key="map", ft_method=FT_METHOD, open=lambda args, ctx, train: _open(args, ctx, train=train),
    run_dir=run_dir, loaders=_loaders, make_metric=lambda args, data, model: make_metric_fn(model, data, args),
    record=lambda args, data, model, res, *, script, checkpoint, **extra: _record(
        args, script, model, data, res, checkpoint, input_size=args.input_size, **extra),
    plot=plot_snn_metrics, snn_line=_snn_line, score=_score,
    score_text=lambda args: f"the mAP of {args.score_batches} training batches",
    ft_meta=lambda args, data, model, res: {**_meta(model, data, args), "best_map": res["map"]},
    e2e_losses=lambda model: {"yolo": e2e_yolo_loss(model.anchors)},
    flatten=_flatten,
    inputs=D.inputs, device=_device_arg,
    ann_result=_ann_result)


def finetune(args) -> dict:
    _check_read_args(args, True)
    return runner.finetune(TASK, args)


# ---------------------------------------------------------------------------------------- demo.py
@torch.no_grad()
def demo(args) -> List[str]:
    _check_read_args(args, args.spike)
    files = runs.image_files(args.path, "--path")
    from torchvision.utils import draw_bounding_boxes
    from PIL import Image
    with dist.session(_device_arg(args), None) as ctx:
        ckpt, path = open_trained(args)
        classes = D.read_classes(args.classes) if args.classes else (ckpt.get("classes") or list(D.VOC_CLASSES))
        model, ckpt, path = load_trained(args, len(classes), ctx.device, ckpt, path, classes=classes)
        fwd = runner.convert(TASK, args, model, ckpt, ctx) if args.spike else model
        nms = args.nms_thresh if args.nms_thresh is not None else NMS_THRESH[model.version]
        tf = D.eval_transform(args.input_size)

        def draw(f, img, outputs):
            h, w = img.shape[-2:]
            x = tf(img).unsqueeze(0).to(ctx.device)
            det = postprocess(fwd(x), model.anchors, (args.input_size, args.input_size), args.vis_thresh, nms,
                              args.max_det)[0]
            boxes = det["boxes"].cpu() * torch.tensor([w, h, w, h])
            labels = [f"{classes[int(l)]} {float(s):.2f}" for l, s in zip(det["labels"], det["scores"])]
            colors = [_colour(int(l)) for l in det["labels"]]
            drawn = draw_bounding_boxes(img, boxes, labels=labels, colors=colors, width=max(1, round(min(h, w) / 150))) \
                if len(labels) else img  # (torchvision warns on an empty box list)
            dst = outputs[0]
            Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(dst)
            log(f"{f}: {len(labels)} boxes -> {dst}" + (f" ({', '.join(labels[:5])}{', ...' if len(labels) > 5 else ''})"
                                                        if labels else ""))
            return [dst]
        return runner.predict(files, D.read_image, draw, args.out, suffixes=[".png"], flag="--out",
                              show_progress=getattr(args, "progress", True))


def _colour(k: int):
    from common.scenes import voc_colormap
    c = voc_colormap(64)[(k % 63) + 1]
    return tuple(int(v) for v in c)
