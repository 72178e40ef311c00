"""The ImageNet task for :mod:`classification.workflow`: ImageFolder trees read by DALI or torchvision,
the ImageNet model zoo, the original's step LR schedule, and the original dali_main.py's flags.

The three scripts (``dali_main.py``, ``snn.py``, ``snn_ft.py``) are thin fronts: they parse their
flags with :func:`get_parser`, call :func:`prepare` and hand over to the shared workflow (the same
code as the CIFAR-10 scripts).
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence

from classification import imagenet_data as D
from classification.models import IMAGENET_ARCHS
from classification.models.torchvision_models import ArchChoices, is_torchvision_arch
from classification.workflow import Data, Task, add_common_args, add_finetune_args, add_snn_args
from common import UserError
from common.cli import ArgumentParser
from common.logger import log

#: the flags whose value is optional (``--flag`` alone, or ``--flag VALUE``); see :func:`normalize_argv`
_BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
               "on": True, "off": False}
_CKPT_SUFFIXES = (".pth", ".pt", ".tar", ".pth.tar", ".ckpt", ".bin", ".safetensors")


# ------------------------------------------------------------------------------------ LR schedule
def lr_factor(epoch: int) -> float:
    """The original's ``0.1^(epoch // 20)`` with one extra x0.1 from epoch 50 (0-based epochs):
    for 60 epochs lr, 0.1 lr, 0.01 lr, 0.001 lr over [0-19], [20-39], [40-49], [50-59]."""
    return 0.1 ** (epoch // 20) * (0.1 if epoch >= 50 else 1.0)


def milestones(epochs: int) -> List[int]:
    """:func:`lr_factor` as MultiStepLR milestones (x0.1 each): 20, 40, 50, 60, 80, ... below ``epochs``."""
    return sorted(list(range(20, epochs, 20)) + ([50] if epochs > 50 else []))


# ------------------------------------------------------------------------------------------- data
def add_data_args(p: ArgumentParser):
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="ImageNet root holding train/ and val/ ImageFolder trees, or the train and val folders")
    p.add_argument("--loader", choices=D.BACKENDS, default="auto",
                   help="input pipeline: dali (NVIDIA DALI), torch (torchvision ImageFolder, transforms v2), "
                        "auto = dali when installed (default)")
    p.add_argument("--dali_cpu", "--dali-cpu", dest="dali_cpu", action="store_true",
                   help="DALI: decode and augment on the CPU (default: nvJPEG 'mixed' GPU decoding when on a GPU)")
    p.add_argument("--input-size", "--input_size", dest="input_size", type=int, default=D.DEFAULT_INPUT_SIZE,
                   help="crop size (default 224; validation images are resized to 256/224 of it first). "
                        "AlexNet / VGG need 224 (their classifiers expect 6x6 / 7x7 feature maps)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classifier outputs (default: the number of class folders, 1000 on ImageNet)")
    p.add_argument("--prof", type=int, default=-1, metavar="N",
                   help="profile: run only N iterations per epoch (training, fine-tuning) (default -1: all)")
    p.add_argument("-t", "--test", action="store_true",
                   help="smoke test: one epoch of at most 10 iterations")
    p.add_argument("--deterministic", action="store_true",
                   help="seed everything (--seed, default 0) and use deterministic algorithms")
    p.add_argument("--channels-last", "--channels_last", dest="channels_last", nargs="?", const=True, default=False,
                   type=_parse_bool, metavar="BOOL", help="feed channels-last (NHWC) input tensors")
    p.add_argument("--keep-batchnorm-fp32", "--keep_batchnorm_fp32", dest="keep_batchnorm_fp32", nargs="?",
                   const=True, default=None, type=_parse_bool, metavar="BOOL",
                   help="accepted for compatibility (an APEX AMP option): this project trains in float32, "
                        "so BatchNorm always is")


def _parse_bool(v):
    if isinstance(v, bool):
        return v
    key = str(v).strip().lower()
    if key not in _BOOL_WORDS:
        import argparse
        raise argparse.ArgumentTypeError(f"expected true / false, got {v!r}")
    return _BOOL_WORDS[key]


def build_data(args, ctx) -> Data:
    """Loaders for this rank; only the splits the script needs (``args.need_train``)."""
    train_dir, val_dir = D.resolve_data_dirs(args.data)
    need_train = getattr(args, "need_train", True)
    classes = D.check_classes(train_dir, val_dir)
    num_classes = args.num_classes or len(classes)
    if num_classes < len(classes):
        raise UserError(f"--num-classes {num_classes} is smaller than the {len(classes)} class folders in "
                        f"{val_dir}", "drop --num-classes or pass the full class count")
    backend = D.choose_backend(args.loader)
    kw = dict(workers=args.workers, input_size=args.input_size, backend=backend, dali_cpu=args.dali_cpu,
              rank=ctx.rank, world_size=ctx.world_size, device=ctx.device, channels_last=bool(args.channels_last),
              seed=getattr(args, "seed", None))
    train = D.build_loader(train_dir, train=True, batch_size=args.batch_size, **kw) if need_train else None
    val = D.build_loader(val_dir, train=False, batch_size=args.test_batch_size or args.batch_size, **kw)
    if train is not None and len(train) == 0:
        raise UserError(f"{train_dir}: {train.dataset_size} training images give no full batch of "
                        f"{args.batch_size} per process on {ctx.world_size} process(es)", "lower -b/--batch-size")
    if val.dataset_size < ctx.world_size:
        raise UserError(f"{val_dir} has {val.dataset_size} images for {ctx.world_size} processes",
                        "use fewer processes (every rank needs at least one validation image)")
    how = backend
    if backend == "dali":
        how += " (CPU decoding)" if val.cpu_decode else " (GPU 'mixed' decoding)"
    sizes = (f"{train.dataset_size} train / " if train is not None else "") + f"{val.dataset_size} val images"
    log(f"data: {sizes}, {len(classes)} classes, {args.input_size}px crops, loader {how}, "
        f"{ctx.world_size} process(es)")
    info = {"train_dir": train_dir, "val_dir": val_dir, "loader": backend, "input_size": args.input_size,
            "train_size": train.dataset_size if train is not None else None, "val_size": val.dataset_size}
    return Data("imagenet", num_classes, train, val, info)


TASK = Task(name="imagenet", model_dataset="imagenet", archs=ArchChoices(IMAGENET_ARCHS), default_arch="resnet18",
            build_data=build_data, milestones=milestones, input_size=D.DEFAULT_INPUT_SIZE,
            extra_args=add_data_args, train_script="dali_main.py",
            # result/imagenet/<arch>_<bit>bit: resnet18 / vgg11 exist for CIFAR-10 too (result/<arch>_<bit>bit);
            # the original's --init result/alexnet_4bit/... still finds result/imagenet/alexnet_4bit/...
            namespace=lambda args: "imagenet", dataset_name=lambda args: "imagenet")


# ---------------------------------------------------------------------------------------- parsers
def get_parser(script: str, description: str = "") -> ArgumentParser:
    """Flags of ``dali_main.py`` (``script="train"``), ``snn.py`` (``"snn"``) or ``snn_ft.py`` (``"ft"``):
    the original's ImageNet flags with its defaults (``--epochs 90``, ``-b 256`` per process,
    ``-p 10``, ``--bit 5``) plus this project's."""
    p = ArgumentParser(description=description)
    init_help = ("checkpoint to initialise from (a higher-bit or float model, loaded with the --init "
                 "semantics: missing activation / weight clips start at their defaults)" if script == "train" else
                 "ANN checkpoint (default <out>/<arch>_<bit>bit/model_best.pth.tar); snn_ft.py's output also works")
    kind = {"train": "train", "snn": "snn", "ft": "ft"}[script]
    if script == "ft":
        add_common_args(p, TASK, script=kind, bit_default=5, print_freq_default=10, lr_default=1e-3,
                        lr_help="fine-tuning learning rate (constant)", wd_default=None, init_help=init_help)
    else:
        add_common_args(p, TASK, script=kind, bit_default=5, print_freq_default=10, init_help=init_help)
    p.set_defaults(batch_size=256, test_batch_size=None)
    if script == "train":
        p.set_defaults(epochs=90)
    for a in p._actions:  # the help texts name the defaults
        if a.dest == "epochs":
            a.help = "training epochs (default 90; the README recipe uses 60)"
        elif a.dest == "batch_size":
            a.help = "batch size per process (default 256)"
        elif a.dest == "test_batch_size":
            a.help = "validation batch size per process (default: -b)"
        elif a.dest == "arch":
            a.help = (f"model: {', '.join(IMAGENET_ARCHS)} (Fast-SNN's own), or any torchvision classification "
                      "model with ReLU / ReLU6 activations, quantized by quant.quantize (mobilenet_v2, resnet50, "
                      "densenet121, ...; docs/own-network.md) (default resnet18)")
    if script == "train":
        p.add_argument("--pretrained", nargs="?", const="torchvision", default="", metavar="SOURCE",
                       help="start from pretrained weights: alone (or 'torchvision'), torchvision's ImageNet "
                            "weights for resnet18 / resnet34 and the torchvision-built archs (downloaded once "
                            "into the torch hub cache); or a local state-dict file (any arch, the model's "
                            "parameter names)")
    if script in ("snn", "ft"):
        add_snn_args(p)
    if script == "ft":
        add_finetune_args(p)
    return p


