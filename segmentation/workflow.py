"""The segmentation workflows behind ``train.py`` (quantized DeepLab: SGD, poly LR per iteration,
cross-entropy ignoring 255), ``eval.py`` (mIoU of the ANN or, with ``--spike``, of its SNN),
``snn_ft.py`` and ``inference.py`` (colour masks and overlays).

This module supplies the models, the data, the loss and the metric; the shared stages are
:mod:`common.runner`'s.
"""
from __future__ import annotations

import argparse
import copy
import os
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import UserError, dist, pipeline, runner, runs
from common.checkpoint import BEST, check_class_names, load_checkpoint
from common.cli import ArgumentParser, plain_args
from common.logger import log, progress
from common.runs import count_macs, sgd_step

from . import data as segdata
from .metrics import DIAGNOSIS, IGNORE, make_metric_factory
from .models import MODELS, OUTPUT_STRIDE, classifier_weight_key, get_model
from .plots import plot_metrics

BITS = (32, 5, 4, 3, 2)
DATASETS = ("voc", "coco")
DEFAULT_MODEL = "deeplabv1_vgg9"
FT_METHOD = "fastsnn"          # snn_ft.py's default --method (its run folder is <run>_ft)
DEFAULT_ROOT = {"voc": "data/VOCdevkit", "coco": "data/coco"}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
TASK_NAME = "segmentation"


# ---------------------------------------------------------------------------------------- command line
def add_common_args(p: ArgumentParser, *, bit_default: Optional[int] = 32, init_help: str = "",
                    script: str = "train", lr_default: float = 0.007):
    """The flags of a segmentation script: data, model, run folder, output for all; the training flags
    (``script="train"`` / ``"ft"``) only where they are used. Scripts that read a trained checkpoint take
    its model, bits and width unless given."""
    train, reads = script in ("train", "ft"), script != "train"
    ck = "; default: the checkpoint's" if reads else ""
    p.add_argument("--config", default="", metavar="NAME|FILE",
                   help="a preset of segmentation/configs/ (e.g. voc_deeplabv1_2bit, coco_deeplabv3_T7) or a JSON "
                        "file of flag values, checked like the flags; flags given on the command line override it")
    p.add_argument("-d", "--dataset", default="voc", choices=DATASETS, help="voc (default) or coco")
    p.add_argument("-root", "--data_root", "--data-root", dest="data_root", default=None, metavar="DIR",
                   help="dataset root (default data/VOCdevkit for voc: VOC2012/ in it; data/coco for coco: "
                        "train2017/, val2017/, annotations/)")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class names, one per line, background first (a VOC-layout root of your own; default: the "
                        "root's classes_seg.txt / class_names.txt (also beside its VOCdevkit/), else the 21 VOC "
                        "classes; COCO: its categories)")
    p.add_argument("--mask_cache", "--mask-cache", dest="mask_cache", default=None, metavar="DIR",
                   help="COCO: where the class masks drawn from the instances are cached (default <data_root>/seg_masks)")
    p.add_argument("-m", "--model", "-v", "--version", dest="model", default=None if reads else DEFAULT_MODEL,
                   choices=MODELS, help=f"deeplabv1_vgg9 or deeplabv3_r34 (default {DEFAULT_MODEL}{ck})")
    p.add_argument("--bit", type=int, default=None if reads else bit_default, choices=BITS,
                   help=f"activation bits: 32 (float ANN), 5, 4, 3, 2 (default {bit_default}{ck})")
    p.add_argument("--width", type=float, default=None,
                   help="channel multiplier (default 1.0: the paper's nets; with --init: the checkpoint's)")
    p.add_argument("--fov-dilation", "--fov_dilation", dest="fov_dilation", type=int, default=None, metavar="D",
                   help="deeplabv1_vgg9: dilation of the LargeFOV layer features.7 (default 12, the paper's, for "
                        "513-pixel inputs; below about 200 pixels its outer taps read only padding: 1 suits 64-128 px"
                        + (ck or "; with --init of a segmentation checkpoint: its own") + ")")
    p.add_argument("--init", default="", metavar="PATH", help=init_help or "checkpoint to initialise from")
    p.add_argument("--test_size", "--test-size", dest="test_size", type=int, default=None,
                   help="evaluation images are padded to this square (default 513 VOC / 641 COCO; k * stride + 1)")
    p.add_argument("--test_batch_size", "--test-batch-size", dest="test_batch_size", type=int, default=4,
                   help="evaluation batch per process (default 4)")
    p.add_argument("--val-subset", "--val_subset", dest="val_subset", type=int, default=None, metavar="N",
                   help="use the first N validation images")
    # the training flags: listed by the scripts that use them; the others accept them (a command line
    # shared by every script of a chain) without listing them
    shown = (lambda text: text) if train else (lambda text: argparse.SUPPRESS)
    p.add_argument("--alpha-init", "--alpha_init", dest="alpha_init", type=float, default=None,
                   help=shown("initial activation clip of the quantizers (default 6); clips missing from --init start here"))
    p.add_argument("--crop_size", "--crop-size", dest="crop_size", type=int,
                   default=segdata.DEFAULT_CROP if train else None,
                   help=shown("training crop (default 513; must be k * output stride + 1)"))
    p.add_argument("--scales", type=float, nargs="+", default=None, metavar="S",
                   help=shown("random rescaling factors of the training images (default 0.5 0.75 ... 2.0, the "
                              "paper's; small images of fixed-size objects train better on e.g. 0.75 1 1.25)"))
    p.add_argument("--batch_size", "--batch-size", "-b", dest="batch_size", type=int, default=8,
                   help=shown("training batch per process (default 8)"))
    p.add_argument("--lr", type=float, default=lr_default, help=shown(f"learning rate (default {lr_default})"))
    p.add_argument("--momentum", type=float, default=0.9, help=shown("SGD momentum (default 0.9)"))
    p.add_argument("--weight_decay", "--weight-decay", "--wd", dest="weight_decay", type=float, default=1e-4,
                   help=shown("weight decay (default 1e-4)"))
    p.add_argument("--train-subset", "--train_subset", dest="train_subset", type=int, default=None, metavar="N",
                   help=shown("use the first N training images"))
    p.add_argument("--seed", type=int, default=None, help=shown("random seed (default: not seeded)"))
    p.add_argument("--tensorboard", "--tfboard", dest="tensorboard", action=argparse.BooleanOptionalAction,
                   default=True, help=shown("TensorBoard logs in the run folder's tb/ (rank 0)"))
    if train:
        p.add_argument("--max-iters", "--max_iters", dest="max_iters", type=int, default=None,
                       help="cap the iterations per epoch / fine-tuning batches per layer (smoke tests)")
        runs.add_fresh_arg(p)
    else:
        p.add_argument("--max-iters", "--max_iters", "--max-batches", "--max_batches", dest="max_iters", type=int,
                       default=None, help="evaluate only the first N batches (smoke tests)")
    p.add_argument("--save_folder", "--save-folder", dest="save_folder", default="weights", metavar="DIR",
                   help="runs go to DIR/<dataset>/<model>_<bit>bit (default weights)")
    runs.add_workers_arg(p, "--num_workers")
    p.add_argument("--metrics-out", "--metrics_out", dest="metrics_out", default="", metavar="FILE",
                   help="metrics JSON path (default: in the run folder / beside the evaluated checkpoint)")
    p.add_argument("--plot", action="store_true", help="write PNG figures next to the metrics JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars (rank 0)")
    dist.add_dist_args(p)
    p.set_defaults(bit_default=bit_default)
    return p


