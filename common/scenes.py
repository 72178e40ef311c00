"""Offline scene set for detection and segmentation: Fashion-MNIST items pasted onto textured canvases.

One deterministic generator (from a seed) shared by ``detection/`` and ``segmentation/``. Each scene is
an RGB ``size x size`` canvas with a non-trivial background (a smooth four-corner colour gradient, low-
frequency colour noise, a sinusoidal texture and pixel noise) onto which 1-4 Fashion-MNIST items are
pasted at random scales and positions, tinted with a random colour (the item's grey levels modulate the
tint). Items may overlap partially; later items occlude earlier ones (an item is only placed if every
earlier item keeps at least ``min_visible`` of its pixels and the boxes overlap with IoU < 0.5).

Ground truth, all from the generator (not re-derived from the JPEG):

* the per-pixel instance mask of item ``k`` = its resized grey value > ``MASK_THRESHOLD`` (of 255),
  minus the pixels covered by later items (the visible part);
* its box = the pixel extent of that visible mask (VOC: 1-based inclusive ``xmin ymin xmax ymax``;
  COCO: ``[x, y, w, h]`` with ``w = xmax - xmin + 1``);
* ``SegmentationClass`` = class index k (1-based, 0 = background) per pixel, **no** 255 ignore border
  by default (``border=1`` adds VOC's 1-pixel 255 band around every item, in both PNGs);
* ``SegmentationObject`` = instance index (1..n in paste order) per pixel.

Train scenes use Fashion-MNIST's training images, test scenes its t10k images. Scene ``i`` of a split
is drawn from ``numpy.random.default_rng([seed, split, i])``, so a larger set starts with the same
scenes as a smaller one of the same seed, and worker processes (one per core for large sets) write the
same files as one process.

Layout written under ``out`` (the segmentation task reads it; see ``docs/detection.md``)::

    VOCdevkit/VOC2007/{JPEGImages/<id>.jpg, Annotations/<id>.xml, SegmentationClass/<id>.png,
                       SegmentationObject/<id>.png, ImageSets/Main/{trainval,test}.txt,
                       ImageSets/Segmentation/{train,val}.txt}
    VOCdevkit/VOC2012 -> VOC2007
    coco/{train2017,val2017}/<id>.jpg, coco/annotations/instances_{train,val}2017.json
    classes.txt, classes_seg.txt, scenes.json (the parameters; a second call with the same ones is a no-op)

CLI: ``python -m common.scenes --out data/scenes --train 200 --test 50 --size 128 --seed 0``.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import UserError

CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
MASK_THRESHOLD = 40          # grey level (of 255) above which a resized item pixel belongs to the item
VERSION = 1                  # bump when the generator's output changes
STAMP = "scenes.json"
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


# ---------------------------------------------------------------------------------------- sources
def fashion_mnist_dir() -> str:
    return os.environ.get("FASHION_MNIST_DIR", DEBIAN_FASHION_MNIST)


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise UserError(f"{path} is not an idx file of unsigned bytes", "reinstall dataset-fashion-mnist")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated", "reinstall dataset-fashion-mnist")
    return arr.reshape(shape)


def load_fashion_mnist(split: str, folder: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(images ``[N, 28, 28]`` uint8, labels ``[N]``) of the ``train`` or ``test`` split."""
    folder = folder or fashion_mnist_dir()
    out = []
    for name in _FILES[split]:
        for cand in (os.path.join(folder, name + ".gz"), os.path.join(folder, name)):
            if os.path.isfile(cand):
                out.append(_read_idx(cand))
                break
        else:
            raise UserError(f"Fashion-MNIST file {name}(.gz) not found in {folder}",
                            "apt-get install dataset-fashion-mnist (or set FASHION_MNIST_DIR to the folder "
                            "holding the *-ubyte(.gz) files)")
    return out[0], out[1]


