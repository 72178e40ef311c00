"""Pretrain a segmenter's backbone as a classifier of the objects of a segmentation dataset (no ImageNet needed).

Every 8-connected region of one class in a training mask (at least 16 pixels) is an object; the square
around it (``--context`` x its longer side) is cropped and resized to ``--size``. The segmenter's own
backbone (``deeplabv1_vgg9``: ``features.*``; ``deeplabv3_r34``: ``conv1`` .. ``layer4``; same
``--width``, full precision) with global average pooling and a linear layer learns to name the class
(``common.pretrain``: Adam, warm-up + cosine, random window + flip); the crops of the val masks give
the held-out accuracy. With ``--canvases N`` the objects are instead ``N`` single Fashion-MNIST items on
textured canvases (``common.pretrain.fashion_canvases``; 1000 canvases of Fashion-MNIST's test images give
the held-out accuracy): the offline scene set's stand-in for ImageNet, as ``detection/pretrain.py``'s
default. Writes ``<save_folder>/<dataset>/<model>_pretrain/{model_best.pth.tar (the
backbone keys of the best epoch), checkpoint.pth.tar, metrics_pretrain.json}``; ``--resume auto``
(the default) continues a killed run, a finished one returns at once. Then::

    python -m segmentation.pretrain -d voc --data_root data/scenes --width 0.5
    python segmentation/train.py -d voc --data_root data/scenes --width 0.5 --bit 32 \\
        --init weights/voc/deeplabv1_vgg9_pretrain/model_best.pth.tar

loads the backbone and keeps the classifier head fresh (``common.pipeline.load_backbone``).
"""
from __future__ import annotations

import time

import torch

from common import UserError, run_cli
from common import pretrain as P
from common.cli import ArgumentParser
from common.logger import log

#: held-out canvases of ``--canvases``
CANVAS_TEST = 1000
#: how each model's backbone runs (the classifier's features)
FEATURES = {
    "deeplabv1_vgg9": lambda m, x: m.features(x),
    "deeplabv3_r34": lambda m, x: m.layer4(m.layer3(m.layer2(m.layer1(m.act1(m.bn1(m.conv1(x))))))),
}


def get_parser() -> ArgumentParser:
    from segmentation.models import MODELS
    from segmentation.workflow import DATASETS, DEFAULT_MODEL
    p = ArgumentParser(prog="python -m segmentation.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("-d", "--dataset", default="voc", choices=DATASETS, help="voc (default) or coco")
    p.add_argument("-root", "--data_root", "--data-root", dest="data_root", default=None, metavar="DIR",
                   help="dataset root, as train.py's (default data/VOCdevkit for voc, data/coco for coco)")
    p.add_argument("--classes", default=None, metavar="FILE",
                   help="class names, one per line, background first, as train.py's (default: the root's "
                        "classes_seg.txt / class_names.txt, else the 21 VOC classes; COCO: its categories)")
    p.add_argument("--mask_cache", "--mask-cache", dest="mask_cache", default=None, metavar="DIR",
                   help="COCO: where the class masks are cached (default <data_root>/seg_masks)")
    p.add_argument("-m", "--model", "-v", "--version", dest="model", default=DEFAULT_MODEL, choices=MODELS,
                   help=f"segmenter whose backbone is pretrained (default {DEFAULT_MODEL})")
    P.add_args(p, epochs=30, lr=3e-3, size=64)
    p.add_argument("--min-area", "--min_area", dest="min_area", type=int, default=P.MIN_REGION,
                   help=f"smallest region (pixels) that counts as an object (default {P.MIN_REGION})")
    p.add_argument("--canvases", type=int, default=0, metavar="N",
                   help="pretrain on N Fashion-MNIST canvases (one item each; 1000 held out from its test images) "
                        "instead of the dataset's objects (default 0: the objects)")
    p.add_argument("--canvas-scale", "--canvas_scale", dest="canvas_scale", type=float, nargs=2, default=(0.6, 1.0),
                   metavar=("LO", "HI"), help="canvases: item side / canvas side (default 0.6 1.0)")
    return p


class MaskObjects(torch.utils.data.Dataset):
    """Image ``i`` of a segmentation dataset and the objects of its mask (:func:`common.pretrain.mask_objects`)."""

    def __init__(self, ds, min_area: int):
        self.ds, self.min_area = ds, min_area

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, mask = self.ds.load(i)
        return torch.from_numpy(img.copy()).permute(2, 0, 1), P.mask_objects(mask, self.ds.num_classes, self.min_area)


def main(argv=None) -> dict:
    from segmentation import data as segdata
    from segmentation.models import get_model
    from segmentation.workflow import DEFAULT_ROOT
    args = get_parser().parse_args(argv)
    P.check_args(args)
    args.width = 1.0 if args.width is None else args.width
    if args.canvases < 0:
        raise UserError(f"--canvases {args.canvases} is negative", "pass a number of canvases, or 0 for the objects")
    if args.canvases:
        P.check_canvas_scale(args.canvas_scale, "--canvas-scale")
    torch.manual_seed(args.seed)
    if args.canvases:
        from common import scenes
        t0 = time.time()
        names, num_classes, dataset = list(scenes.CLASSES), len(scenes.CLASSES) + 1, "fashion-mnist"
        train, test = (P.fashion_canvases(split, n, args.size, args.canvas_scale, args.seed)
                       for split, n in (("train", args.canvases), ("test", CANVAS_TEST)))
        log(f"pretrain: rendered {args.canvases} + {CANVAS_TEST} canvases of {args.size} px in {time.time() - t0:.0f} s")
    else:
        root = args.data_root or DEFAULT_ROOT[args.dataset]
        data = segdata.build_datasets(args.dataset, root, crop_size=segdata.DEFAULT_CROP,
                                      test_size=segdata.DEFAULT_CROP, classes=args.classes, mask_cache=args.mask_cache)
        names, num_classes, dataset = data.class_names[1:], data.num_classes, args.dataset
        log(f"data: {args.dataset} at {data.info.get('root')}: {len(data.train)} train / {len(data.val)} val images, "
            f"{len(names)} object classes")
        train = P.render_crops(MaskObjects(data.train, args.min_area), args.size, args.context, args.workers)
        test = P.render_crops(MaskObjects(data.val, args.min_area), args.size, args.context, args.workers)
    model = get_model(args.model, num_classes, 32, width=args.width)
    clf = P.BackboneClassifier(model, FEATURES[args.model], len(names), args.size)
    meta = {"task": "pretrain", "backbone_of": args.model, "model": args.model, "width": args.width,
            "dataset": dataset, "object_classes": names}
    run_dir = P.run_folder(args, dataset, args.model)
    return P.train_classifier(clf, model.backbone_prefixes, train, test, args=args, run_dir=run_dir, meta=meta,
                              mean=segdata.MEAN, std=segdata.STD)


if __name__ == "__main__":
    run_cli(main)