#: flags of the training / fine-tuning scripts: a preset may set them, the scripts without them skip them
SCRIPT_KEYS = {"epochs", "power", "eval_epoch", "sybn", "resume", "max_iters", "spike", "unsigned", "T", "chunk",
               "settle", "max_batches", "num_epochs", "force", "score_batches", "ft_bn", "eval_before", "input",
               "output", "tune_malloc", "method", "e2e_batches", "e2e_loss", "e2e_epochs", "e2e_lr", "ft_accept",
               "local_batches", "alpha_init", "crop_size", "scales", "batch_size", "lr", "momentum", "weight_decay",
               "train_subset", "seed", "tensorboard", "fresh", "ft_layers", "ft_cache", "ft_cache_mb", "min_steps",
               "channels_last", "amp"}


def preset_path(name: str) -> str:
    """A JSON file, or a preset name -- also spelled as the original's config path
    (``configs/voc_deeplabv1_2bit.py``)."""
    if os.path.isfile(name) and not name.endswith(".py"):
        return name
    stem = os.path.splitext(os.path.basename(name))[0] if name.endswith((".py", ".json")) else os.path.basename(name)
    path = os.path.join(CONFIG_DIR, stem + ".json")
    if not os.path.isfile(path):
        known = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".json")) if os.path.isdir(CONFIG_DIR) else []
        raise UserError(f"--config {name}: no such preset or file",
                        f"choose one of {', '.join(known[:6])}, ... (segmentation/configs/) or pass a JSON file")
    return path