def normalize_argv(argv: Sequence[str]) -> List[str]:
    """Make the optional-value flags unambiguous before argparse sees them.

    ``--pretrained`` takes the next word only when it is ``torchvision`` or looks like a checkpoint
    file (an existing file, or a ``.pth`` / ``.pt`` / ``.tar`` ... name); ``--channels-last`` and
    ``--keep-batchnorm-fp32`` only when it is a boolean word (the original parsed them with
    ``type=bool`` / ``type=str``). Otherwise the flag stands alone, so ``--pretrained /data/imagenet``
    keeps the data path positional.
    """
    out: List[str] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        tok = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if tok in ("--pretrained",):
            if nxt is not None and (nxt == "torchvision" or os.path.isfile(nxt)
                                    or nxt.lower().endswith(_CKPT_SUFFIXES)):
                out.append(f"{tok}={nxt}")
                i += 2
                continue
            out.append(f"{tok}=torchvision")
        elif tok in ("--channels-last", "--channels_last", "--keep-batchnorm-fp32", "--keep_batchnorm_fp32"):
            if nxt is not None and nxt.strip().lower() in _BOOL_WORDS:
                out.append(f"{tok}={nxt}")
                i += 2
                continue
            out.append(f"{tok}=true")
        else:
            out.append(tok)
        i += 1
    return out


