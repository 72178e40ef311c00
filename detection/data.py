"""Detection data: PASCAL VOC (and any VOC-format root), COCO 2017, the offline Fashion-MNIST scene set.

``-d voc`` with ``-root/--data_root DIR``: ``DIR/VOCdevkit/VOC2007`` (+ ``VOC2012``), ``DIR/VOC2007``,
or ``DIR`` itself holding ``Annotations/ JPEGImages/ ImageSets/Main/``. Training uses the ``trainval``
lists of VOC2007 and VOC2012 (those present; a VOC2012 that is a link to VOC2007 counts once), testing
the VOC2007 ``test`` list. Classes: the 20 VOC classes, or ``--classes FILE`` (one name per line; a
leading ``background`` / ``_background_`` / ``__ignore__`` line is skipped). Difficult objects are
left out of training and marked for evaluation (neither true nor false positives, VOC protocol).

``-d coco``: ``DIR/coco`` or ``DIR`` with ``annotations/instances_{train,val}2017.json`` and the image
folders ``train2017/ val2017/`` (``test2017/`` with ``image_info_test-dev2017.json`` for coco-test).
Crowd boxes are not trained on (COCOeval handles them). The 80 categories map to labels 0..79.
Image ids must be integers (pycocotools indexes by them); an annotation without ``area`` (which
COCOeval reads) gets its segmentation's area, else its box's.

The scene set (``python -m common.scenes --out data/scenes``) is a VOC root and a COCO root at once:
``-d voc -root data/scenes --classes data/scenes/classes.txt`` or ``-d coco -root data/scenes``.

Boxes are kept in continuous 0-based pixel coordinates ``[x1, y1, x2, y2]``: a VOC box ``xmin..xmax``
(1-based, inclusive) is ``[xmin - 1, xmax]``, a COCO ``[x, y, w, h]`` is ``[x, y, x + w, y + h]``, so
widths equal VOC's ``xmax - xmin + 1`` and IoUs are the VOC devkit's.

Augmentation (training) with ``torchvision.transforms.v2`` on ``tv_tensors`` (boxes follow the image):
photometric distortion, zoom-out (expand) by up to 2x, SSD's random IoU crop, horizontal flip,
resize to ``train_size`` (square), sanitised boxes; evaluation: resize to ``val_size``. Both normalise
with the ImageNet mean / std. ``-ms`` (multi-scale) is applied per batch by the trainer.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common import UserError, dist
from common.loaders import (BACKGROUND, IMAGENET_MEAN, IMAGENET_STD, ShardSampler, check_unique, classes_file_near,
                            image_finder, load_coco_api, open_rgb, read_names, unique_ids)
from common.logger import log

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
_SKIP_FIRST = BACKGROUND + ("__ignore__",)
DEFAULT_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
ROOT_HINT = ("pass -root/--data_root DIR holding VOCdevkit/ (VOC) or coco/ (COCO); for an offline set run "
             "python -m common.scenes --out data/scenes and pass -root data/scenes --classes data/scenes/classes.txt")


@dataclass
class Record:
    """One image and its boxes (continuous 0-based pixel ``xyxy``)."""

    image: str
    boxes: np.ndarray                  # [n, 4] float32
    labels: np.ndarray                 # [n] int64
    difficult: np.ndarray              # [n] bool
    id: object = None                  # VOC: the file id (str); COCO: the image id (int)
    size: tuple = (0, 0)               # (height, width) from the annotation, 0 if unknown


# ---------------------------------------------------------------------------------------- classes
def read_classes(path: str) -> List[str]:
    names = read_names(path, "pass a text file with one class name per line")
    while names and names[0].lower() in _SKIP_FIRST:
        names = names[1:]
    if not names:
        raise UserError(f"--classes {path} lists no class names", "put one class name per line")
    check_unique(names, path)
    return names


# ---------------------------------------------------------------------------------------- VOC
def _num(node, tag, path):
    el = node.find(tag)
    try:
        return float(el.text)
    except (AttributeError, TypeError, ValueError):
        raise UserError(f"annotation {path}: <{tag}> is missing or not a number", "fix the XML file") from None


def parse_voc_xml(path: str, class_index: Dict[str, int], classes_from: str = "the 20 VOC classes"):
    """``(boxes [n, 4], labels [n], difficult [n], (h, w))`` of one VOC XML file (user errors for
    unreadable files, no objects, unknown class names, bad coordinates)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise UserError(f"annotation {path} is not valid XML ({e})", "fix or re-create the file") from None
    except OSError as e:
        raise UserError(f"annotation {path} cannot be read ({e.strerror})",
                        "check that every id in the ImageSets list has an Annotations/<id>.xml") from None
    objects = root.findall("object")
    if not objects:
        raise UserError(f"annotation {path} has no <object>: every listed image needs at least one box",
                        "annotate the image, or remove its id from the ImageSets list")
    boxes, labels, difficult = [], [], []
    for obj in objects:
        name_el = obj.find("name")
        name = (name_el.text or "").strip() if name_el is not None else ""
        if name not in class_index:
            raise UserError(f"annotation {path}: unknown class name {name!r} (not among {classes_from})",
                            "pass --classes FILE listing this dataset's classes, one per line")
        bb = obj.find("bndbox")
        if bb is None:
            raise UserError(f"annotation {path}: an object {name!r} has no <bndbox>", "fix the XML file")
        x1, y1, x2, y2 = (_num(bb, t, path) for t in ("xmin", "ymin", "xmax", "ymax"))
        if x2 < x1 or y2 < y1:
            raise UserError(f"annotation {path}: box of {name!r} has xmax < xmin or ymax < ymin", "fix the XML file")
        d = obj.find("difficult")
        try:
            diff = bool(int(float(d.text))) if d is not None and d.text and d.text.strip() else False
        except ValueError:
            diff = False
        boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
        labels.append(class_index[name])
        difficult.append(diff)
    size = root.find("size")
    hw = (0, 0)
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        try:
            hw = (int(float(size.find("height").text)), int(float(size.find("width").text)))
        except (TypeError, ValueError):
            hw = (0, 0)
    return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64),
            np.asarray(difficult, bool), hw)


