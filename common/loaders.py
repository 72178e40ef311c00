"""Data-loading pieces every task uses: the evaluation sampler, worker seeding, classes files, image decoding."""
from __future__ import annotations

import os
import random
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from .errors import UserError

#: ImageNet's per-channel mean and standard deviation (RGB, pixels in [0, 1]): every task normalises its
#: images with them, so that an ImageNet-pretrained backbone sees inputs as it was trained on
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def open_rgb(path: str, hint: str = "replace or remove the file"):
    """The image at ``path`` as a loaded RGB ``PIL.Image`` (also torchvision ``ImageFolder``'s
    ``loader``); a file that is missing or does not decode is a :class:`UserError` naming it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I") or im.mode == "F":  # 16 / 32-bit grey: PIL's convert clips to 255
                return Image.fromarray(_to_uint8(np.asarray(im), im.mode)).convert("RGB")
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist", hint) from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        why = " ".join(str(e).split())[:120] or type(e).__name__
        raise UserError(f"image {path} cannot be decoded ({why})", hint) from None


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """A 16 / 32-bit grey image in 8 bits: 16-bit values (``I;16*``, or ``I`` above 255 -- PNG's 16-bit
    grey) by 65535 -> 255, integer values up to 255 as they are, floats by their own maximum."""
    a = a.astype(np.float64)
    top = a.max(initial=0.0)
    scale = 255.0 / max(top, 1e-12) if mode == "F" else (255.0 / 65535.0 if mode.startswith("I;16") or top > 255 else 1.0)
    return np.clip(a * scale, 0, 255).round().astype(np.uint8)


#: a first class of these names is the background (labelme writes ``_background_``)
BACKGROUND = ("background", "_background_", "__background__", "bg")


def image_finder(folder: str, exts: Sequence[str] = (".jpg", ".jpeg", ".png", ".bmp")) -> Callable[[str], str]:
    """``img_id -> path`` in a VOC ``JPEGImages`` folder: ``<id>`` with one of ``exts`` in any letter case
    (``000025.JPG``); the folder is listed once, and only when an exact name is missing. An id without an
    image gets ``<id>.jpg`` (reading it then names the missing file)."""
    by_stem: Dict[str, str] = {}
    listed = []

    def find(img_id: str) -> str:
        for ext in exts:
            p = os.path.join(folder, img_id + ext)
            if os.path.isfile(p):
                return p
        if not listed:
            listed.append(True)
            for f in sorted(os.listdir(folder)):
                stem, ext = os.path.splitext(f)
                if ext.lower() in exts:
                    by_stem.setdefault(stem, f)
        return os.path.join(folder, by_stem.get(img_id, img_id + ".jpg"))
    return find


def unique_ids(ids: List[str], lst: str) -> List[str]:
    """``ids`` without repeats (first occurrence and order kept): an image listed twice in a split file
    would be trained on / scored twice. Repeats are named in one warning."""
    out = list(dict.fromkeys(ids))
    if len(out) < len(ids):
        from . import dist
        from collections import Counter
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)
        dist.warn_once(f"{lst} lists {len(ids) - len(out)} repeated image id(s) ({', '.join(dup[:5])}"
                       f"{', ...' if len(dup) > 5 else ''}); each image is used once")
    return out


def name_key(name: str) -> str:
    """A class name as compared across files: case, spaces, ``_`` ``-`` ``/`` ignored and the background's
    spellings one (labelme writes ``potted plant``, ``tv/monitor``, ``_background_`` for VOC's
    ``pottedplant``, ``tvmonitor``, ``background``)."""
    n = str(name).strip().lower()
    return "background" if n in BACKGROUND else "".join(c for c in n if c not in " _-/")


def same_names(a: Sequence[str], b: Sequence[str]) -> bool:
    return len(a) == len(b) and all(name_key(x) == name_key(y) for x, y in zip(a, b))


def read_names(path: str, hint: str, flag: str = "--classes") -> list:
    """The names of a text file, one per line (UTF-8, a byte-order mark allowed); blank lines and ``#``
    comments skipped. A missing or undecodable file is a :class:`UserError`."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path} does not exist", hint)
    try:
        with open(path, encoding="utf-8-sig") as f:
            names = [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {path} is not UTF-8 text ({e.reason} at byte {e.start})",
                        "save it as UTF-8, one class name per line") from None
    return names