def parse_args(script: str, argv: Optional[Sequence[str]], description: str = ""):
    import sys
    argv = sys.argv[1:] if argv is None else argv
    return get_parser(script, description).parse_args(normalize_argv(argv))


# --------------------------------------------------------------------------------------- preparing
#: conv (kernel, stride, padding) chains of the fixed-size classifiers and the feature-map side
#: their first linear layer expects; stride-1 "same" 3x3 convs keep the size and are left out for VGG
_FIXED_INPUT = {
    "alexnet": ([(11, 4, 2), (5, 2, 1), (3, 2, 0), (3, 1, 1), (3, 2, 0)], 6),
    "vgg16": ([(3, 2, 1)] * 5, 7),
    "vgg11": ([(3, 2, 1)] * 5, 7),
}


def feature_side(arch: str, input_size: int) -> Optional[int]:
    """Side of the last feature map of AlexNet / VGG at ``input_size`` (``None`` for the ResNets,
    whose adaptive average pool takes any size)."""
    if arch not in _FIXED_INPUT:
        return None
    h = input_size
    for k, st, pad in _FIXED_INPUT[arch][0]:
        h = (h + 2 * pad - k) // st + 1
    return h


def check_arch_input_size(arch: str, input_size: int):
    """Raise a user error when ``arch`` cannot run at ``input_size``: AlexNet / VGG have classifiers
    for a 6x6 / 7x7 feature map (cheap arithmetic, checked against the real models by the tests)."""
    side = feature_side(arch, input_size)
    if side is None or side == _FIXED_INPUT[arch][1]:
        return
    fits = [s for s in range(8, 513) if feature_side(arch, s) == _FIXED_INPUT[arch][1]]
    want = _FIXED_INPUT[arch][1]
    raise UserError(f"--input-size {input_size} does not fit {arch}: it gives a {side}x{side} feature map, "
                    f"the classifier expects {want}x{want}",
                    f"use --input-size 224 (or {fits[0]}-{fits[-1]})")