# ---------------------------------------------------------------------------------------- drawing
def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette (``[n, 3]`` uint8)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small ``[h, w, C]`` grid to ``[size, size, C]``."""
    h, w = grid.shape[:2]
    ys = np.linspace(0, h - 1, size)
    xs = np.linspace(0, w - 1, size)
    y0 = np.floor(ys).astype(int).clip(0, h - 2 if h > 1 else 0)
    x0 = np.floor(xs).astype(int).clip(0, w - 2 if w > 1 else 0)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    rows = grid[:, x0] * (1 - fx) + grid[:, x1] * fx    # every grid row along x first: h x size, not size x size
    return rows[y0] * (1 - fy) + rows[y1] * fy


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float ``[size, size, 3]`` background in [0, 1]: gradient + colour noise + texture + grain."""
    corners = rng.uniform(0.05, 0.95, size=(2, 2, 3))
    img = _upsample(corners, size)
    cells = int(rng.integers(3, 7))
    img += 0.18 * (_upsample(rng.uniform(-1, 1, size=(cells, cells, 3)), size))
    yy, xx = np.mgrid[0:size, 0:size] / size
    ang = rng.uniform(0, np.pi)
    freq = rng.uniform(4, 16)
    wave = np.sin(2 * np.pi * freq * (np.cos(ang) * xx + np.sin(ang) * yy) + rng.uniform(0, 2 * np.pi))
    img += rng.uniform(0.02, 0.12) * wave[..., None] * rng.uniform(0.3, 1.0, size=3)
    img += rng.normal(0, 0.03, size=img.shape)
    return img.clip(0, 1)


def _tint(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random saturated colour that differs from the mean background colour ``under``."""
    best, best_d = None, -1.0
    for _ in range(8):
        c = rng.uniform(0, 1, size=3)
        c[int(rng.integers(3))] = rng.uniform(0.75, 1.0)    # at least one bright channel
        d = float(np.abs(c - under).sum())
        if d > best_d:
            best, best_d = c, d
        if d > 0.9:
            break
    return best


def _resize_item(item: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), dtype=np.uint8)


@dataclass
class Scene:
    image: np.ndarray                 # [S, S, 3] uint8
    instances: np.ndarray             # [S, S] uint8, 0 = background, k = k-th item (paste order, 1-based)
    labels: List[int]                 # 0-based class index per instance
    boxes: List[Tuple[int, int, int, int]]  # 0-based inclusive (x0, y0, x1, y1) of each visible mask


def render_scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, size: int,
                 max_items: int = 4, scale: Tuple[float, float] = (0.3, 0.65),
                 min_visible: float = 0.6) -> Scene:
    """One scene: 1..max_items items of ``images`` (``[N, 28, 28]``) on a ``size x size`` canvas.

    ``scale``: the side of a pasted 28x28 item as a fraction of the canvas side.
    """
    canvas = _background(rng, size)
    inst = np.zeros((size, size), dtype=np.uint8)
    n_want = int(rng.integers(1, max_items + 1))
    placed_boxes: List[Tuple[int, int, int, int]] = []
    placed_labels: List[int] = []
    areas: List[int] = []
    for _ in range(n_want):
        for _attempt in range(25):
            idx = int(rng.integers(len(images)))
            side = max(8, int(round(rng.uniform(*scale) * size)))
            grey = _resize_item(images[idx], side)
            mask = grey > MASK_THRESHOLD
            ys, xs = np.nonzero(mask)
            if len(ys) < 12:
                continue
            # crop to the item's extent so that any position keeps the item inside the canvas
            g = grey[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            m = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            h, w = m.shape
            if h > size or w > size:
                continue
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            new_inst = inst.copy()
            region = new_inst[y:y + h, x:x + w]
            region[m] = len(placed_boxes) + 1
            # every earlier item keeps enough of itself, and the boxes are not near-duplicates
            ok = all((new_inst == k + 1).sum() >= min_visible * areas[k] for k in range(len(areas)))
            if ok and placed_boxes:
                box = (x, y, x + w - 1, y + h - 1)
                ok = max(_iou(box, b) for b in placed_boxes) < 0.5
            if not ok:
                continue
            under = canvas[y:y + h, x:x + w][m].mean(0)
            colour = _tint(rng, under)
            shade = (0.35 + 0.65 * (g.astype(np.float64) / 255.0))[..., None] * colour
            alpha = np.clip((g.astype(np.float64) - MASK_THRESHOLD * 0.5) / MASK_THRESHOLD, 0, 1)[..., None]
            alpha[m] = 1.0
            patch = canvas[y:y + h, x:x + w]
            canvas[y:y + h, x:x + w] = patch * (1 - alpha) + shade * alpha
            inst = new_inst
            placed_boxes.append((x, y, x + w - 1, y + h - 1))
            placed_labels.append(int(labels[idx]))
            areas.append(int(m.sum()))
            break
    boxes = []
    for k in range(len(placed_boxes)):
        ys, xs = np.nonzero(inst == k + 1)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())))
    image = (canvas * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    return Scene(image, inst, placed_labels, boxes)


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = ix * iy
    ua = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / ua


# ---------------------------------------------------------------------------------------- writers
def _voc_xml(img_id: str, size: int, scene: Scene) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{img_id}.jpg"
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = "Fast-SNN Fashion-MNIST scenes"
    sz = ET.SubElement(root, "size")
    ET.SubElement(sz, "width").text = str(size)
    ET.SubElement(sz, "height").text = str(size)
    ET.SubElement(sz, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "1"
    for lab, (x0, y0, x1, y1) in zip(scene.labels, scene.boxes):
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = CLASSES[lab]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        bb = ET.SubElement(obj, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), (x0 + 1, y0 + 1, x1 + 1, y1 + 1)):
            ET.SubElement(bb, k).text = str(v)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8")


def _border(inst: np.ndarray) -> np.ndarray:
    """Pixels within 1 px (8-neighbourhood) of a different instance value: VOC's ignore band."""
    p = np.pad(inst, 1, mode="edge")
    band = np.zeros(inst.shape, dtype=bool)
    h, w = inst.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                band |= p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] != inst
    return band


