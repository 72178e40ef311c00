"""Segmentation data: PASCAL VOC 2012 (and any VOC-layout root), COCO 2017 from instance annotations,
joint image + mask transforms (torchvision transforms v2), DDP-aware loaders.

Samples are ``(image, mask)``: a normalised float image ``[3, H, W]`` and an ``int64`` mask ``[H, W]``
with class indices ``0 .. num_classes - 1`` (0 = background) and ``255`` = ignore.

* :class:`VOCSegmentation` -- ``<root>/{JPEGImages/<id>.jpg (.jpeg / .png, any case), SegmentationClass/<id>.png,
  ImageSets/Segmentation/{train,val}.txt}``; the training split uses ``SegmentationClassAug`` +
  ``train_aug.txt`` when both exist (the usual "trainaug" set of 10,582 images). ``root`` may be the
  VOC2012 folder itself, its parent ``VOCdevkit`` or the folder above that (``VOC2007`` is taken when
  there is no ``VOC2012``). Masks are palette (or grey-level) PNGs. labelme's ``labelme2voc.py``
  output (``SegmentationClassPNG``, no ImageSets) also loads: every image with a mask, for both
  splits. A user's own classes: ``--classes FILE`` (one name per line, background first).
* :class:`CocoSegmentation` -- per-pixel class masks drawn from the COCO instance annotations with
  pycocotools (larger instances first, so smaller ones stay visible on top; crowd regions = 255),
  written once to a PNG cache and read from there afterwards (one cache subfolder per class mapping and
  annotation file version). The 80 COCO things + background give 81 classes; category ids are mapped to
  1..K in id order (a category named ``_background_`` / ``background`` is background); train and val
  must list the same categories unless ``--classes`` names the classes. Annotations without a
  segmentation (or with polygons of fewer than 3 points only) are left out with a warning; a file
  whose objects have none, or whose objects cover no pixel, is refused.

Bad input raises :class:`common.UserError` (one line): a missing root or split file, an image that
fails to decode, a mask whose size differs from its image, mask values outside ``0 .. classes - 1``
other than 255, COCO image ids that are not integers.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common import UserError
from common import dist
from common.errors import worker_message
from common.loaders import (BACKGROUND, IMAGENET_MEAN, IMAGENET_STD, ShardSampler, check_unique, classes_file_near,
                            image_finder, load_coco_api, open_rgb, polygon_or_rle, read_names, same_names,
                            seed_worker, unique_ids)
from common.logger import log

IGNORE = 255
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
MEAN_PIXEL = tuple(int(round(255 * m)) for m in MEAN)   # pad value of the image before normalisation
SCALES = tuple(0.5 + 0.25 * i for i in range(7))        # 0.5 .. 2.0, step 0.25
MEMORY_CACHE_BYTES = 256 * 2 ** 20   # a split whose decoded images + masks fit is kept in memory once read
DEFAULT_TEST_SIZE = {"voc": 513, "coco": 641}
DEFAULT_CROP = 513

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
MASK_DIRS = ("SegmentationClass", "SegmentationClassPNG")   # VOC / labelme2voc


# ---------------------------------------------------------------------------------------- class lists
def read_classes(path: str) -> List[str]:
    """Class names from a text file, one per line (background first); blank lines and ``#`` comments
    are skipped, and labelme's ``__ignore__`` line (the 255 label) too."""
    names = [n for n in read_names(path, "pass a text file with one class name per line, background first")
             if n != "__ignore__"]
    if len(names) < 2:
        raise UserError(f"--classes {path} lists {len(names)} class(es)",
                        "list the background and at least one class, one per line")
    check_unique(names, path)
    if len(names) > IGNORE:
        raise UserError(f"--classes {path} lists {len(names)} classes, more than a PNG mask can hold with 255 "
                        "as the ignore label", "use at most 255 classes")
    return names


def voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map, ``[256, 3]`` uint8 (imgviz's ``label_colormap``)."""
    import imgviz
    return np.asarray(imgviz.label_colormap(), dtype=np.uint8)[:256]


# ---------------------------------------------------------------------------------------- file reading
def read_image(path: str) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]``; a file that is missing or does not decode is a user error."""
    return np.asarray(open_rgb(path, "replace or remove the file (and its line in the split list)"))


def read_mask(path: str) -> np.ndarray:
    """Class-index mask ``int64 [H, W]`` from a palette / grey-level PNG (palette PNGs hold indices)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                raise UserError(f"mask {path} is a colour ({im.mode}) image, not class indices",
                                "save masks as palette ('P') or grey-level PNGs whose pixel values are the class "
                                "indices (labelme2voc's SegmentationClassPNG is such a format)")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise UserError(f"mask {path} does not exist", "check the data root and the split list") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UserError(f"mask {path} cannot be decoded ({type(e).__name__})", "replace the file") from None
    if arr.ndim != 2:
        raise UserError(f"mask {path} has shape {arr.shape}, not H x W", "save one class index per pixel")
    return arr.astype(np.int64)


def image_size(path: str) -> Tuple[int, int]:
    """``(width, height)`` from the file header only."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise UserError(f"{path} does not exist", "check the data root and the split list") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} cannot be decoded ({type(e).__name__})", "replace or remove the file") from None


def check_mask(mask: np.ndarray, num_classes: int, path: str, image_hw: Optional[Tuple[int, int]] = None):
    """Raise a user error for a mask of the wrong size or with labels outside ``0 .. num_classes - 1``
    other than 255."""
    if image_hw is not None and tuple(mask.shape) != tuple(image_hw):
        raise UserError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                        f"{image_hw[1]}x{image_hw[0]}", "masks must have their image's size; re-export the mask")
    vals = np.unique(mask)
    bad = vals[((vals < 0) | (vals >= num_classes)) & (vals != IGNORE)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:5]) + (" ..." if bad.size > 5 else "")
        raise UserError(f"mask {path} has label(s) {shown} outside the class range 0..{num_classes - 1} "
                        f"(255 = ignore)", "pass --classes FILE listing every class (background first), or fix "
                                           "the mask")


# ---------------------------------------------------------------------------------------- transforms
class PadTo:
    """Test transform: pad right / bottom to ``size x size`` (image: the mean pixel, mask: 255), so
    the original pixels keep their place. A larger image is first scaled down (aspect kept) to fit --
    its mask too, nearest -- and evaluated at that size."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image, mask):
        from torchvision.transforms.v2 import functional as TF
        h, w = image.shape[-2:]
        if max(h, w) > self.size:
            dist.warn_once(f"images larger than the test size {self.size} are scaled down to fit "
                           "(pass a larger --test_size to evaluate them at full size)")
            s = self.size / max(h, w)
            size = [min(self.size, max(1, int(round(h * s)))), min(self.size, max(1, int(round(w * s))))]
            image, mask = TF.resize(image, size, antialias=True), TF.resize(mask, size)
            h, w = size
        pad = [0, 0, self.size - w, self.size - h]
        return TF.pad(image, pad, fill=list(MEAN_PIXEL)), TF.pad(mask, pad, fill=IGNORE)

    def __repr__(self):
        return f"PadTo({self.size})"


def _finish():
    from torchvision import tv_tensors
    from torchvision.transforms import v2
    return [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(MEAN, STD)]