def prepare(args, script: str) -> Task:
    """Checks and the original's extra flags (``-t``, ``--prof``, ``--deterministic``,
    ``--pretrained``); returns the task for this run (its ``input_size`` = ``--input-size``)."""
    import torch
    from classification import workflow
    if not args.data:
        raise UserError("no data path given", "pass the ImageNet root (holding train/ and val/) or the "
                                              "train and val folders, e.g. dali_main.py -a alexnet ... /data/imagenet2012")
    D.check_input_size(args.input_size)
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError(f"--num-classes {args.num_classes} must be at least 1", "drop it, or pass a positive number")
    check_arch_input_size(args.arch, args.input_size)
    if args.test:
        args.max_iters = 10 if args.max_iters is None else min(args.max_iters, 10)
        if script == "train":
            args.epochs = args.start_epoch + 1
    if args.prof >= 0:
        if args.prof == 0:
            raise UserError("--prof 0 runs no iteration", "pass --prof N with N >= 1 (or -1 to run everything)")
        args.max_iters = args.prof if args.max_iters is None else min(args.max_iters, args.prof)
    if args.max_iters is not None and args.max_iters < 1:
        raise UserError(f"--max-iters {args.max_iters} must be at least 1", "pass a positive number")
    if args.deterministic:
        if getattr(args, "seed", None) is None:
            args.seed = 0
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True
    # which splits are read: evaluation-only runs skip the (1.28 M image) training folder
    args.need_train = script in ("train", "ft") and not args.evaluate
    args.run_namespace = TASK.namespace(args)
    if getattr(args, "pretrained", ""):
        _resolve_pretrained(args)
    resuming = script == "train" and bool(args.resume)
    if args.init and not resuming:  # a resumed run ignores --init
        args.init = workflow.resolve_checkpoint_path(args, args.init)
        check_checkpoint_file(args.init, "--init")
    elif script in ("snn", "ft") and not args.init and args.bit != 32:  # bit 32: the workflow explains
        from common.checkpoint import BEST
        check_checkpoint_file(os.path.join(workflow.run_dir(args), BEST), "--init", default=True)
    return dataclasses.replace(TASK, input_size=args.input_size)


def check_checkpoint_file(path: str, what: str, default: bool = False):
    """Fail early (before the data folders are scanned) on a missing or unreadable checkpoint, with
    the same one-line errors as loading it (:func:`common.checkpoint.check_file`; zip archives --
    what ``torch.save`` writes -- are only read later, once)."""
    from common.checkpoint import check_file
    hint = ("train it first (dali_main.py with this --arch / --bit) or pass --init PATH" if default
            else "check the path, or train that stage first")
    check_file(path, what, hint)


def _resolve_pretrained(args):
    """``--pretrained`` becomes an ``--init`` file: a local state dict as is, torchvision's weights
    through the torch hub cache (downloaded once)."""
    if args.init:
        raise UserError("--pretrained and --init both given", "pass one of them: --init continues a "
                                                             "progressive run, --pretrained starts from ImageNet weights")
    src = args.pretrained
    if src != "torchvision":
        if not os.path.isfile(src):
            raise UserError(f"--pretrained {src} does not exist", "pass a state-dict file, or --pretrained "
                                                                 "alone for torchvision's weights (resnet18 / resnet34)")
        args.init, args.init_flag = src, "--pretrained"
        log(f"--pretrained: weights from {src}")
        return
    if is_torchvision_arch(args.arch, IMAGENET_ARCHS):  # a torchvision-built model: its own weights
        from classification.models.torchvision_models import weights_file
        args.init = weights_file(args.arch)
        log(f"--pretrained: torchvision {args.arch} weights ({args.init})")
        return
    from classification.models import TORCHVISION_ARCHS, pretrained_state_dict
    if args.arch not in TORCHVISION_ARCHS:
        raise UserError(f"torchvision has no weights that fit the Fast-SNN {args.arch} (stride-2 convs, BN, no "
                        "max-pool)", f"start from a 32-bit model trained here (dali_main.py --bit 32), or pass "
                                     f"--pretrained FILE; torchvision weights fit {' / '.join(TORCHVISION_ARCHS)}")
    try:
        pretrained_state_dict(args.arch, "torchvision")  # downloads into the hub cache when missing
    except (RuntimeError, ValueError) as e:
        raise UserError(str(e).split(";")[0], "pass --pretrained FILE (a local copy of the weights) "
                                              "when offline") from None
    import torch
    import torchvision
    url = torchvision.models.get_model_weights(args.arch)["IMAGENET1K_V1"].url
    args.init = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    log(f"--pretrained: torchvision {args.arch} IMAGENET1K_V1 weights ({args.init})")


__all__ = ["TASK", "lr_factor", "milestones", "add_data_args", "build_data", "get_parser", "normalize_argv",
           "parse_args", "feature_side", "check_arch_input_size", "prepare"]