def voc_year_dirs(root: str) -> Dict[str, str]:
    """``{"VOC2007": path, ...}`` found under ``root`` (see the module docstring)."""
    if not os.path.isdir(root):
        raise UserError(f"data root {root} does not exist", ROOT_HINT)
    for base in (os.path.join(root, "VOCdevkit"), root):
        if os.path.isdir(base):
            years = {d: os.path.join(base, d) for d in sorted(os.listdir(base))
                     if d.startswith("VOC") and os.path.isdir(os.path.join(base, d, "Annotations"))}
            if years:
                return years
    if os.path.isdir(os.path.join(root, "Annotations")) and os.path.isdir(os.path.join(root, "JPEGImages")):
        return {os.path.basename(os.path.normpath(root)) or "VOC": root}
    raise UserError(f"no VOC dataset under {root} (looked for VOCdevkit/VOC2007, VOC2007/, Annotations/ + "
                    "JPEGImages/)", ROOT_HINT)


def _warn_outside(records: Sequence[Record]):
    """One warning naming the records whose boxes are empty or lie wholly outside the annotated image size:
    the dataset leaves such boxes out (in the main process, not once per loader worker)."""
    bad = []
    for r in records:
        h, w = r.size
        if len(r.boxes) and h > 0 and w > 0:
            b = r.boxes
            if ((b[:, 2] <= np.maximum(b[:, 0], 0)) | (b[:, 3] <= np.maximum(b[:, 1], 0)) | (b[:, 0] >= w)
                    | (b[:, 1] >= h)).any():
                bad.append(os.path.basename(r.image))
    if bad:
        dist.warn_once(f"{len(bad)} image(s) have boxes that are empty or lie outside the image ({', '.join(bad[:3])}"
                       f"{', ...' if len(bad) > 3 else ''}): those boxes are left out")