class TrainTransform:
    """Training augmentation of image and mask together: rescaling by a factor drawn from ``scales`` (image
    bilinear with antialiasing, mask nearest), padding to ``crop`` where smaller (image: the mean pixel, mask:
    255, as much on both sides), a random ``crop x crop`` window, a horizontal flip (p = 0.5), to float, ImageNet
    normalisation. torchvision's v2 kernels called on plain tensors with the random draws of
    ``v2.RandomCrop(pad_if_needed=True)`` / ``v2.RandomHorizontalFlip`` in their order: the samples of the v2
    pipeline, at half its cost on small images (where its per-call dispatch outweighs the work)."""

    def __init__(self, crop: int, scales: Sequence[float] = SCALES, flip: bool = True):
        self.crop, self.scales, self.flip = int(crop), tuple(float(s) for s in scales), bool(flip)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        from torchvision.transforms.v2 import functional as TF
        image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        s = self.scales[int(torch.randint(len(self.scales), ()))]
        h, w = image.shape[-2:]
        size = [max(1, int(round(h * s))), max(1, int(round(w * s)))]
        image, mask = TF.resize_image(image, size, antialias=True), TF.resize_mask(mask, size)
        c = self.crop
        dh, dw = max(0, c - size[0]), max(0, c - size[1])
        if dh or dw:
            pad = [dw, dh, dw, dh]
            image, mask = TF.pad_image(image, pad, fill=list(MEAN_PIXEL)), TF.pad_mask(mask, pad, fill=IGNORE)
        h, w = image.shape[-2:]
        top = int(torch.randint(0, h - c + 1, ())) if h > c else 0
        left = int(torch.randint(0, w - c + 1, ())) if w > c else 0
        image, mask = image[..., top:top + c, left:left + c], mask[..., top:top + c, left:left + c]
        if self.flip and bool(torch.rand(1) < 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        return TF.normalize_image(TF.to_dtype_image(image, torch.float32, scale=True), list(MEAN), list(STD)), mask

    def __repr__(self):
        return f"TrainTransform(crop={self.crop}, scales={self.scales}, flip={self.flip})"


def train_transforms(crop: int, scales: Sequence[float] = SCALES, flip: bool = True) -> TrainTransform:
    """Random scale (default 0.5-2.0 step 0.25), pad to ``crop`` if needed, random crop, flip, to float,
    normalise: :class:`TrainTransform`."""
    return TrainTransform(crop, scales, flip)


def test_transforms(size: int):
    """Pad to ``size x size`` (see :class:`PadTo`), to float, normalise."""
    from torchvision.transforms import v2
    return v2.Compose([PadTo(size)] + _finish())


def denormalize(image: torch.Tensor) -> np.ndarray:
    """Normalised ``[3, H, W]`` -> ``uint8 [H, W, 3]``."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    x = (image.detach().cpu().float() * std + mean).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------- datasets
class SegmentationDataset(Dataset):
    """``items``: ``(image path, mask source)`` pairs; ``_mask(i)`` reads the mask.

    A split whose decoded images and masks fit in ``memory_bytes`` (estimated from its first sample;
    default :data:`MEMORY_CACHE_BYTES`, 0 = never) is kept in memory once read: small scene sets are then
    decoded and checked once, not every epoch (a third of a training step on 64-pixel scenes). Each
    process (loader worker, rank) keeps its own; a large dataset is always read from disk.
    """

    def __init__(self, items: Sequence[Tuple[str, object]], class_names: Sequence[str],
                 transforms: Optional[Callable] = None, name: str = "segmentation",
                 memory_bytes: Optional[int] = None):
        self.items = list(items)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.transforms = transforms
        self.name = name
        self.memory_bytes = MEMORY_CACHE_BYTES if memory_bytes is None else int(memory_bytes)
        self._decoded: Optional[dict] = None   # None: not decided yet; {} or filled: caching; False: off

    def __len__(self):
        return len(self.items)

    def _mask(self, i: int) -> np.ndarray:
        return read_mask(self.items[i][1])

    def _mask_name(self, i: int) -> str:
        return str(self.items[i][1])

    def load(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """The raw ``(uint8 [H, W, 3], int64 [H, W])`` pair, checked (fresh arrays: callers may modify them)."""
        hit = self._decoded.get(i) if self._decoded else None
        if hit is not None:
            return hit[0].copy(), hit[1].astype(np.int64)
        img = read_image(self.items[i][0])
        if not img.flags.writeable:
            img = np.array(img)
        mask = self._mask(i)
        check_mask(mask, self.num_classes, self._mask_name(i), img.shape[:2])
        if self._decoded is None:
            per_item = img.nbytes + mask.size * (1 if self.num_classes <= IGNORE else mask.itemsize)
            self._decoded = {} if per_item * len(self) <= self.memory_bytes else False
        if self._decoded is not False:   # checked labels: < num_classes or 255, so uint8 holds them
            self._decoded[i] = (np.array(img, copy=True),
                              mask.astype(np.uint8) if self.num_classes <= IGNORE else mask.copy())
        return img, mask

    def __getitem__(self, i: int):
        from torchvision import tv_tensors
        img, mask = self.load(i)
        image = tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1))
        target = tv_tensors.Mask(torch.from_numpy(mask))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image.as_subclass(torch.Tensor), target.as_subclass(torch.Tensor).long()

    def check_sizes(self, limit: Optional[int] = None):
        """Compare every mask's size with its image's from the file headers (fast; before training)."""
        for i in range(len(self) if limit is None else min(limit, len(self))):
            src = self.items[i][1]
            if not isinstance(src, str):
                continue
            iw, ih = image_size(self.items[i][0])
            mw, mh = image_size(src)
            if (iw, ih) != (mw, mh):
                raise UserError(f"mask {src} is {mw}x{mh} but its image is {iw}x{ih}",
                                "masks must have their image's size; re-export the mask")


def find_voc_root(data_root: str) -> str:
    """The folder holding ``JPEGImages``: ``data_root`` itself, ``data_root/VOC2012`` (or VOC2007),
    or ``data_root/VOCdevkit/VOC2012`` (or VOC2007)."""
    if not data_root or not os.path.isdir(data_root):
        raise UserError(f"data root {data_root!r} does not exist",
                        "pass --data_root DIR holding VOCdevkit/VOC2012 (or a VOC-layout folder)")
    for cand in (data_root, os.path.join(data_root, "VOC2012"), os.path.join(data_root, "VOCdevkit", "VOC2012"),
                 os.path.join(data_root, "VOC2007"), os.path.join(data_root, "VOCdevkit", "VOC2007")):
        if os.path.isdir(os.path.join(cand, "JPEGImages")):
            return cand
    raise UserError(f"no VOC layout under {data_root} (no JPEGImages in it, VOC2012/ or VOCdevkit/VOC2012/)",
                    "pass --data_root DIR with VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets}")


def _read_list(path: str, root: str, mask_dir: str) -> List[Tuple[str, str]]:
    items = []
    image_path = image_finder(os.path.join(root, "JPEGImages"))
    with open(path) as f:
        rows = unique_ids([" ".join(ln.split()) for ln in f if ln.split()], path)
    for row in rows:
        parts = row.split()
        if len(parts) >= 2:  # "/JPEGImages/x.jpg /SegmentationClassAug/x.png" (trainaug lists)
            items.append((os.path.join(root, parts[0].lstrip("/")), os.path.join(root, parts[1].lstrip("/"))))
        else:
            items.append((image_path(parts[0]), os.path.join(root, mask_dir, parts[0] + ".png")))
    if not items:
        raise UserError(f"split list {path} is empty", "list one image id per line")
    return items


def voc_items(root: str, split: str) -> Tuple[List[Tuple[str, str]], str]:
    """``(image, mask) paths`` of a VOC split (``train`` / ``val`` / ``trainval``), and a description."""
    sets = os.path.join(root, "ImageSets", "Segmentation")
    if split == "train":
        aug_list, aug_dir = os.path.join(sets, "train_aug.txt"), os.path.join(root, "SegmentationClassAug")
        if os.path.isfile(aug_list) and os.path.isdir(aug_dir):
            return _read_list(aug_list, root, "SegmentationClassAug"), "train_aug.txt + SegmentationClassAug"
    mask_dir = next((d for d in MASK_DIRS if os.path.isdir(os.path.join(root, d))
                     and any(f.endswith(".png") for f in os.listdir(os.path.join(root, d)))), None)
    if mask_dir is None:
        raise UserError(f"no SegmentationClass folder with PNG masks in {root}",
                        "a VOC-layout root needs SegmentationClass/<id>.png masks")
    lst = os.path.join(sets, f"{split}.txt")
    if os.path.isfile(lst):
        return _read_list(lst, root, mask_dir), f"{split}.txt + {mask_dir}"
    if os.path.isdir(sets):
        raise UserError(f"split list {lst} does not exist", f"add ImageSets/Segmentation/{split}.txt (one id per line)")
    # no ImageSets at all (labelme2voc output): every image that has a mask, for either split
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(root, mask_dir)) if f.endswith(".png"))
    if not ids:
        raise UserError(f"no masks in {os.path.join(root, mask_dir)}", "add <id>.png masks")
    dist.warn_once(f"{root} has no ImageSets/Segmentation: all {len(ids)} masked images are used for training "
                   "and for evaluation")
    image_path = image_finder(os.path.join(root, "JPEGImages"))
    return [(image_path(i), os.path.join(root, mask_dir, i + ".png")) for i in ids], f"all of {mask_dir}"


class VOCSegmentation(SegmentationDataset):
    """PASCAL VOC (or a VOC-layout root). ``class_names``: default the 21 VOC classes, or the root's
    ``classes_seg.txt`` / ``class_names.txt`` when it has one."""

    def __init__(self, data_root: str, split: str = "train", class_names: Optional[Sequence[str]] = None,
                 transforms: Optional[Callable] = None):
        root = find_voc_root(data_root)
        items, how = voc_items(root, split)
        if class_names is None:
            class_names = default_voc_classes(data_root, root)
        super().__init__(items, class_names, transforms, name="voc")
        self.root, self.split, self.source = root, split, how


def default_voc_classes(data_root: str, root: str) -> List[str]:
    """A classes file next to the data (the scene set's ``classes_seg.txt``, labelme's
    ``class_names.txt``), else the 21 VOC classes."""
    p = classes_file_near(data_root, ("classes_seg.txt", "class_names.txt"), root)
    return read_classes(p) if p else list(VOC_CLASSES)


def coco_cache_key(ann_file: str, cat_to_label: Dict[int, int]) -> str:
    """A short hash of what decides a drawn mask: the category id -> label mapping and the annotation
    file's content (not its path or time: a moved or re-extracted root keeps its masks), so masks of
    other classes or of an edited file are never reused."""
    import hashlib
    h = hashlib.sha1(repr(sorted((int(k), int(v)) for k, v in cat_to_label.items())).encode())
    with open(ann_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _has_objects(mask: np.ndarray) -> bool:
    return bool(((mask > 0) & (mask != IGNORE)).any())


class CocoSegmentation(SegmentationDataset):
    """Class masks drawn from COCO instance annotations (``ann_file``), images in ``image_dir``,
    masks cached as PNGs (drawn on first use, atomically written) in a subfolder of ``cache_dir``
    named by :func:`coco_cache_key`. Annotations without a segmentation are left out (with a warning);
    a file whose objects have none at all is a user error, not all-background masks."""

    def __init__(self, image_dir: str, ann_file: str, cache_dir: str, class_names: Optional[Sequence[str]] = None,
                 transforms: Optional[Callable] = None):
        if not os.path.isfile(ann_file):
            raise UserError(f"COCO annotation file {ann_file} does not exist",
                            "pass --data_root DIR holding annotations/instances_{train,val}2017.json")
        if not os.path.isdir(image_dir):
            raise UserError(f"COCO image folder {image_dir} does not exist",
                            "pass --data_root DIR holding train2017/ and val2017/")
        coco = load_coco_api(ann_file, "pass an instances_*.json file")
        cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
        things = [c for c in cats if c["name"] not in BACKGROUND]
        if class_names is None:
            class_names = ["background"] + [c["name"] for c in things]
            self.cat_to_label = {c["id"]: i + 1 for i, c in enumerate(things)}
        else:
            index = {n: i for i, n in enumerate(class_names)}
            unknown = [n for n in class_names[1:] if n not in {c["name"] for c in things}]
            if unknown:
                raise UserError(f"--classes names {', '.join(unknown[:5])} that {ann_file} has no category for",
                                "use the COCO category names (background first)")
            self.cat_to_label = {c["id"]: index[c["name"]] for c in things if c["name"] in index}
        objects = [a for a in coco.anns.values() if a.get("category_id") in self.cat_to_label]
        drawable = [a for a in objects if polygon_or_rle(a.get("segmentation")) is not None]
        if objects and not drawable:
            raise UserError(f"none of the {len(objects)} objects in {ann_file} has a segmentation (or a polygon "
                            "of 3 or more points)", "use an instances JSON whose annotations carry segmentation "
                                                    "polygons or RLE (a boxes-only file gives no masks)")
        if len(drawable) < len(objects):
            dist.warn_once(f"{len(objects) - len(drawable)} of the {len(objects)} objects in {ann_file} have no "
                           "segmentation (or only polygons of fewer than 3 points) and are left out of the masks")
        self.with_objects = {a["image_id"] for a in drawable if not a.get("iscrowd")}
        self.coco, self.image_dir, self.ann_file = coco, image_dir, ann_file
        self.cache_root = cache_dir
        self.cache_dir = os.path.join(cache_dir, coco_cache_key(ann_file, self.cat_to_label))
        ids = sorted(coco.getImgIds())
        items = [(os.path.join(image_dir, coco.imgs[i]["file_name"]), i) for i in ids]
        if not items:
            raise UserError(f"{ann_file} lists no images", "pass a non-empty annotation file")
        super().__init__(items, class_names, transforms, name="coco")
        self.source = f"{os.path.basename(ann_file)}, masks cached in {self.cache_dir}"

    def draw(self, img_id: int) -> np.ndarray:
        """The class mask of one image (uint8), drawn from its instances."""
        info = self.coco.imgs[img_id]
        mask = np.zeros((int(info["height"]), int(info["width"])), dtype=np.uint8)
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=[img_id], iscrowd=None))
        crowd = []
        for a in sorted(anns, key=lambda a: -float(a.get("area", 0.0))):
            seg = polygon_or_rle(a.get("segmentation"))
            if a["category_id"] not in self.cat_to_label or seg is None:
                continue
            try:
                m = self.coco.annToMask({**a, "segmentation": seg}).astype(bool)
            except Exception as e:   # pycocotools: ValueError, TypeError, or a bare Exception
                raise UserError(f"annotation {a.get('id')} of {self.ann_file} has a segmentation pycocotools cannot "
                                f"draw ({type(e).__name__}: {e})", "fix or remove the annotation") from None
            if m.shape != mask.shape:
                raise UserError(f"annotation {a.get('id')} of {self.ann_file} has an RLE of size "
                                f"{m.shape[1]}x{m.shape[0]} on image {img_id} of {mask.shape[1]}x{mask.shape[0]}",
                                "fix the RLE's size or the image's width / height")
            if a.get("iscrowd"):
                crowd.append(m)
            else:
                mask[m] = self.cat_to_label[a["category_id"]]
        for m in crowd:
            mask[m & (mask == 0)] = IGNORE
        return mask

    def _cache_path(self, img_id: int) -> str:
        return os.path.join(self.cache_dir, f"{img_id}.png")

    def _mask_name(self, i: int) -> str:
        return f"{self._cache_path(self.items[i][1])} (image id {self.items[i][1]} of {self.ann_file})"

    def _mask(self, i: int) -> np.ndarray:
        img_id = self.items[i][1]
        path = self._cache_path(img_id)
        if os.path.isfile(path):
            return read_mask(path)
        mask = self.draw(img_id)
        self._write(path, mask)
        return mask.astype(np.int64)

    def _write(self, path: str, mask: np.ndarray):
        from PIL import Image
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            im = Image.fromarray(mask, mode="P")
            im.putpalette(voc_palette().reshape(-1).tolist())
            im.save(tmp, format="PNG")
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"cannot write the COCO mask cache {self.cache_dir} ({e.strerror or e})",
                            "pass --mask_cache DIR in a writable place") from None

    def build_cache(self, show_progress: bool = True):
        """Draw every missing mask now (rank 0; the others wait). Images with objects whose masks all
        come out without an object pixel are a user error (the masks drawn are removed again): they
        would train on background only and score a perfect mIoU."""
        from common.logger import progress
        err = None
        if dist.is_main():
            try:
                self._draw_missing(progress, show_progress)
            except UserError as e:
                err = e
        if dist.any_rank(err is not None):
            raise err or UserError(f"drawing the COCO masks of {self.ann_file} failed on the first process",
                                   "see its message")

    def _draw_missing(self, progress, show_progress: bool):
        todo = [i for i, (_, img_id) in enumerate(self.items) if not os.path.isfile(self._cache_path(img_id))]
        if todo:
            log(f"drawing {len(todo)} COCO class masks into {self.cache_dir} (once)")
        want = [i for i, (_, img_id) in enumerate(self.items) if img_id in self.with_objects]
        found, written = False, []
        for i in progress(todo, "coco masks", show_progress):
            img_id = self.items[i][1]
            mask = self.draw(img_id)
            self._write(self._cache_path(img_id), mask)
            written.append(self._cache_path(img_id))
            found = found or (img_id in self.with_objects and _has_objects(mask))
        if want and not found:   # the masks drawn before may hold the objects
            done = set(todo)
            found = any(_has_objects(read_mask(self._cache_path(self.items[i][1]))) for i in want if i not in done)
        if want and not found:
            for path in written:
                os.remove(path)
            raise UserError(f"the objects of {len(want)} image(s) in {self.ann_file} cover no pixel of their "
                            "masks", "check the segmentation polygons / RLE (they must lie inside the image)")


# ---------------------------------------------------------------------------------------- loaders
class UnwrapWorkerErrors:
    """Iterate a DataLoader; a :class:`UserError` raised in a worker process arrives as a
    ``UserError`` whose message holds the worker's traceback -- re-raise it as its own one line."""

    def __init__(self, loader: DataLoader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError as e:
                msg = worker_message(str(e))
                if msg != str(e):
                    raise UserError(msg) from None
                raise
            yield batch


def make_loader(ds: Dataset, batch_size: int, *, train: bool, workers: int, ctx=None, seed: Optional[int] = None,
                drop_last: Optional[bool] = None) -> UnwrapWorkerErrors:
    """A DataLoader: training -- shuffled (``DistributedSampler`` under DDP), drop the last partial
    batch when there is more than one; evaluation -- in order, sharded without padding."""
    ctx = ctx or dist.context()
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed + ctx.rank)
    if train:
        # one process too: a DistributedSampler's order depends only on (seed, epoch), so a resumed run
        # sees the batches the uninterrupted run would have seen (set_epoch every epoch)
        from torch.utils.data.distributed import DistributedSampler
        if seed is None:
            seed = int(torch.randint(2 ** 31 - 1, ()))
        sampler, shuffle = DistributedSampler(ds, ctx.world_size, ctx.rank, shuffle=True, seed=seed), None
        if drop_last is None:
            drop_last = len(ds) // max(ctx.world_size, 1) > batch_size
    else:
        sampler, shuffle, drop_last = ShardSampler(len(ds), ctx.rank, ctx.world_size), None, False
    loader = DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
                        pin_memory=ctx.device.type == "cuda", drop_last=bool(drop_last), generator=g,
                        worker_init_fn=seed_worker, persistent_workers=False)
    return UnwrapWorkerErrors(loader)