def parse_args(p: ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse with ``--config`` presets (:func:`common.runs.parse_with_config`: the preset's values are
    checked like flags, command-line flags win). ``{save_folder}`` in a preset's paths is the run's
    ``--save_folder``."""
    args, cfg = runs.parse_with_config(p, argv, preset_path, SCRIPT_KEYS)
    if isinstance(args.init, str) and "{save_folder}" in args.init:
        args.init = args.init.replace("{save_folder}", args.save_folder)
    args.config_values = cfg
    return args


def check_fit(model: str, *sizes: Tuple[str, Optional[int]]):
    """One-line error for an input size (flag, value) that ``model``'s output stride does not fit."""
    stride = OUTPUT_STRIDE[model]
    for flag, v in sizes:
        if v is not None and (v < stride + 1 or (v - 1) % stride):
            k = max(1, round((v - 1) / stride))
            raise UserError(f"{flag} {v} does not fit {model} (output stride {stride}: the logits are "
                            f"upsampled to in * {stride} - {stride - 1})",
                            f"use k * {stride} + 1, e.g. {k * stride + 1}")


def check_scales(scales: Optional[List[float]]):
    if scales is not None and not all(0 < s <= 8 for s in scales):
        raise UserError(f"--scales {' '.join(f'{s:g}' for s in scales)}: every factor must be in (0, 8]",
                        "pass e.g. --scales 0.75 1 1.25")


def check_args(args, model_name: Optional[str] = None):
    """The flags, before any data or checkpoint is read (a model left to the checkpoint is checked
    against the default model's stride here and against its own in :func:`settle_from_checkpoint`)."""
    name = model_name or args.model or DEFAULT_MODEL
    runs.check_positive(args, "batch_size", "test_batch_size", "max_iters", "num_epochs", "score_batches", "epochs",
                        "eval_epoch")
    runs.check_non_negative(args, "workers")
    if args.width is not None and not (args.width > 0):
        raise UserError(f"--width {args.width} must be positive", "pass e.g. --width 0.25 for a small net")
    if args.fov_dilation is not None:
        if args.fov_dilation < 1:
            raise UserError(f"--fov-dilation {args.fov_dilation} must be at least 1", "pass e.g. --fov-dilation 1")
        if name != "deeplabv1_vgg9":
            raise UserError(f"--fov-dilation with --model {name}: only deeplabv1_vgg9 has a LargeFOV layer",
                            "drop --fov-dilation or pass -m deeplabv1_vgg9")
    if args.test_size is None:
        args.test_size = segdata.DEFAULT_TEST_SIZE[args.dataset]
    check_scales(args.scales)
    check_fit(name, ("--crop_size", args.crop_size), ("--test_size", args.test_size))
    for name in ("lr", "weight_decay", "momentum"):
        v = getattr(args, name, None)
        if v is not None and v < 0:
            raise UserError(f"--{name} {v} must not be negative", "pass a value >= 0")
    if args.data_root is None:
        args.data_root = DEFAULT_ROOT[args.dataset]
    if getattr(args, "method", None) is not None:
        pipeline.check_method_args(args)


def settle_from_checkpoint(args, ckpt: dict):
    """What the flags leave open comes from the checkpoint to read: model, bits, width."""
    if args.model is None:
        args.model = ckpt.get("model") if ckpt.get("model") in OUTPUT_STRIDE else DEFAULT_MODEL
        check_args(args)
    if args.bit is None:
        args.bit = int(ckpt.get("bit") or 32)
    if args.width is None and ckpt.get("width") is not None:
        args.width = float(ckpt["width"])
    if args.fov_dilation is None and ckpt.get("fov_dilation") is not None:
        args.fov_dilation = int(ckpt["fov_dilation"])


def open_trained(args, what: str = "--init"):
    """Load the checkpoint a reading script evaluates (``--init``, default the run's ``model_best``) and
    take its settings. Returns ``(ckpt, path)``."""
    if not args.init:
        args.model = args.model or DEFAULT_MODEL
        args.bit = args.bit if args.bit is not None else args.bit_default
    path = args.init or os.path.join(run_dir(args), BEST)
    ckpt = load_checkpoint(path, what, f"train it first (segmentation/train.py -m {args.model or DEFAULT_MODEL} "
                                       f"--bit {args.bit or args.bit_default} ...) or pass --init PATH")
    settle_from_checkpoint(args, ckpt)
    return ckpt, path


def run_dir(args, suffix: str = "", bit: Optional[int] = None) -> str:
    """``<save_folder>/<dataset>/<model>_<bit>bit<suffix>``."""
    return os.path.join(args.save_folder, args.dataset, f"{args.model}_{args.bit if bit is None else bit}bit{suffix}")


# ---------------------------------------------------------------------------------------- data
def build_data(args, *, train: bool, ctx=None) -> segdata.SegData:
    ctx = ctx or dist.context()
    data = segdata.build_datasets(args.dataset, args.data_root, crop_size=args.crop_size or segdata.DEFAULT_CROP,
                                  test_size=args.test_size, classes=args.classes,
                                  class_names=getattr(args, "checkpoint_classes", None), mask_cache=args.mask_cache, train=train,
                                  train_subset=args.train_subset, val_subset=args.val_subset,
                                  scales=args.scales or segdata.SCALES)
    log(f"data: {args.dataset} at {data.info.get('root')}: "
        + (f"{len(data.train)} train ({data.info.get('train')}) / " if data.train is not None else "")
        + f"{len(data.val)} val images ({data.info.get('val')}), {data.num_classes} classes")
    return data


def val_loader(args, data, ctx=None):
    return segdata.make_loader(data.val, args.test_batch_size, train=False, workers=args.workers, ctx=ctx)


def train_loader(args, data, ctx=None):
    return segdata.make_loader(data.train, args.batch_size, train=True, workers=args.workers, ctx=ctx, seed=args.seed)


# ---------------------------------------------------------------------------------------- models / checkpoints
def build_model(args, num_classes: int, device=None, *, bit: Optional[int] = None, width: Optional[float] = None):
    try:
        m = get_model(args.model, num_classes, args.bit if bit is None else bit,
                      width=(args.width or 1.0) if width is None else width, alpha_init=args.alpha_init,
                      fov_dilation=args.fov_dilation)
    except ValueError as e:
        raise UserError(str(e), "see --help for --model / --bit / --width") from None
    return m.to(device) if device is not None else m


def ckpt_classes(ckpt: dict, model_name: str) -> Optional[int]:
    """The class count a checkpoint was trained for (its metadata, else its classifier's shape)."""
    if ckpt.get("num_classes") is not None:
        return int(ckpt["num_classes"])
    import quant
    sd = quant.strip_prefix(ckpt["state_dict"])
    w = sd.get(classifier_weight_key(model_name))
    return int(w.shape[0]) if w is not None else None


def check_ckpt(ckpt: dict, path: str, what: str, args, num_classes: int, *, same_bit: bool,
               names: Optional[List[str]] = None):
    """One-line errors for a checkpoint of another task, model, class count or names, width or bit-width
    (``same_bit``: the checkpoint must be this very model)."""
    other = ckpt.get("version") or (ckpt.get("arch") if not ckpt.get("model") else None) or \
        (ckpt.get("task") if ckpt.get("task") not in (None, TASK_NAME) else None)   # a detector, classifier, backbone
    if same_bit and other:
        raise UserError(f"{what} {path} is not a segmentation checkpoint (it holds a {other} model)",
                        "pass a model_best.pth.tar written by segmentation/train.py or snn_ft.py")
    name = ckpt.get("model")
    if name is not None and name != args.model:
        raise UserError(f"{what} {path} holds a {name} model, not --model {args.model}",
                        f"pass --model {name} or the {args.model} checkpoint")
    n = ckpt_classes(ckpt, args.model)
    if n is not None and n != num_classes:
        raise UserError(f"{what} {path} was trained for {n} classes but the data has {num_classes}",
                        "pass the --dataset / --classes it was trained with, or a checkpoint of these classes")
    check_class_names(ckpt.get("class_names"), names, what, path)
    if ckpt.get("width") is not None and float(ckpt["width"]) != float(args.width or 1.0):
        raise UserError(f"{what} {path} holds a --width {ckpt['width']} model, not --width {args.width}",
                        f"pass --width {ckpt['width']}")
    fov = ckpt.get("fov_dilation")
    if same_bit and fov is not None and args.fov_dilation is not None and int(fov) != args.fov_dilation:
        raise UserError(f"{what} {path} holds a --fov-dilation {fov} model, not --fov-dilation {args.fov_dilation}",
                        f"pass --fov-dilation {fov} (or leave it out: the checkpoint's is used)")
    if same_bit and ckpt.get("bit") is not None and int(ckpt["bit"]) != args.bit:
        raise UserError(f"{what} {path} holds a {ckpt['bit']}-bit model but --bit {args.bit} was given",
                        f"pass --bit {ckpt['bit']}, or the {args.bit}-bit checkpoint (train.py --bit {args.bit})")


def is_own_checkpoint(ckpt: dict, model: nn.Module) -> bool:
    """A segmentation checkpoint of this model (the bit chain, strict) rather than a backbone."""
    if ckpt.get("task") == TASK_NAME:
        return True
    import quant
    from quant.layers import QUANTIZER_PARAMS
    sd = quant.strip_prefix(ckpt["state_dict"])
    own = [k for k in model.state_dict() if k.rsplit(".", 1)[-1] not in QUANTIZER_PARAMS]
    return all(k in sd for k in own)


def init_weights(model: nn.Module, args, num_classes: int, ckpt: Optional[dict] = None,
                 names: Optional[List[str]] = None):
    """``--init``: a segmentation checkpoint of this model loads strictly (``quant.load_init``: only
    quantizer clips may be missing -- the bit chain); anything else (an ImageNet / torchvision
    ResNet-34, a VGG) is a backbone, loaded by ``common.pipeline.load_backbone`` (matching names and
    shapes; it prints what was loaded / initialised and refuses shape mismatches). ``torchvision``
    fetches torchvision's ImageNet ResNet-34 weights (online)."""
    import quant
    if args.init == "torchvision":
        from common.pretrained import pretrained_state_dict
        if args.model != "deeplabv3_r34":
            raise UserError("--init torchvision needs --model deeplabv3_r34 (a ResNet-34 backbone)",
                            "pass a local state-dict file for the VGG-9 (the original used pretrain/vgg9.pth)")
        try:
            sd = pretrained_state_dict("resnet34", "torchvision")
        except RuntimeError as e:
            raise UserError(str(e).split(";")[0], "save the weights to a file and pass --init FILE") from None
        pipeline.load_backbone(model, sd, log=log)
        return {"mode": "backbone", "source": "torchvision resnet34"}
    ckpt = ckpt or load_checkpoint(args.init, "--init", "train that stage first, or check the path")
    if is_own_checkpoint(ckpt, model):
        check_ckpt(ckpt, args.init, "--init", args, num_classes, same_bit=False, names=names)
        try:
            rep = quant.load_init(model, ckpt["state_dict"])
        except quant.CheckpointMismatchError as e:
            raise UserError(f"--init {args.init}: {e}", "pass a checkpoint of the same --model / --width") from None
        if rep["missing_quantizer"]:
            log(f"--init: {len(rep['missing_quantizer'])} activation clips not in the checkpoint, initialised to "
                f"their defaults")
        log(f"initialised from {args.init}")
        return {"mode": "strict", "source": args.init}
    width = float(args.width or 1.0)
    if ckpt.get("width") is not None and float(ckpt["width"]) != width:   # e.g. a pretrain.py backbone
        raise UserError(f"--init {args.init} holds a --width {float(ckpt['width']):g} backbone, not --width {width:g}",
                        f"pass --width {float(ckpt['width']):g}")
    pipeline.load_backbone(model, ckpt["state_dict"], log=log)
    return {"mode": "backbone", "source": args.init}


def load_trained(args, num_classes: int, device, path: str, what: str, hint: str = "", ckpt: Optional[dict] = None,
                 names: Optional[List[str]] = None):
    """Build the model of a trained checkpoint and load it exactly (same bit, all clips)."""
    import quant
    ckpt = ckpt or load_checkpoint(path, what, hint)
    settle_from_checkpoint(args, ckpt)
    check_ckpt(ckpt, path, what, args, num_classes, same_bit=True, names=names)
    model = build_model(args, num_classes, device)
    try:
        rep = quant.load_init(model, ckpt["state_dict"])
    except quant.CheckpointMismatchError as e:
        raise UserError(f"{what} {path}: {e}", "pass the --model / --width / --bit it was trained with") from None
    missing = [k for k in rep["missing_quantizer"] if k.endswith("act_alpha")]
    if missing:
        raise UserError(f"{what} {path} has no activation clips for this {args.bit}-bit model (it holds a "
                        "full-precision or differently built ANN)",
                        f"train the {args.bit}-bit ANN first (train.py --bit {args.bit} --init <higher-bit checkpoint>)")
    return model, ckpt


def _meta(args, data, model) -> dict:
    return {"task": TASK_NAME, "model": args.model, "arch": args.model, "bit": args.bit, "wbit": 32,
            "width": args.width, "fov_dilation": model.fov_dilation, "num_classes": data.num_classes,
            "class_names": data.class_names, "dataset": args.dataset, "crop_size": args.crop_size,
            "test_size": args.test_size}


# ---------------------------------------------------------------------------------------- training
def train_one_epoch(model, loader, optimizer, scheduler, epoch: int, *, device, show_progress=True, tb=None,
                    max_iters=None, start_iter: int = 0, amp: bool = False) -> Dict[str, float]:
    model.train()
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    n_iter = len(loader) if max_iters is None else min(len(loader), max_iters)
    if n_iter == 0:
        raise UserError("the training set is smaller than one batch", "lower --batch_size or add images")
    loss_sum, seen, t0 = 0.0, 0, time.time()
    bar = progress(loader, f"train {epoch}", show_progress, total=n_iter)
    for i, (x, y) in enumerate(bar):
        if i >= n_iter:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _, loss = sgd_step(model, x, y, pixel_cross_entropy, optimizer, epoch, i + 1, amp=amp)
        scheduler.step()
        loss_sum += float(loss.detach()) * x.shape[0]
        seen += x.shape[0]
        lr = optimizer.param_groups[0]["lr"]
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", lr=f"{lr:.3g}", refresh=False)
        if tb is not None:
            tb.scalars(start_iter + i, "train_iter/", loss=float(loss.detach()), lr=lr)
    tot = dist.all_reduce_sum([loss_sum, seen])
    return {"train_loss": tot[0] / max(tot[1], 1), "train_seconds": time.time() - t0, "iters": n_iter}


def train(args) -> Dict:
    """``train.py``."""
    check_args(args)
    with dist.session(args.device, args.local_rank) as ctx:
        dist.seed_all(args.seed, ctx.rank)
        runs.check_amp(args.amp, ctx.device)
        out_dir = run_dir(args)
        resume, rckpt, init_ckpt = runner.open_run(args, out_dir)
        src = rckpt or init_ckpt or {}
        if args.width is None:   # a run of the bit chain keeps its predecessor's width
            args.width = float(src["width"]) if src.get("task") == TASK_NAME and src.get("width") is not None else 1.0
        if args.fov_dilation is None and src.get("task") == TASK_NAME and src.get("fov_dilation") is not None:
            args.fov_dilation = int(src["fov_dilation"])   # ... and its LargeFOV dilation
        data = build_data(args, train=True, ctx=ctx)
        runner.hint_small_data(TASK_NAME, len(data.train), bool(args.init or rckpt))
        tr_loader, va_loader = train_loader(args, data, ctx), val_loader(args, data, ctx)
        generators = runs.loader_generators(tr_loader)
        model = build_model(args, data.num_classes, ctx.device)
        if args.channels_last if args.channels_last is not None else ctx.device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)   # same values; oneDNN's faster CPU layout
        iters = len(tr_loader) if args.max_iters is None else min(len(tr_loader), args.max_iters)
        total_iters = max(1, args.epochs * iters)
        optimizer = runs.make_optimizer(model.parameters(), args.optimizer, args.lr, args.momentum, args.weight_decay)
        scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_iters, power=args.power)
        start, best, history, init_info = 0, None, [], None
        if rckpt is not None:
            check_ckpt(rckpt, resume, "--resume", args, data.num_classes, same_bit=True, names=data.class_names)
            scheduler.load_state_dict(rckpt["scheduler"])
            scheduler.total_iters = total_iters   # this run's --epochs (a longer run continues the poly decay)
            init_info = rckpt.get("init")
            if rckpt.get("sampler_seed") is not None and hasattr(tr_loader.sampler, "seed"):
                tr_loader.sampler.seed = int(rckpt["sampler_seed"])
            start, best, history = runner.resume(rckpt, resume, ctx, model, optimizer, best_name="best_miou",
                                                 label="mIoU", what=args.model, generators=generators)
        elif args.init:
            init_info = init_weights(model, args, data.num_classes, init_ckpt, names=data.class_names)
        model = runner.sync_bn(model, ctx, args.sybn)
        net = dist.wrap_ddp(model, ctx)
        log(f"{args.model} {args.bit}-bit (width {args.width}) on {args.dataset}: "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {ctx.world_size} process(es) on "
            f"{ctx.device}; epochs {start}->{args.epochs}, {iters} iters/epoch, lr {args.lr} poly {args.power}")
        meta = _meta(args, data, model)

        def train_epoch(epoch, tb):
            tr = train_one_epoch(net, tr_loader, optimizer, scheduler, epoch + 1, device=ctx.device,
                                 show_progress=args.progress, tb=tb, max_iters=args.max_iters, start_iter=epoch * iters,
                                 amp=args.amp)
            return {"lr": optimizer.param_groups[0]["lr"], **tr}   # the rate at the end of the epoch

        def evaluate(epoch):
            res = pipeline.evaluate(model, va_loader, make_metric_factory(data.num_classes, data.class_names),
                                    device=ctx.device, progress=args.progress, desc=f"val {epoch + 1}")
            return {"val_miou": res["miou"], "val_pixel_acc": res["pixel_acc"], "val_per_class_iou": res["per_class_iou"],
                    **{f"val_{k}": res[k] for k in DIAGNOSIS}}

        def state(done, best, history):
            return dict(meta, epoch=done, best_miou=best, state_dict=dist.unwrap(model).state_dict(),
                        optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), args=plain_args(args),
                        history=history, init=init_info, sampler_seed=getattr(tr_loader.sampler, "seed", None),
                        rng_state=runner.rng_states(ctx, generators))
        return runner.train(
            args, ctx, out_dir, start=start, best=best, history=history, key="val_miou", best_name="best_miou",
            train_epoch=train_epoch, evaluate=evaluate, state=state, summary={"model": args.model, "bit": args.bit},
            every=args.eval_epoch, label="val mIoU (%)", title=f"{args.model} {args.bit}-bit",
            result=lambda top: {"miou": top.get("val_miou"), "ann_miou": top.get("val_miou"),
                                "pixel_acc": top.get("val_pixel_acc"), "per_class_iou": top.get("val_per_class_iou") or [],
                                **{k: top.get(f"val_{k}") for k in DIAGNOSIS}},
            record=lambda res, _: record(args, data, res, script="train.py", checkpoint=os.path.join(out_dir, BEST)))


