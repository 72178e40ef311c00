"""Pretrain a detector's backbone as a classifier: of the box crops of a detection dataset, or of Fashion-MNIST canvases.

The paper's detectors start from an ImageNet-pretrained backbone; offline there is none, so this is the
stand-in: the detector's own backbone (``yolov2_tiny``: its 7 conv units; ``yolov2_r34``: the ResNet-34;
same ``--width``, full precision), followed by global average pooling and a linear layer, learns to
name objects (``common.pretrain``: Adam, a linear warm-up over 5 % of the steps and a cosine decay).

* ``-root DIR`` (with ``-d`` / ``--classes`` as ``train.py``'s): the objects are the boxes of the
  training split, each cropped as a square of ``--context`` x its longer side resized to ``--size``
  (random window + flip while training); the crops of the test split give the held-out accuracy.
* without ``-root`` (the offline demo's default): one tinted Fashion-MNIST item on a textured ``--size``
  canvas (``common.scenes.render_scene`` with ``max_items=1``, Fashion-MNIST's *training* images, as the
  training scenes, so the test scenes stay unseen); ``--train`` / ``--test`` canvases, flip only. With
  16000 canvases, 6 epochs, width 0.5 the held-out accuracy is about 70 % (1000 canvases of
  Fashion-MNIST's test items; seed 0) in about 140 CPU-seconds.

Writes ``<save_folder>/<dataset>/<version>_pretrain/{model_best.pth.tar, checkpoint.pth.tar,
metrics_pretrain.json}`` (``<dataset>`` = ``fashion-mnist`` without ``-root``; with ``--out FILE`` the
backbone goes to ``FILE``, the other files to ``FILE`` without ``.pth.tar``); ``model_best`` = ``{"state_dict": {"backbone.*": ...}, "accuracy", "width", ...}``,
which ``train.py --init`` loads into the detector's backbone (the head and the prediction layer keep
their initialisation; ``common.pipeline.load_backbone``). ``--resume auto`` (the default) continues a
killed run; a finished one returns at once.

    python -m detection.pretrain -d voc -root data/scenes --classes data/scenes/classes.txt --width 0.5
    python -m detection.pretrain --width 0.5 --out weights/voc/yolov2_tiny_backbone.pth.tar
"""
from __future__ import annotations

import time

import torch

from common import UserError, run_cli
from common import pretrain as P
from common.cli import ArgumentParser
from common.logger import log

#: how each detector's backbone runs (the classifier's features)
FEATURES = {
    "yolov2_tiny": lambda m, x: m.backbone(x),
    "yolov2_r34": lambda m, x: m.backbone.layer4(m.backbone.layer3(m.backbone.layer2(m.backbone.layer1(
        m.backbone.act1(m.backbone.bn1(m.backbone.conv1(x))))))),
}


def get_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m detection.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--dataset", default="voc", choices=("voc", "coco"),
                   help="dataset of the crops, with -root (default voc)")
    p.add_argument("-root", "--root", "--data_root", "--data-root", dest="data_root", default=None, metavar="DIR",
                   help="pretrain on the box crops of this dataset (as train.py's -root); without it: the "
                        "Fashion-MNIST canvases")
    p.add_argument("--classes", default="", metavar="FILE",
                   help="class names, one per line, as train.py's (default: a classes.txt beside the data, else "
                        "the 20 VOC ones; COCO: its categories)")
    p.add_argument("-v", "--version", default="yolov2_tiny", choices=tuple(FEATURES),
                   help="detector whose backbone is pretrained (default yolov2_tiny)")
    P.add_args(p, epochs=6, lr=1e-2, size=64, name="version")
    p.add_argument("--scale", type=float, nargs=2, default=(0.6, 1.0),
                   help="canvases: item side / canvas side (default 0.6 1.0: items of 38-64 pixels, as in the "
                        "96-pixel scenes)")
    p.add_argument("--train", type=int, default=16000, help="canvases: training canvases (default 16000)")
    p.add_argument("--test", type=int, default=1000,
                   help="canvases: held-out canvases from Fashion-MNIST's test images (default 1000)")
    return p


class BoxObjects(torch.utils.data.Dataset):
    """Image ``i`` of a detection set and its boxes (:func:`common.pretrain.box_objects`)."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from detection.data import read_image
        rec = self.records[i]
        return read_image(rec.image), P.box_objects(rec.boxes, rec.labels)


def main(argv=None) -> dict:
    from detection import data as D
    from detection.models import get_model
    args = get_parser().parse_args(argv)
    P.check_args(args)
    args.width = 1.0 if args.width is None else args.width
    torch.manual_seed(args.seed)
    t0 = time.time()
    if args.data_root is None:
        from common import scenes
        if args.size % 32:
            raise UserError(f"--size {args.size} is not a multiple of 32", "pass e.g. --size 64")
        P.check_canvas_scale(args.scale)
        names, dataset = list(scenes.CLASSES), "fashion-mnist"
        train, test = (P.fashion_canvases(split, n, args.size, args.scale, args.seed)
                       for split, n in (("train", args.train), ("test", args.test)))
        log(f"pretrain: rendered {args.train} + {args.test} canvases of {args.size} px in {time.time() - t0:.0f} s")
    else:
        data = D.build_datasets(args.dataset, args.data_root, train_size=args.size, val_size=args.size,
                                classes_file=args.classes)
        names, dataset = data.classes, args.dataset
        train = P.render_crops(BoxObjects(data.train.records), args.size, args.context, args.workers)
        test = P.render_crops(BoxObjects(data.val.records), args.size, args.context, args.workers)
        log(f"pretrain: {len(train)} + {len(test)} box crops of {len(data.train)} + {len(data.val)} images "
            f"({time.time() - t0:.0f} s)")
    det = get_model(args.version, len(names), None, 32, args.width)
    clf = P.BackboneClassifier(det, FEATURES[args.version], len(names), args.size)
    meta = {"task": "pretrain", "backbone_of": args.version, "width": args.width, "dataset": dataset,
            "object_classes": names}
    run_dir = P.run_folder(args, dataset, args.version)
    return P.train_classifier(clf, ("backbone.",), train, test, args=args, run_dir=run_dir, meta=meta,
                              mean=D.MEAN, std=D.STD)


if __name__ == "__main__":
    run_cli(main)