@dataclass
class SegData:
    """What :func:`build_datasets` returns."""

    name: str
    class_names: List[str]
    train: Optional[SegmentationDataset]
    val: SegmentationDataset
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_datasets(dataset: str, data_root: str, *, crop_size: int, test_size: int, classes: Optional[str] = None,
                   class_names: Optional[Sequence[str]] = None, mask_cache: Optional[str] = None, train: bool = True, scales: Sequence[float] = SCALES,
                   train_subset: Optional[int] = None, val_subset: Optional[int] = None,
                   check: bool = True) -> SegData:
    """The training (``train=True``) and validation sets of ``dataset`` (``voc`` / ``coco``)."""
    names = read_classes(classes) if classes else (list(class_names) if class_names else None)
    own = classes_file_near(data_root, ("classes_seg.txt", "class_names.txt"), find_voc_root(data_root)) \
        if dataset == "voc" and names is not None else None
    if own and not classes:   # the root's own classes file wins over a checkpoint's names (which must match it)
        names = None
    elif own and not same_names(names, read_classes(own)):   # the masks' values follow the root's own file
        raise UserError(f"--classes {classes} names other classes (or another order) than {own}, which the "
                        "masks' values follow", f"drop --classes, or pass {own}")
    tr_tf, te_tf = train_transforms(crop_size, scales), test_transforms(test_size)
    if dataset == "voc":
        val = VOCSegmentation(data_root, "val", names, te_tf)
        tr = VOCSegmentation(data_root, "train", val.class_names, tr_tf) if train else None
        info = {"root": val.root, "val": val.source, "train": tr.source if tr else None}
    elif dataset == "coco":
        if not data_root or not os.path.isdir(data_root):
            raise UserError(f"data root {data_root!r} does not exist",
                            "pass --data_root DIR holding train2017/, val2017/ and annotations/")
        if not os.path.isdir(os.path.join(data_root, "annotations")) and \
                os.path.isdir(os.path.join(data_root, "coco", "annotations")):
            data_root = os.path.join(data_root, "coco")   # DIR/coco, as detection takes it (the scene set)
        cache = mask_cache or os.path.join(data_root, "seg_masks")

        def coco(split, tf, names_):
            return CocoSegmentation(os.path.join(data_root, f"{split}2017"),
                                    os.path.join(data_root, "annotations", f"instances_{split}2017.json"),
                                    os.path.join(cache, f"{split}2017"), names_, tf)
        val = coco("val", te_tf, names)
        tr = coco("train", tr_tf, names) if train else None
        if tr is not None and tr.class_names != val.class_names:
            only = [f"{w} only: {', '.join(sorted(set(a.class_names) - set(b.class_names))[:5])}"
                    for w, a, b in (("train", tr, val), ("val", val, tr)) if set(a.class_names) - set(b.class_names)]
            raise UserError("the COCO train and val annotation files list different categories"
                            + (f" ({'; '.join(only)})" if only else " (in another order)"),
                            "use the matching instances_train2017.json / instances_val2017.json")
        info = {"root": data_root, "val": val.source, "train": tr.source if tr else None}
    else:
        raise UserError(f"unknown dataset {dataset!r}", "pass -d voc or -d coco")
    for ds, n, flag in ((tr, train_subset, "--train-subset"), (val, val_subset, "--val-subset")):
        if ds is not None and n is not None:
            if n > len(ds.items):
                log(f"{flag} {n}: the split has {len(ds.items)} images, all used")
            ds.items = ds.items[:max(1, int(n))]
    if check:
        for ds in (tr, val):
            if ds is not None:
                ds.check_sizes()
        if dataset == "coco":
            for ds in (val, tr):
                if ds is not None:
                    ds.build_cache()
    return SegData(dataset, list(val.class_names), tr, val, info)


__all__ = ["IGNORE", "MEAN", "STD", "SCALES", "VOC_CLASSES", "DEFAULT_TEST_SIZE", "DEFAULT_CROP", "read_classes",
           "read_image", "read_mask", "check_mask", "voc_palette", "TrainTransform", "PadTo", "train_transforms",
           "test_transforms", "denormalize", "SegmentationDataset", "VOCSegmentation", "CocoSegmentation",
           "find_voc_root", "voc_items", "ShardSampler", "UnwrapWorkerErrors", "make_loader", "SegData",
           "build_datasets"]
