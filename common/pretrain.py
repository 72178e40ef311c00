"""Backbone pretraining on the annotated objects of a dataset: the offline stand-in for ImageNet weights.

The paper's detectors and segmenters start from an ImageNet-pretrained backbone. Without one, a
network trained from scratch on a few thousand images stays weak, and its SNN numbers say little. The
stand-in used by ``detection/pretrain.py`` and ``segmentation/pretrain.py``: classify the dataset's
own objects with the task model's own backbone (same ``--width``, full precision) followed by global
average pooling and a linear layer; ``train.py --init`` then loads the backbone part (heads fresh).

* objects: the boxes of a detection set (:func:`box_objects`), or the connected regions of each class
  in a segmentation mask (:func:`mask_objects`, ``cv2.connectedComponentsWithStats``);
* crops: the square around each object enlarged by ``context`` (zero padding past the image border),
  resized to ``side * 9 / 8`` once into a uint8 tensor (:func:`render_crops`); training draws a random
  ``side`` window of it and a horizontal flip, testing the centre window;
* training (:func:`train_classifier`): Adam, a linear warm-up over 5 % of the steps then a cosine decay;
  the held-out accuracy on the crops of the test split after every epoch; ``<run>/checkpoint.pth.tar``
  every epoch (``--resume auto`` continues a killed run) and ``<run>/model_best.pth.tar`` = the backbone
  keys (the task model's own names) of the best epoch.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import BEST, CHECKPOINT, atomic_copy, atomic_save, load_checkpoint
from .errors import UserError
from .logger import log

#: below this many training images, training a task model without ``--init`` gets a hint
SMALL_DATASET = 5000
#: the metrics file written when a pretraining run ends (its presence means the run finished)
METRICS = "metrics_pretrain.json"
#: a mask region smaller than this many pixels (an occluded sliver) is not an object
MIN_REGION = 16

#: (image [3, H, W] uint8, [(xyxy box in pixels, 0-based class)]) per image
ImageObjects = Tuple[torch.Tensor, List[Tuple[Sequence[float], int]]]


def small_data_hint(task: str, num_images: int, has_init: bool) -> Optional[str]:
    """The one line for ``train.py`` on fewer than :data:`SMALL_DATASET` training images without
    ``--init`` (``task``: ``detection`` or ``segmentation``), else ``None``."""
    if has_init or num_images >= SMALL_DATASET:
        return None
    if task == "detection":
        recipe, flags = "python -m detection.pretrain", "--optimizer adam --lr 1e-3 --anchors auto"
        folder = "<version>_pretrain"
    elif task == "segmentation":
        recipe, flags = "python -m segmentation.pretrain", "--optimizer adam --lr 6e-3"
        folder = "<model>_pretrain"
    else:
        raise ValueError(f"task={task!r}: detection or segmentation")
    return (f"hint: {num_images} training images and no --init: a {task} network trained from scratch on so few "
            f"stays weak; pretrain its backbone on the objects of this data first ({recipe} with the same -d / "
            f"--data_root / --classes / --width) and train with --init <save_folder>/<dataset>/{folder}/{BEST} "
            f"{flags} (docs/{task}.md, backbone pretraining)")


# ---------------------------------------------------------------------------------------- objects and crops
def box_objects(boxes: np.ndarray, labels: np.ndarray) -> List[Tuple[Sequence[float], int]]:
    """A detection record's objects: ``(xyxy, label)`` for every box with a positive area."""
    return [(tuple(float(v) for v in b), int(c)) for b, c in zip(boxes, labels) if b[2] > b[0] and b[3] > b[1]]


def mask_objects(mask: np.ndarray, num_classes: int, min_area: int = MIN_REGION) -> List[Tuple[Sequence[float], int]]:
    """The objects of a class mask (0 = background, 255 = ignore): every 8-connected region of one class
    ``c`` of at least ``min_area`` pixels, as ``(xyxy box, c - 1)`` (the box spans the region's pixels:
    ``x1`` = last column + 1)."""
    import cv2
    out = []
    for c in np.unique(mask):
        c = int(c)
        if c == 0 or c >= num_classes:
            continue
        n, _, stats, _ = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
        for x, y, w, h, area in stats[1:n]:
            if area >= min_area:
                out.append(((float(x), float(y), float(x + w), float(y + h)), c - 1))
    return out


def crop_square(image: torch.Tensor, box: Sequence[float], side: int, context: float) -> torch.Tensor:
    """The square of side ``max(w, h) * context`` centred on ``box``, resized to ``side`` (uint8)."""
    from torchvision.transforms.v2 import functional as TF
    x0, y0, x1, y1 = box
    s = max(x1 - x0, y1 - y0, 1.0) * context
    top, left = int(round((y0 + y1 - s) / 2)), int(round((x0 + x1 - s) / 2))
    s = max(1, int(round(s)))
    return TF.resized_crop(image, top, left, s, s, [side, side], antialias=True)