def _save_palette_png(path: str, arr: np.ndarray, palette: np.ndarray):
    from PIL import Image
    im = Image.fromarray(arr.astype(np.uint8), mode="P")
    im.putpalette(palette.reshape(-1).tolist())
    im.save(path)


def _link_or_copy(src: str, dst: str):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _coco_objects(sc: Scene) -> List[dict]:
    """The COCO annotation fields of each item of a scene (RLE of its visible mask; ids added later)."""
    from pycocotools import mask as mask_utils
    out = []
    for k, (lab, (x0, y0, x1, y1)) in enumerate(zip(sc.labels, sc.boxes)):
        m = np.asfortranarray((sc.instances == k + 1).astype(np.uint8))
        rle = mask_utils.encode(m)
        rle["counts"] = rle["counts"].decode("ascii")
        out.append({"category_id": lab + 1, "bbox": [x0, y0, x1 - x0 + 1, y1 - y0 + 1], "area": int(m.sum()),
                    "iscrowd": 0, "segmentation": rle})
    return out


def _coco_json(split_ids: Sequence[str], objects: Dict[str, List[dict]], size: int, ann_start: int) -> dict:
    images, anns = [], []
    aid = ann_start
    for img_id in split_ids:
        images.append({"id": int(img_id), "file_name": f"{img_id}.jpg", "width": size, "height": size})
        for o in objects[img_id]:
            anns.append({"id": aid, "image_id": int(img_id), **o})
            aid += 1
    cats = [{"id": i + 1, "name": n, "supercategory": "fashion"} for i, n in enumerate(CLASSES)]
    return {"info": {"description": "Fast-SNN Fashion-MNIST scenes"}, "licenses": [],
            "images": images, "annotations": anns, "categories": cats}


@dataclass
class ScenePaths:
    root: str
    voc_root: str          # .../VOCdevkit
    voc2007: str           # .../VOCdevkit/VOC2007
    coco_root: str         # .../coco
    classes: str           # classes.txt
    classes_seg: str       # classes_seg.txt
    train_ids: List[str]
    test_ids: List[str]
    generated: bool        # False when an identical set was already there