# ---------------------------------------------------------------------------------------- records
def record(args, data, result: Dict, *, script: str, checkpoint: str, **extra) -> Dict:
    rec = {"script": script, "task": TASK_NAME, "dataset": args.dataset, "model": args.model, "bit": args.bit,
           "width": args.width, "num_classes": data.num_classes, "class_names": data.class_names,
           "split": "val", "test_size": args.test_size, "T": None, "neuron": None, "samples": None,
           "miou": None, "ann_miou": None, "per_step_miou": [], "per_class_iou": [], "pixel_acc": None,
           "layers": [], "sops": None, "snn_macs": None, "ann_macs": None, "energy": None}
    rec.update(result)
    rec.update(checkpoint=checkpoint, **extra)
    return runs.stamp(rec, args)


def _snn_result(res: Dict) -> Dict:
    """Flatten ``pipeline.evaluate_snn``'s dict into the record's keys."""
    snn_m = res.get("snn") or {}
    ann_m = res.get("ann") or {}
    out = {k: res.get(k) for k in ("miou", "ann_miou", "per_step_miou", "T", "neuron", "settle", "samples", "layers", "sops",
                                   "snn_macs", "ann_macs", "energy", "seconds")}
    out.update(per_class_iou=snn_m.get("per_class_iou"), pixel_acc=snn_m.get("pixel_acc"),
               mean_acc=snn_m.get("mean_acc"), ann_per_class_iou=ann_m.get("per_class_iou"),
               ann_pixel_acc=ann_m.get("pixel_acc"))
    for k in DIAGNOSIS + ("confusion",):
        out[k], out[f"ann_{k}"] = snn_m.get(k), ann_m.get(k)
    return out