def voc_records(root: str, split: str, classes: Sequence[str], classes_from: str = "the 20 VOC classes",
                keep_difficult: bool = True) -> List[Record]:
    """Records of the VOC ``train`` (trainval of every year) or ``test`` (VOC2007 test) split."""
    years = voc_year_dirs(root)
    if split == "train":
        chosen, seen = [], set()
        for y, p in years.items():
            if os.path.realpath(p) not in seen:
                seen.add(os.path.realpath(p))
                chosen.append((p, "trainval"))
    else:
        p = years.get("VOC2007") or next(iter(years.values()))
        chosen = [(p, "test")]
    index = {c: i for i, c in enumerate(classes)}
    records = []
    for year_dir, list_name in chosen:
        find_image = image_finder(os.path.join(year_dir, "JPEGImages"))
        lst = os.path.join(year_dir, "ImageSets", "Main", f"{list_name}.txt")
        ann_dir = os.path.join(year_dir, "Annotations")
        if not os.path.isfile(lst) and len(chosen) == 1 and not os.path.isdir(os.path.dirname(lst)) \
                and os.path.isdir(ann_dir):
            # no ImageSets/Main at all (labelme's VOC export): every annotated image, for both splits
            ids = sorted(f[:-4] for f in os.listdir(ann_dir) if f.endswith(".xml"))
            dist.warn_once(f"{year_dir} has no ImageSets/Main: all {len(ids)} annotated images are used for "
                           "training and for testing")
            lst = ann_dir
        elif not os.path.isfile(lst):
            if split == "train" and len(chosen) > 1:  # e.g. a VOC2012 folder holding only the segmentation lists
                dist.warn_once(f"{year_dir} has no ImageSets/Main/{list_name}.txt: not used for training")
                continue
            raise UserError(f"image list {lst} does not exist",
                            f"create it (one image id per line) -- VOC keeps ImageSets/Main/{list_name}.txt")
        else:
            with open(lst) as f:
                ids = unique_ids([ln.split()[0] for ln in f if ln.strip()], lst)
        for i in ids:
            boxes, labels, diff, hw = parse_voc_xml(os.path.join(year_dir, "Annotations", f"{i}.xml"), index,
                                                    classes_from)
            if not keep_difficult:
                boxes, labels, diff = boxes[~diff], labels[~diff], diff[~diff]
            img = find_image(i)
            if not os.path.isfile(img):
                raise UserError(f"image {img} (listed in {lst}) does not exist",
                                "add the image or remove its id from the list")
            records.append(Record(img, boxes, labels, diff, i, hw))
    _warn_outside(records)
    if not records:
        raise UserError(f"the VOC {split} lists under {root} are empty", "put image ids into ImageSets/Main/*.txt")
    return records


# ---------------------------------------------------------------------------------------- COCO
@dataclass
class CocoInfo:
    coco: object                         # pycocotools.coco.COCO
    cat_ids: List[int]                   # label k <-> category id cat_ids[k]
    ann_file: str


def coco_paths(root: str, split: str):
    """``(image_dir, annotation_file)`` of a COCO split (``train2017`` / ``val2017`` / ``test-dev2017``)."""
    if not os.path.isdir(root):
        raise UserError(f"data root {root} does not exist", ROOT_HINT)
    ann_name = "image_info_test-dev2017.json" if split == "test-dev2017" else f"instances_{split}.json"
    img_split = "test2017" if split == "test-dev2017" else split
    for base in (os.path.join(root, "coco"), os.path.join(root, "COCO"), root):
        ann = os.path.join(base, "annotations", ann_name)
        if os.path.isfile(ann):
            for imgs in (os.path.join(base, img_split), os.path.join(base, "images", img_split)):
                if os.path.isdir(imgs):
                    return imgs, ann
            raise UserError(f"COCO image folder {os.path.join(base, img_split)} does not exist",
                            "unpack the COCO images next to annotations/")
    raise UserError(f"no COCO annotations/{ann_name} under {root} (or {root}/coco)", ROOT_HINT)