def _params(n_train, n_test, size, seed, max_items, scale, min_visible, border) -> dict:
    return {"version": VERSION, "train": int(n_train), "test": int(n_test), "size": int(size), "seed": int(seed),
            "max_items": int(max_items), "scale": [float(scale[0]), float(scale[1])],
            "min_visible": float(min_visible), "border": int(border)}


def _paths(out: str, n_train: int, n_test: int, generated: bool) -> ScenePaths:
    ids = [f"{i:06d}" for i in range(1, n_train + n_test + 1)]
    return ScenePaths(out, os.path.join(out, "VOCdevkit"), os.path.join(out, "VOCdevkit", "VOC2007"),
                      os.path.join(out, "coco"), os.path.join(out, "classes.txt"),
                      os.path.join(out, "classes_seg.txt"), ids[:n_train], ids[n_train:], generated)


def check_scene_params(n_train: int, n_test: int, size: int, scale: Tuple[float, float], scale_flag: str = "--scale"):
    """The scene counts, canvas side and item scale of a set (``make_scenes``, the demos before they write
    anything): a one-line error naming the flag."""
    if n_train < 1 or n_test < 1:
        raise UserError(f"--train {n_train} / --test {n_test}: both splits need at least one scene",
                        "pass positive counts")
    if size < 32:
        raise UserError(f"--size {size} is too small", "use a canvas of at least 32 pixels")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise UserError(f"{scale_flag} {scale[0]:g} {scale[1]:g}: the item sizes must satisfy 0 < MIN <= MAX <= 1 "
                        "(fractions of the canvas side)", f"pass e.g. {scale_flag} 0.3 0.65")


#: below this many scenes (or canvases) they are rendered in the calling process: a worker's start costs more
PARALLEL_MIN = 400


@dataclass(frozen=True)
class _SceneJob:
    """What a worker needs to render and write scene ``i`` of a split (picklable)."""
    seed: int
    size: int
    max_items: int
    scale: Tuple[float, float]
    min_visible: float
    border: int
    source: Optional[str]
    dirs: Dict[str, str]
    coco_train: str
    coco_test: str

    def __call__(self, chunk: Sequence[Tuple[int, int, str]]) -> List[Tuple[str, List[dict]]]:
        from PIL import Image
        palette = voc_colormap()
        out = []
        for split_no, i, img_id in chunk:
            images, labels = fashion(("train", "test")[split_no], self.source)
            rng = np.random.default_rng([self.seed, split_no, i])
            sc = render_scene(rng, images, labels, self.size, self.max_items, self.scale, self.min_visible)
            jpg = os.path.join(self.dirs["JPEGImages"], f"{img_id}.jpg")
            Image.fromarray(sc.image).save(jpg, quality=95)
            _link_or_copy(jpg, os.path.join(self.coco_train if split_no == 0 else self.coco_test, f"{img_id}.jpg"))
            with open(os.path.join(self.dirs["Annotations"], f"{img_id}.xml"), "wb") as f:
                f.write(_voc_xml(img_id, self.size, sc))
            cls = np.zeros_like(sc.instances)
            for k, lab in enumerate(sc.labels):
                cls[sc.instances == k + 1] = lab + 1
            obj = sc.instances.copy()
            if self.border:
                band = _border(sc.instances)
                cls[band] = 255
                obj[band] = 255
            _save_palette_png(os.path.join(self.dirs["SegmentationClass"], f"{img_id}.png"), cls, palette)
            _save_palette_png(os.path.join(self.dirs["SegmentationObject"], f"{img_id}.png"), obj, palette)
            out.append((img_id, _coco_objects(sc)))
        return out


_FASHION: Dict[Tuple[str, Optional[str]], Tuple[np.ndarray, np.ndarray]] = {}