# ---------------------------------------------------------------------------------------- eval.py
def _open(args, ctx, *, train: bool, need_quant: bool):
    """The checkpoint to read (its settings taken), the data, the model it holds."""
    ckpt, path = open_trained(args)
    if need_quant and args.bit == 32:
        raise UserError("--spike with --bit 32: a full-precision ANN has no activation clips to become thresholds",
                        "pass --bit 2/3/4/5 with a checkpoint trained at that bit-width")
    if not args.classes and ckpt.get("class_names"):
        args.checkpoint_classes = list(ckpt["class_names"])
    data = build_data(args, train=train, ctx=ctx)
    model, ckpt = load_trained(args, data.num_classes, ctx.device, path, "--init", ckpt=ckpt, names=data.class_names)
    return data, model.eval(), ckpt, path


def evaluate(args) -> Dict:
    """``eval.py``: mIoU of the ANN (default) or, with ``--spike``, of its SNN next to the ANN."""
    check_args(args)
    with dist.session(args.device, args.local_rank) as ctx:
        data, model, ckpt, path = _open(args, ctx, train=False, need_quant=args.spike)
        return runner.evaluate(TASK, args, ctx, data, model, ckpt, path, script="eval.py",
                               loader=val_loader(args, data, ctx))


def _ann_result(args, data, model, res: Dict) -> Dict:
    macs = count_macs(model, args.test_size)
    log(f"ANN mIoU {res['miou']:.2f} pixel acc {res['pixel_acc']:.2f}" + _diagnosis(res))
    return {"miou": res["miou"], "ann_miou": res["miou"], "per_class_iou": res["per_class_iou"],
            "pixel_acc": res["pixel_acc"], "mean_acc": res.get("mean_acc"), "samples": res.get("samples"),
            **{k: res.get(k) for k in DIAGNOSIS + ("confusion",)}, "ann_macs": macs, "energy": runs.ann_energy(macs)}