def load_coco(image_dir: str, ann_file: str, with_boxes: bool = True):
    """``(records, class names, CocoInfo)`` of a COCO-format JSON (any category ids). Image ids must
    be integers; annotations without ``area`` get one (both: ``common.loaders.load_coco_api``)."""
    coco = load_coco_api(ann_file, "re-create or re-download it")
    # a "_background_" category (labelme's COCO export) is not an object class
    cat_ids = sorted(c for c in coco.getCatIds() if coco.loadCats(c)[0]["name"].lower() not in _SKIP_FIRST)
    if not cat_ids:
        raise UserError(f"COCO annotation file {ann_file} has no categories", "use a COCO instances_*.json file")
    names = [coco.loadCats(c)[0]["name"] for c in cat_ids]
    label_of = {c: i for i, c in enumerate(cat_ids)}
    records = []
    for img_id in sorted(coco.getImgIds()):
        info = coco.loadImgs(img_id)[0]
        boxes, labels, crowd = [], [], []
        if with_boxes:
            for a in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
                x, y, w, h = a["bbox"]
                if w < 1 or h < 1 or a["category_id"] not in label_of:
                    continue
                boxes.append([x, y, x + w, y + h])
                labels.append(label_of[a["category_id"]])
                crowd.append(bool(a.get("iscrowd", 0)))
        crowd = np.asarray(crowd, bool)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)[~crowd]
        labels = np.asarray(labels, np.int64)[~crowd]
        records.append(Record(os.path.join(image_dir, info["file_name"]), boxes, labels,
                              np.zeros(len(labels), bool), img_id, (int(info.get("height", 0)), int(info.get("width", 0)))))
    _warn_outside(records)
    return records, names, CocoInfo(coco, cat_ids, ann_file)


# ---------------------------------------------------------------------------------------- dataset
class FlipResize:
    """An optional horizontal flip (p = 0.5), resize to ``size x size`` (bilinear, antialiased), optionally
    dropping boxes under 1 pixel, to float, ImageNet normalisation: the ``flip`` / ``none`` augmentations and
    evaluation. torchvision's v2 kernels called on plain tensors with ``v2.RandomHorizontalFlip``'s draw: the
    v2 pipeline's image, boxes and labels bit for bit (tested), without its per-call dispatch (most of its
    cost on small images). ``(image, {"boxes": BoundingBoxes, "labels"}) -> (image, {"boxes", "labels"})``;
    ``image -> image`` without a target."""

    def __init__(self, size: int, flip: bool, sanitize: bool):
        self.size, self.flip, self.sanitize = int(size), bool(flip), bool(sanitize)

    def __call__(self, image: torch.Tensor, target: Optional[dict] = None):
        from torchvision.transforms.v2 import functional as TF
        flip = self.flip and bool(torch.rand(1) < 0.5)
        size = [self.size, self.size]
        img = image.as_subclass(torch.Tensor)
        img = TF.resize_image(TF.horizontal_flip_image(img) if flip else img, size, antialias=True)
        img = TF.normalize_image(TF.to_dtype_image(img, torch.float32, scale=True), list(MEAN), list(STD))
        if target is None:
            return img
        boxes, labels = target["boxes"], target["labels"]
        fmt, canvas, mode = boxes.format, tuple(boxes.canvas_size), boxes.clamping_mode
        b = boxes.as_subclass(torch.Tensor)
        if flip:
            b = TF.horizontal_flip_bounding_boxes(b, fmt, canvas)
        b, canvas = TF.resize_bounding_boxes(b, canvas, size, format=fmt, clamping_mode=mode)
        if self.sanitize:
            b, valid = TF.sanitize_bounding_boxes(b, fmt, canvas, min_size=1.0, min_area=1.0)
            labels = labels[valid]
        return img, {"boxes": b, "labels": labels}

    def __repr__(self):
        return f"FlipResize(size={self.size}, flip={self.flip}, sanitize={self.sanitize})"


def train_transform(size: int, with_boxes: bool = True, aug: str = "ssd"):
    """``ssd``: photometric distortion, zoom-out, IoU crop, flip (the original's SSD-style augmentation);
    ``flip``: horizontal flip only; ``none``: resize only."""
    if aug == "none":
        return eval_transform(size)
    if aug == "flip":
        return FlipResize(size, flip=True, sanitize=with_boxes)
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    ops = [v2.RandomPhotometricDistort(p=0.5)]
    if with_boxes:
        fill = {tv_tensors.Image: [int(255 * m) for m in MEAN], "others": 0}
        ops += [v2.RandomZoomOut(fill=fill, side_range=(1.0, 2.0), p=0.5), v2.RandomIoUCrop()]
    ops += [v2.RandomHorizontalFlip(), v2.Resize((size, size), antialias=True)]
    if with_boxes:
        ops.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)