def check_unique(names: Sequence[str], path: str, flag: str = "--classes"):
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{flag} {path} lists {', '.join(dup)} more than once", "list every class once")


class ShardSampler(Sampler):
    """Evaluation sampler: rank ``r`` of ``w`` takes indices ``r, r + w, ...`` -- no padding, so no
    sample counts twice in the metrics reduced over the ranks."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def seed_worker(worker_id: int):
    """``worker_init_fn``: Python's and NumPy's RNGs of a loader worker follow its torch seed."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def classes_file_near(data_root: str, names: Sequence[str], *extra: Optional[str]) -> Optional[str]:
    """A classes file that belongs to a data root: in the root, in the folders ``extra``, or -- when the
    root is (inside) a ``VOCdevkit`` folder -- next to that folder (the scene set keeps
    ``classes.txt`` / ``classes_seg.txt`` beside ``VOCdevkit/``)."""
    folders = [data_root] + [e for e in extra if e]
    p = os.path.abspath(os.path.expanduser(data_root or "."))
    while p != os.path.dirname(p):
        if os.path.basename(p) == "VOCdevkit":
            folders.append(os.path.dirname(p))
            break
        p = os.path.dirname(p)
    for folder in folders:
        for name in names:
            f = os.path.join(os.path.expanduser(folder), name)
            if os.path.isfile(f):
                return f
    return None


def load_coco_api(ann_file: str, hint: str):
    """``pycocotools.coco.COCO`` of an annotation file, quietly; a file that is not COCO JSON, or whose
    image ids are not integers (pycocotools indexes by them; some exporters write file names), is a
    one-line error. Annotations without ``area`` / ``iscrowd`` get them (:func:`_fill_areas`)."""
    import contextlib
    import io

    from pycocotools.coco import COCO

    from .errors import UserError
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(ann_file)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"COCO annotation file {ann_file} is not valid COCO JSON ({type(e).__name__}: {e})",
                        hint) from None
    ids = [im.get("id") for im in coco.dataset.get("images", [])] + \
        [a.get("image_id") for a in coco.dataset.get("annotations", [])]
    odd = next((i for i in ids if not isinstance(i, int) or isinstance(i, bool)), None)
    if odd is not None:
        raise UserError(f"COCO annotation file {ann_file} has the image id {odd!r}, not an integer",
                        "number the images with integer ids (pycocotools needs them) and use those as the "
                        "annotations' image_id")
    _fill_areas(coco)
    return coco


def polygon_or_rle(seg) -> Optional[object]:
    """The part of a COCO ``segmentation`` that pycocotools can draw: an RLE dict as it is, polygons of
    at least 3 points (a shorter one is no area, and pycocotools fails on it: 4 numbers read as a box);
    a flat list of numbers is one polygon. ``None`` when nothing is left."""
    if isinstance(seg, dict):
        return seg if "counts" in seg and "size" in seg else None
    if not isinstance(seg, (list, tuple)) or not seg:
        return None
    if all(isinstance(v, (int, float)) for v in seg):
        seg = [seg]
    polys = [list(q) for q in seg if isinstance(q, (list, tuple)) and len(q) >= 6
             and all(isinstance(v, (int, float)) for v in q)]
    return polys or None


def _fill_areas(coco):
    """Give every annotation the ``area`` and ``iscrowd`` that COCOeval reads and the segmentation masks'
    drawing order uses (larger first): a missing area is the drawable segmentation's pixel area
    (:func:`polygon_or_rle`), else the box's ``w * h``; given values stay."""
    from pycocotools import mask as mask_utils
    for a in coco.dataset.get("annotations", []):
        a.setdefault("iscrowd", 0)
        if "area" in a:
            continue
        seg, area = polygon_or_rle(a.get("segmentation")), None
        if seg is not None:
            try:
                area = float(mask_utils.area(coco.annToRLE({**a, "segmentation": seg})))
            except Exception:  # noqa: BLE001 - an unsized / malformed segmentation: the box's area
                area = None
        if area is None:
            bbox = a.get("bbox") or []
            area = float(bbox[2]) * float(bbox[3]) if len(bbox) == 4 else 0.0
        a["area"] = area