@dataclass
class Crops:
    images: torch.Tensor      # uint8 [N, 3, S, S], S = side * 9 / 8 (room for the random window)
    labels: torch.Tensor      # int64 [N]
    side: int

    def __len__(self) -> int:
        return len(self.labels)


class _CropSet(torch.utils.data.Dataset):
    def __init__(self, source, side: int, context: float):
        self.source, self.side, self.context = source, side, context

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        image, objects = self.source[i]
        xs = [crop_square(image, box, self.side, self.context) for box, _ in objects]
        x = torch.stack(xs) if xs else torch.zeros(0, 3, self.side, self.side, dtype=torch.uint8)
        return x, torch.tensor([c for _, c in objects], dtype=torch.int64)


def render_crops(source: Sequence[ImageObjects], side: int, context: float = 1.2, workers: int = 0) -> Crops:
    """Crop every object of every image of ``source`` (indexable: ``source[i]`` = image ``i`` and its objects)
    once (see :func:`crop_square`), reading the images in ``workers`` loader processes."""
    big = side + side // 8
    loader = torch.utils.data.DataLoader(_CropSet(source, big, context), batch_size=None, num_workers=workers)
    xs, ys = zip(*loader) if len(source) else ((), ())
    if not xs:
        return Crops(torch.zeros(0, 3, big, big, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), side)
    return Crops(torch.cat(xs), torch.cat(ys), side)


def fashion_canvases(split: str, n: int, size: int, scale: Sequence[float], seed: int,
                     workers: Optional[int] = None) -> Crops:
    """``n`` canvases of ``size`` pixels, each one tinted Fashion-MNIST item on a textured background
    (``common.scenes.render_scene`` with ``max_items=1``, the item's side ``scale`` x the canvas) and its
    class: Fashion-MNIST's training images for ``split="train"`` (as the scene set's training scenes), its
    test images otherwise, so a scene set's test scenes stay unseen. Canvas ``i`` is drawn from
    ``default_rng([seed, 101 + (split != "train"), i])``; ``workers`` processes render them
    (``common.scenes.map_chunks``: by default one per core for large counts; the same canvases for any count)."""
    from . import scenes
    scenes.fashion(split)   # here: a missing source is a one-line error
    parts = scenes.map_chunks(_CanvasJob(split, size, tuple(scale), seed), list(range(n)), workers, chunk=256)
    x = np.stack([p[0] for p in parts]) if parts else np.empty((0, size, size, 3), np.uint8)
    y = np.array([p[1] for p in parts], np.int64)
    return Crops(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y), size)


@dataclass(frozen=True)
class _CanvasJob:
    split: str
    size: int
    scale: Tuple[float, float]
    seed: int

    def __call__(self, chunk: Sequence[int]) -> List[Tuple[np.ndarray, int]]:
        from . import scenes
        images, labels = scenes.fashion(self.split)
        k = 0 if self.split == "train" else 1
        out = []
        for i in chunk:
            sc = scenes.render_scene(np.random.default_rng([self.seed, 101 + k, i]), images, labels, self.size,
                                     max_items=1, scale=self.scale)
            out.append((sc.image, sc.labels[0]))
        return out


def check_canvas_scale(scale: Sequence[float], flag: str = "--scale"):
    if not (0 < scale[0] <= scale[1] <= 1.0):
        raise UserError(f"{flag} {scale[0]} {scale[1]} must satisfy 0 < lo <= hi <= 1", f"pass e.g. {flag} 0.6 1.0")


def window(x: torch.Tensor, side: int, g: Optional[torch.Generator] = None) -> torch.Tensor:
    """The ``side`` window of a batch of larger crops: random (one offset per batch) with ``g``, else the centre;
    with ``g`` also a random horizontal flip per crop."""
    room = x.size(-1) - side
    if g is None:
        o = room // 2
        return x[..., o:o + side, o:o + side]
    oy, ox = (int(v) for v in torch.randint(0, room + 1, (2,), generator=g))
    x = x[..., oy:oy + side, ox:ox + side].clone()
    flip = torch.rand(len(x), generator=g) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


# ---------------------------------------------------------------------------------------- the classifier
class BackboneClassifier(nn.Module):
    """``fc(global average pool(features(model, x)))``: the task model's backbone as a classifier.
    ``model`` is the whole task network (its keys keep their names); ``features`` runs its backbone."""

    def __init__(self, model: nn.Module, features: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                 num_classes: int, probe_side: int = 64):
        super().__init__()
        self.model, self.features = model, features
        was = model.training
        model.eval()
        with torch.no_grad():
            channels = features(model, torch.zeros(1, 3, probe_side, probe_side)).size(1)
        model.train(was)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.features(self.model, x), 1).flatten(1))