def fashion(split: str, source: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`load_fashion_mnist`, read once per process."""
    key = (split, source)
    if key not in _FASHION:
        _FASHION[key] = load_fashion_mnist(split, source)
    return _FASHION[key]


def map_chunks(fn, items: Sequence, workers: Optional[int], chunk: int = 64) -> List:
    """``fn`` over ``items`` in chunks of ``chunk``, results flattened in order: in ``workers`` forked
    processes (default one per usable core when there are :data:`PARALLEL_MIN` items or more), else here.
    Forked like PyTorch's loader workers (a spawned one would re-run an unguarded ``__main__``); ``fn``
    must not use PyTorch (a forked child inherits its thread pool broken); the renderers use NumPy, Pillow and
    pycocotools only. Where fork does not exist: here."""
    import multiprocessing
    from .cli import usable_cpus
    n = (usable_cpus() if len(items) >= PARALLEL_MIN else 0) if workers is None else workers
    chunks = [items[k:k + chunk] for k in range(0, len(items), chunk)]
    if n <= 1 or len(chunks) <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [r for c in chunks for r in fn(c)]
    with multiprocessing.get_context("fork").Pool(min(n, len(chunks))) as pool:
        return [r for part in pool.imap(fn, chunks) for r in part]


def make_scenes(out: str, n_train: int, n_test: int, size: int = 128, seed: int = 0, *, max_items: int = 4,
                scale: Tuple[float, float] = (0.3, 0.65), min_visible: float = 0.6, border: int = 0,
                source: Optional[str] = None, log=print, replace: bool = False,
                workers: Optional[int] = None) -> ScenePaths:
    """Write the scene set under ``out`` (see the module docstring); a no-op if it is already there. A
    set of other parameters there is an error unless ``replace``. ``workers`` processes render and write
    the scenes (default: one per usable core for :data:`PARALLEL_MIN` scenes or more, else none); every
    scene comes from its own seeded generator, so the files are the same for any count."""
    check_scene_params(n_train, n_test, size, scale)
    if border not in (0, 1):
        raise UserError(f"border={border}", "use 0 (no ignore band) or 1 (VOC's 1-pixel 255 band)")
    params = _params(n_train, n_test, size, seed, max_items, scale, min_visible, border)
    stamp = os.path.join(out, STAMP)
    if os.path.isfile(stamp):
        try:
            with open(stamp) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old == params and os.path.isdir(os.path.join(out, "VOCdevkit", "VOC2007", "JPEGImages")):
            return _paths(out, n_train, n_test, False)
        if isinstance(old, dict) and old != params and not replace:
            diff = ", ".join(f"{k} {old.get(k)} -> {v}" for k, v in params.items() if old.get(k) != v)
            raise UserError(f"{out} holds a scene set of other parameters ({diff})",
                            "pass --fresh to replace it, or another --out")
    elif os.path.exists(os.path.join(out, "VOCdevkit")) or os.path.exists(os.path.join(out, "coco")):
        raise UserError(f"{out} already holds a VOCdevkit/ or coco/ folder that this generator did not write "
                        f"(no {STAMP})", "choose another --out folder")
    for split in ("train", "test"):   # here, so that a missing source is a one-line error, not a worker's
        fashion(split, source)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f".scenes-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    voc = os.path.join(tmp, "VOCdevkit", "VOC2007")
    dirs = {k: os.path.join(voc, k) for k in ("JPEGImages", "Annotations", "SegmentationClass",
                                               "SegmentationObject", "ImageSets/Main", "ImageSets/Segmentation")}
    for d in dirs.values():
        os.makedirs(d)
    coco = os.path.join(tmp, "coco")
    for d in ("train2017", "val2017", "annotations"):
        os.makedirs(os.path.join(coco, d))
    paths = _paths(out, n_train, n_test, True)
    job = _SceneJob(int(seed), size, max_items, tuple(scale), min_visible, border, source, dirs,
                    os.path.join(coco, "train2017"), os.path.join(coco, "val2017"))
    todo = [(split_no, i, img_id) for split_no, ids in enumerate((paths.train_ids, paths.test_ids))
            for i, img_id in enumerate(ids)]
    objects: Dict[str, List[dict]] = dict(map_chunks(job, todo, workers))
    for name, ids in (("Main/trainval.txt", paths.train_ids), ("Main/test.txt", paths.test_ids),
                      ("Segmentation/train.txt", paths.train_ids), ("Segmentation/val.txt", paths.test_ids)):
        with open(os.path.join(voc, "ImageSets", name), "w") as f:
            f.write("".join(i + "\n" for i in ids))
    train_json = _coco_json(paths.train_ids, objects, size, 1)
    n_ann = len(train_json["annotations"])
    for name, js in (("instances_train2017.json", train_json),
                     ("instances_val2017.json", _coco_json(paths.test_ids, objects, size, n_ann + 1))):
        with open(os.path.join(coco, "annotations", name), "w") as f:
            json.dump(js, f)
    os.symlink("VOC2007", os.path.join(tmp, "VOCdevkit", "VOC2012"))
    with open(os.path.join(tmp, "classes.txt"), "w") as f:
        f.write("".join(c + "\n" for c in CLASSES))
    with open(os.path.join(tmp, "classes_seg.txt"), "w") as f:
        f.write("".join(c + "\n" for c in ("background",) + CLASSES))
    # swap the new set in, then write the stamp last (an interrupted run regenerates)
    if os.path.exists(stamp):
        os.remove(stamp)
    for name in ("VOCdevkit", "coco", "classes.txt", "classes_seg.txt"):
        dst = os.path.join(out, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        elif os.path.lexists(dst):
            os.remove(dst)
        os.replace(os.path.join(tmp, name), dst)
    shutil.rmtree(tmp, ignore_errors=True)
    with open(stamp + ".tmp", "w") as f:
        json.dump(params, f, indent=1)
    os.replace(stamp + ".tmp", stamp)
    n_obj = sum(len(o) for o in objects.values())
    if log:
        log(f"[scenes] wrote {n_train} train + {n_test} test scenes ({size}x{size}, {n_obj} items, seed {seed}) "
            f"to {out}")
    return paths


def main(argv: Optional[Sequence[str]] = None):
    from .cli import ArgumentParser
    p = ArgumentParser(prog="python -m common.scenes", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (VOCdevkit/, coco/ and the class lists)")
    p.add_argument("--train", type=int, default=200, help="number of training scenes (default 200)")
    p.add_argument("--test", type=int, default=50, help="number of test scenes (default 50)")
    p.add_argument("--size", type=int, default=128, help="canvas side in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-items", type=int, default=4, help="items per scene: 1..N (default 4)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.3, 0.65), metavar=("MIN", "MAX"),
                   help="item side as a fraction of the canvas (default 0.3 0.65)")
    p.add_argument("--border", type=int, default=0, choices=(0, 1),
                   help="1: VOC's 1-pixel 255 ignore band around items in the segmentation PNGs (default 0)")
    p.add_argument("--fresh", action="store_true", help="replace a scene set of other parameters in --out")
    p.add_argument("-j", "--workers", type=int, default=None,
                   help=f"processes that render the scenes (default: one per core from {PARALLEL_MIN} scenes on; "
                        "the files are the same for any count)")
    a = p.parse_args(argv)
    if a.max_items < 1:
        raise UserError(f"--max-items {a.max_items}", "use at least 1")
    if a.workers is not None and a.workers < 0:
        raise UserError(f"--workers {a.workers} is negative", "pass 0 to render here, or a number of processes")
    r = make_scenes(a.out, a.train, a.test, a.size, a.seed, max_items=a.max_items, scale=tuple(a.scale),
                    border=a.border, replace=a.fresh, workers=a.workers)
    if not r.generated:
        print(f"[scenes] {a.out} already holds this scene set (same parameters in {STAMP}); nothing to do")


if __name__ == "__main__":
    from .errors import run_cli
    sys.exit(run_cli(main))