def eval_transform(size: int) -> FlipResize:
    """Resize to ``size x size``, to float, normalise (boxes scaled alike, none dropped)."""
    return FlipResize(size, flip=False, sanitize=False)


def read_image(path: str) -> torch.Tensor:
    """``uint8 [3, H, W]`` RGB; a file that does not decode is a :class:`UserError`."""
    img = open_rgb(path, "replace the file, or remove its id from the image list")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


class DetectionDataset(Dataset):
    """Records -> ``{"image", "boxes" (normalised xyxy after the transform), "labels", "gt_boxes"
    (original pixels), "gt_labels", "difficult", "orig_size" (h, w), "id", "index"}``.

    An image that fails to decode yields ``{"error": message}`` (turned into a one-line error by the
    consumer in the main process, see :func:`check_batch`)."""

    def __init__(self, records: List[Record], size: int, train: bool, classes: Sequence[str], name: str = "",
                 coco: Optional[CocoInfo] = None, aug: str = "ssd"):
        self.records, self.size, self.train, self.classes = records, int(size), train, list(classes)
        self.name, self.coco, self.aug = name, coco, aug
        self.set_size(size)

    def set_size(self, size: int):
        self.size = int(size)
        if self.train:
            self._tf = train_transform(self.size, aug=self.aug)
            self._tf_empty = train_transform(self.size, with_boxes=False, aug=self.aug)
        else:
            self._tf = self._tf_empty = eval_transform(self.size)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        from torchvision import tv_tensors
        rec = self.records[i]
        try:
            img = read_image(rec.image)
        except UserError as e:
            return {"error": str(e.what), "index": i}
        h, w = img.shape[-2:]
        gt = torch.from_numpy(rec.boxes).clone()
        gt[:, 0::2] = gt[:, 0::2].clamp(0, w)
        gt[:, 1::2] = gt[:, 1::2].clamp(0, h)
        # a box empty or wholly outside the decoded image (a wrong <size>, a rotated photo) is no object there;
        # named once, when the records are read: _warn_outside
        keep = (gt[:, 2] > gt[:, 0]) & (gt[:, 3] > gt[:, 1])
        gt, labels, difficult = gt[keep], torch.from_numpy(rec.labels)[keep], torch.from_numpy(rec.difficult)[keep]
        target = {"boxes": tv_tensors.BoundingBoxes(gt.clone(), format="XYXY", canvas_size=(h, w)),
                  "labels": labels.clone()}
        tf = self._tf if len(labels) else self._tf_empty
        image, target = tf(tv_tensors.Image(img), target)
        H, W = image.shape[-2:]
        boxes = target["boxes"].as_subclass(torch.Tensor).float() / torch.tensor([W, H, W, H], dtype=torch.float32)
        return {"image": image.as_subclass(torch.Tensor), "boxes": boxes, "labels": target["labels"],
                "gt_boxes": gt, "gt_labels": labels.clone(), "difficult": difficult.clone(),
                "orig_size": (int(h), int(w)), "id": rec.id, "index": i}


def collate(items: List[dict]) -> dict:
    bad = [it for it in items if "error" in it]
    if bad:
        return {"error": bad[0]["error"]}
    out = {"image": torch.stack([it["image"] for it in items])}
    for k in ("boxes", "labels", "gt_boxes", "gt_labels", "difficult", "orig_size", "id", "index"):
        out[k] = [it[k] for it in items]
    return out


def check_batch(batch: dict) -> dict:
    if "error" in batch:
        raise UserError(batch["error"], "replace the file, or remove its id from the image list")
    return batch


def inputs(batch: dict) -> torch.Tensor:
    """The pipeline's ``inputs`` function: the image tensor (one-line error for an undecodable image)."""
    return check_batch(batch)["image"]