def _diagnosis(res: Dict) -> str:
    """Finding vs naming the objects (segmentation.metrics), for the log line."""
    if res.get("item_iou") is None or res.get("naming_acc") is None:
        return ""
    return (f"; objects found (object IoU) {res['item_iou']:.2f}, named right {res['naming_acc']:.2f} % "
            f"(mIoU if all were named right {res['miou_if_named']:.2f})")


# ---------------------------------------------------------------------------------------- snn_ft.py
def pixel_cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss: per-pixel cross-entropy with the label mask, 255 ignored (zero, with a gradient
    graph, for a crop of ignored pixels only)."""
    if not bool((y != IGNORE).any()):
        return out.sum() * 0.0
    return F.cross_entropy(out, y, ignore_index=IGNORE)


def e2e_cross_entropy(out, ann_out, batch):
    """The end-to-end loss ``--e2e-loss ce``: :func:`pixel_cross_entropy` of the SNN's logits with the batch's
    label mask."""
    return pixel_cross_entropy(out, batch[1].to(out.device))


def _score(args, data, ctx, model, loader):
    """The accept / revert score: the SNN's mIoU on the first --score-batches training batches, without
    augmentation (padded to --test_size)."""
    score_ds = copy.copy(data.train)
    score_ds.transforms = segdata.test_transforms(args.test_size)
    score_loader = segdata.make_loader(score_ds, args.batch_size, train=False, workers=args.workers, ctx=ctx)
    make = make_metric_factory(data.num_classes, data.class_names)
    return lambda net: float(pipeline.evaluate(net, score_loader, make, device=ctx.device, progress=args.progress,
                                               desc="score (train mIoU)", max_batches=args.score_batches)["miou"])


def _snn_line(res: Dict) -> str:
    return (f"SNN mIoU {res['miou']:.2f} (ANN {res['ann_miou']:.2f}) T={res['T']} {res['neuron']}{_diagnosis(res)}; "
            "per step " + " ".join(f"{v:.1f}" for v in res["per_step_miou"]))


TASK = runner.Task(
    name=TASK_NAME, key="miou", ft_method=FT_METHOD,
    open=lambda args, ctx, train: _open(args, ctx, train=train, need_quant=True), run_dir=run_dir,
    loaders=lambda args, data, ctx: (None if data.train is None else train_loader(args, data, ctx),
                                     val_loader(args, data, ctx)),
    make_metric=lambda args, data, model: make_metric_factory(data.num_classes, data.class_names),
    record=lambda args, data, model, res, **kw: record(args, data, res, **kw), plot=plot_metrics,
    snn_line=_snn_line, score=_score, score_text=lambda args: f"the train mIoU ({args.score_batches} batches)",
    ft_meta=lambda args, data, model, res: _meta(args, data, model),
    e2e_losses=lambda model: {"ce": e2e_cross_entropy}, flatten=_snn_result, ann_result=_ann_result)


def finetune(args) -> Dict:
    """``snn_ft.py``: layer-wise fine-tuning of the segmenter SNN, saved in ANN format."""
    check_args(args)
    return runner.finetune(TASK, args)


# ---------------------------------------------------------------------------------------- inference.py
def infer(args) -> List[str]:
    """``inference.py``: colour mask (VOC palette PNG) and overlay PNG per input image."""
    import numpy as np
    from PIL import Image
    check_args(args)
    paths = runs.image_files(args.input)
    with dist.session(args.device, args.local_rank) as ctx:
        ckpt, path = open_trained(args)
        stride = OUTPUT_STRIDE[args.model]
        names = segdata.read_classes(args.classes) if args.classes else ckpt.get("class_names")
        n = ckpt_classes(ckpt, args.model)
        if names is None:
            names = list(segdata.VOC_CLASSES) if n == len(segdata.VOC_CLASSES) else [f"class{i}" for i in range(n)]
        model, ckpt = load_trained(args, len(names), ctx.device, path, "--init", ckpt=ckpt, names=names)
        if args.spike and args.bit == 32:
            raise UserError("--spike with --bit 32: a full-precision ANN cannot be converted",
                            "pass --bit 2/3/4/5 and the checkpoint of that bit-width")
        fwd = runner.convert(TASK, args, model.eval(), ckpt, ctx).to(ctx.device) if args.spike else model.eval()
        palette = segdata.voc_palette()

        def draw(p, img, outputs):
            h, w = img.shape[:2]
            side = max(h, w, args.test_size)
            side = ((side - 1 + stride - 1) // stride) * stride + 1   # next k * stride + 1
            canvas = np.empty((side, side, 3), dtype=np.uint8)
            canvas[:] = segdata.MEAN_PIXEL
            canvas[:h, :w] = img
            x = torch.from_numpy(canvas).permute(2, 0, 1).float().div(255)
            x = (x - torch.tensor(segdata.MEAN).view(3, 1, 1)) / torch.tensor(segdata.STD).view(3, 1, 1)
            with torch.no_grad():
                out = fwd(x.unsqueeze(0).to(ctx.device))
            label = out[0, :, :h, :w].argmax(0).cpu().numpy().astype(np.uint8)
            mask_path, over_path = outputs
            im = Image.fromarray(label, mode="P")
            im.putpalette(palette.reshape(-1).tolist())
            im.save(mask_path)
            Image.fromarray(overlay(img, label, names)).save(over_path)
            present = sorted({int(v) for v in np.unique(label)} - {0})
            log(f"{p}: {', '.join(names[c] for c in present) or 'background only'} -> {mask_path}, {over_path}")
            return [mask_path, over_path]
        return runner.predict(paths, segdata.read_image, draw, args.output, suffixes=["_mask.png", "_overlay.png"],
                              flag="--output", show_progress=args.progress)


def overlay(img, label, names=None):
    """The image with the label map blended over it (VOC colours, imgviz); the classes present are named
    when ``names`` is given and the image is large enough for the legend to leave it visible."""
    import imgviz
    import numpy as np
    named = names is not None and min(img.shape[:2]) >= 160
    return np.asarray(imgviz.label2rgb(label.astype(np.int32), image=img, alpha=0.5,
                                       label_names=list(names) if named else None,
                                       font_size=max(10, min(img.shape[:2]) // 25), loc="rb"))