def backbone_state(model: nn.Module, prefixes: Sequence[str]) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(tuple(prefixes))}


@torch.no_grad()
def accuracy(clf: nn.Module, crops: Crops, mean, std, bs: int = 256) -> float:
    clf.eval()
    hit = 0
    for i in range(0, len(crops), bs):
        x = normalise(window(crops.images[i:i + bs], crops.side), mean, std)
        hit += int((clf(x).argmax(1) == crops.labels[i:i + bs]).sum())
    return 100.0 * hit / max(1, len(crops))


def lr_at(it: int, steps: int, peak: float) -> float:
    """Linear warm-up over 5 % of ``steps``, then a cosine decay to 0."""
    warm = max(1, steps // 20)
    if it < warm:
        return peak * (it + 1) / warm
    return 0.5 * peak * (1 + math.cos(math.pi * (it - warm) / max(1, steps - warm)))


def train_classifier(clf: BackboneClassifier, prefixes: Sequence[str], train: Crops, test: Crops, *, args,
                     run_dir: str, meta: dict, mean, std) -> dict:
    """Train ``clf`` on ``train`` (``args``: ``epochs``, ``batch_size``, ``lr``, ``seed``, ``resume``, ``fresh``,
    ``out``), keep the backbone of the best held-out epoch in ``<run_dir>/model_best.pth.tar`` (plus
    ``meta``), and return the run's record (also ``<run_dir>/metrics_pretrain.json``)."""
    from . import runs
    from .cli import plain_args
    from .metrics import write_json
    if len(train) < 2 or train.labels.unique().numel() < 2:
        raise UserError(f"the training split has {len(train)} object(s) of {train.labels.unique().numel()} "
                        "class(es): nothing to pretrain on", "check --data_root / --classes (the annotated objects)")
    resume = runs.resume_path(args.resume, run_dir, getattr(args, "fresh", False))
    runs.claim_run_folder(run_dir, args, resuming=bool(resume))
    params = [p for n, p in clf.model.named_parameters() if n.startswith(tuple(prefixes))] + list(clf.fc.parameters())
    opt = runs.make_optimizer(params, "adam", args.lr, 0.0, 0.0)
    per_epoch = max(1, len(train) // args.batch_size)
    steps = args.epochs * per_epoch
    g = torch.Generator().manual_seed(args.seed)
    start, best, history = 0, -1.0, []
    recipe = {"train_crops": len(train), "test_crops": len(test), "crop": train.side, "lr": args.lr,
              "batch_size": args.batch_size, "seed": args.seed, "width": meta.get("width")}
    if resume:
        ck = load_checkpoint(resume, "--resume", "pass the checkpoint.pth.tar of the pretraining to continue, or 'auto'")
        runs.require_training_state(ck, resume)
        old = ck.get("recipe") or {}
        changed = [f"{k} {old[k]} -> {v}" for k, v in recipe.items() if k in old and old[k] != v]
        if changed:
            raise UserError(f"{resume} is a pretraining of other settings ({', '.join(changed)})",
                            "pass --fresh to start over, or the settings of that run")
        try:
            clf.load_state_dict(ck["state_dict"])
        except RuntimeError as e:
            raise UserError(f"--resume {resume} does not fit this model ({str(e).splitlines()[0][:120]})",
                            "pass the --width / model it was started with, or --fresh") from None
        opt.load_state_dict(ck["optimizer"])
        g.set_state(ck["generator"])
        start, best, history = int(ck["epoch"]), float(ck["best_accuracy"]), list(ck["history"])
        log(f"resumed {resume}: {start} epochs done, best held-out accuracy {best:.1f} %")
    log(f"pretrain: {len(train)} training / {len(test)} held-out crops of {train.side} px, "
        f"{int(train.labels.max()) + 1 if len(train) else 0} classes; {args.epochs} epochs x {per_epoch} steps")
    runs.start_run(run_dir)
    t0 = time.time()
    for ep in range(start, args.epochs):
        clf.train()
        perm = torch.randperm(len(train), generator=g)
        tot, n, t = 0.0, 0, time.time()
        for b in range(per_epoch):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            x = normalise(window(train.images[idx], train.side, g), mean, std)
            for grp in opt.param_groups:
                grp["lr"] = lr_at(ep * per_epoch + b, steps, args.lr)
            loss = F.cross_entropy(runs.amp_forward(clf, x, args.amp), train.labels[idx])
            runs.check_finite(loss, ep + 1, b + 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, n = tot + float(loss.detach()) * len(idx), n + len(idx)
        acc = accuracy(clf, test, mean, std) if len(test) else None
        history.append({"epoch": ep + 1, "loss": tot / max(1, n), "test_accuracy": acc, "seconds": time.time() - t})
        improved = acc is None or acc > best
        if improved:
            best = best if acc is None else acc
            atomic_save({**meta, "state_dict": backbone_state(clf.model, prefixes), "epoch": ep + 1,
                         "accuracy": acc, "history": history, "args": plain_args(args)}, os.path.join(run_dir, BEST))
        atomic_save({"state_dict": clf.state_dict(), "optimizer": opt.state_dict(), "generator": g.get_state(),
                     "recipe": recipe, "epoch": ep + 1, "best_accuracy": best, "history": history, "args": plain_args(args)},
                    os.path.join(run_dir, CHECKPOINT))
        log(f"pretrain epoch {ep + 1}/{args.epochs}: loss {tot / max(1, n):.3f}, "
            + ("no held-out crops" if acc is None else f"held-out accuracy {acc:.1f} %")
            + f" ({time.time() - t:.0f} s)" + (" best" if improved else ""))
    best_path = os.path.join(run_dir, BEST)
    if getattr(args, "out", None):
        atomic_copy(best_path, args.out)
    rec = {**{k: v for k, v in meta.items() if k != "state_dict"}, "accuracy": best if len(test) else None,
           "history": history, "checkpoint": best_path, "out": getattr(args, "out", None) or best_path,
           "train_crops": len(train), "test_crops": len(test), "seconds": time.time() - t0, "args": plain_args(args)}
    write_json(os.path.join(run_dir, METRICS), rec)
    log(f"pretrained backbone -> {rec['out']}" + (f" (best held-out accuracy {best:.1f} %)" if len(test) else
                                                   " (no held-out objects: the last epoch's)"))
    return rec


def run_folder(args, dataset: str, name: str) -> str:
    """``<save_folder>/<dataset>/<name>_pretrain``; with ``--out FILE``: ``FILE`` without ``.pth.tar``."""
    if getattr(args, "out", ""):
        base = os.path.basename(args.out)
        stem = base[:-len(".pth.tar")] if base.endswith(".pth.tar") else os.path.splitext(base)[0]
        return os.path.join(os.path.dirname(os.path.abspath(args.out)), stem)
    return os.path.join(args.save_folder, dataset, f"{name}_pretrain")


def add_args(p, *, epochs: int, lr: float, size: int, name: str = "model"):
    """The flags every pretraining script shares (the data flags are the task's own)."""
    from . import runs
    p.add_argument("--width", type=float, default=None,
                   help="channel multiplier, as the task model's (default 1.0; train.py --init then takes it)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes over the crops (default {epochs})")
    p.add_argument("-bs", "--batch-size", "--batch_size", dest="batch_size", type=int, default=64,
                   help="default 64")
    p.add_argument("--lr", type=float, default=lr, help=f"peak Adam learning rate (default {lr:g})")
    p.add_argument("--size", type=int, default=size, help=f"crop side in pixels (default {size})")
    p.add_argument("--context", type=float, default=1.2,
                   help="crop side / the object's longer side (default 1.2: some surroundings)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--save_folder", "--save-folder", dest="save_folder", default="weights", metavar="DIR",
                   help=f"the run goes to DIR/<dataset>/<{name}>_pretrain/ (default weights)")
    p.add_argument("--out", default="", metavar="FILE",
                   help="write the pretrained backbone to FILE instead (the run's other files: in FILE's name "
                        "without .pth.tar)")
    p.add_argument("-r", "--resume", default="auto", metavar="PATH|auto",
                   help="continue a killed run (default auto: the run folder's checkpoint.pth.tar, if any; a "
                        "finished run returns at once)")
    runs.add_amp_arg(p)
    runs.add_fresh_arg(p)
    runs.add_workers_arg(p, "--num_workers", "--num-workers")


def check_args(args):
    from . import runs
    runs.check_positive(args, "epochs", "batch_size")
    if args.size < 16:
        raise UserError(f"--size {args.size} is too small", "pass e.g. --size 64")
    if not args.context >= 1.0:
        raise UserError(f"--context {args.context} must be at least 1", "pass e.g. --context 1.2")
    if not args.lr > 0:
        raise UserError(f"--lr {args.lr} must be positive", "pass e.g. --lr 3e-3")
    runs.check_amp(args.amp, "cpu")


__all__ = ["SMALL_DATASET", "small_data_hint", "box_objects", "mask_objects", "crop_square", "Crops", "render_crops", "fashion_canvases", "check_canvas_scale",
           "window", "normalise", "BackboneClassifier", "backbone_state", "accuracy", "lr_at", "train_classifier",
           "run_folder", "add_args", "check_args"]