@dataclass
class Data:
    name: str                              # "voc" / "coco" / ...
    classes: List[str]
    train: Optional[DetectionDataset]
    val: Optional[DetectionDataset]
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_datasets(dataset: str, root: str, *, train_size: int, val_size: int, classes_file: str = "",
                   classes: Optional[Sequence[str]] = None, need_train: bool = True, need_val: bool = True,
                   aug: str = "ssd") -> Data:
    """``dataset``: ``voc`` | ``coco`` | ``coco-val`` | ``coco-test``. VOC classes: ``classes_file``, else
    a ``classes.txt`` / ``class_names.txt`` of the data root (:func:`classes_file_near`; the data's own
    names, which a checkpoint's must then match), else ``classes`` (a checkpoint's), else the 20 VOC classes."""
    root = os.path.expanduser(root)
    if dataset == "voc":
        if not classes_file:
            classes_file = classes_file_near(root, ("classes.txt", "class_names.txt")) or ""
            if classes_file:
                log(f"classes: {classes_file} (beside the data)")
        if classes_file:
            classes, src = read_classes(classes_file), f"--classes {classes_file}"
        elif classes:
            classes, src = list(classes), "the checkpoint's classes"
        else:
            classes, src = list(VOC_CLASSES), "the 20 VOC classes (pass --classes FILE for others)"
        train = val = None
        if need_train:
            train = DetectionDataset(voc_records(root, "train", classes, src, keep_difficult=False), train_size,
                                     True, classes, "voc", aug=aug)
        if need_val:
            val = DetectionDataset(voc_records(root, "test", classes, src), val_size, False, classes, "voc")
        return Data("voc", classes, train, val, {"root": root})
    if dataset in ("coco", "coco-val", "coco-test"):
        train = val = None
        names = None
        if need_train:
            recs, names, info = load_coco(*coco_paths(root, "train2017"))
            train = DetectionDataset(recs, train_size, True, names, "coco", info, aug=aug)
        if need_val:
            split = "test-dev2017" if dataset == "coco-test" else "val2017"
            recs, vnames, info = load_coco(*coco_paths(root, split), with_boxes=dataset != "coco-test")
            if names is not None and vnames != names:
                raise UserError("the COCO train and val annotation files list different categories",
                                "use the matching instances_train2017.json / instances_val2017.json")
            names = vnames
            val = DetectionDataset(recs, val_size, False, names, "coco", info)
        if classes_file:
            wanted = read_classes(classes_file)
            if wanted != names:
                raise UserError(f"--classes {classes_file} does not match the COCO categories of {root}",
                                "drop --classes for COCO (its categories come from the annotation file)")
        return Data("coco", names, train, val, {"root": root})
    raise UserError(f"unknown dataset {dataset!r}", "use -d voc, coco, coco-val or coco-test")


def make_loader(ds: DetectionDataset, ctx, batch_size: int, workers: int, train: bool, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    if train:
        sampler = DistributedSampler(ds, ctx.world_size, ctx.rank, shuffle=True, seed=seed) if ctx.distributed \
            else torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
    else:
        sampler = ShardSampler(len(ds), ctx.rank, ctx.world_size)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=ctx.device.type == "cuda", drop_last=drop_last and len(ds) >= batch_size,
                      persistent_workers=False)


def set_epoch(loader: DataLoader, epoch: int):
    s = loader.sampler
    if hasattr(s, "set_epoch"):
        s.set_epoch(epoch)
    elif isinstance(s, torch.utils.data.RandomSampler) and s.generator is not None:
        s.generator.manual_seed(1000003 * (epoch + 1))


def train_box_sizes(ds: DetectionDataset) -> torch.Tensor:
    """Every training box's ``(w, h)`` normalised by its image size (for anchor clustering)."""
    out = []
    for r in ds.records:
        h, w = r.size
        if (not h or not w) and len(r.boxes):
            from PIL import Image
            with Image.open(r.image) as im:
                w, h = im.size
        if len(r.boxes):
            b = torch.from_numpy(r.boxes)
            out.append(torch.stack([(b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], 1))
    return torch.cat(out) if out else torch.zeros(0, 2)
