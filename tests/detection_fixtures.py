"""Tiny detection datasets in the real on-disk formats (VOC XML + JPEG, COCO JSON), for the tests."""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from typing import Iterable, List, Sequence, Tuple

import numpy as np

LABELME = "/usr/share/doc/labelme-examples/examples"
LABELME_VOC = os.path.join(LABELME, "bbox_detection", "data_dataset_voc")
LABELME_COCO = os.path.join(LABELME, "instance_segmentation", "data_dataset_coco")

# (name, (xmin, ymin, xmax, ymax) 1-based inclusive, difficult)
Obj = Tuple[str, Tuple[int, int, int, int], int]


def voc_xml(filename: str, size: Tuple[int, int], objects: Iterable[Obj]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = filename
    sz = ET.SubElement(root, "size")
    ET.SubElement(sz, "width").text = str(size[0])
    ET.SubElement(sz, "height").text = str(size[1])
    ET.SubElement(sz, "depth").text = "3"
    for name, (x1, y1, x2, y2), diff in objects:
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = name
        ET.SubElement(o, "difficult").text = str(diff)
        bb = ET.SubElement(o, "bndbox")
        for k, v in zip(("xmin", "ymin", "xmax", "ymax"), (x1, y1, x2, y2)):
            ET.SubElement(bb, k).text = str(v)
    return ET.tostring(root)


def draw(size: Tuple[int, int], objects: Iterable[Obj], seed: int = 0) -> np.ndarray:
    """A dark noisy image with each object's box filled bright (so a box can be found again)."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8)
    for _, (x1, y1, x2, y2), _ in objects:
        img[y1 - 1:y2, x1 - 1:x2] = 255
    return img


def write_voc(root: str, year: str, split_images: dict, classes: Sequence[str] = ()) -> str:
    """``root/VOCdevkit/<year>/`` with ``split_images = {"trainval": [(id, (w, h), [Obj...]), ...], "test": [...]}``."""
    from PIL import Image
    base = os.path.join(root, "VOCdevkit", year)
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    for split, items in split_images.items():
        with open(os.path.join(base, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            for k, (img_id, size, objects) in enumerate(items):
                f.write(img_id + "\n")
                Image.fromarray(draw(size, objects, k)).save(os.path.join(base, "JPEGImages", f"{img_id}.jpg"), quality=98)
                with open(os.path.join(base, "Annotations", f"{img_id}.xml"), "wb") as x:
                    x.write(voc_xml(f"{img_id}.jpg", size, objects))
    if classes:
        with open(os.path.join(root, "classes.txt"), "w") as f:
            f.write("\n".join(classes) + "\n")
    return base


def tiny_voc(root: str) -> str:
    """Two classes ``cat`` / ``dog``; VOC2007 trainval (3) + test (2, one difficult box), VOC2012 trainval (1)."""
    write_voc(root, "VOC2007", {
        "trainval": [("000001", (64, 48), [("cat", (5, 6, 30, 40), 0)]),
                     ("000002", (50, 50), [("dog", (10, 10, 40, 45), 0), ("cat", (1, 1, 8, 8), 1)]),
                     ("000003", (40, 60), [("dog", (3, 20, 38, 59), 0)])],
        "test": [("000004", (64, 64), [("cat", (11, 11, 40, 50), 0), ("dog", (45, 2, 60, 20), 1)]),
                 ("000005", (48, 32), [("dog", (2, 3, 47, 30), 0)])],
    }, classes=("cat", "dog"))
    write_voc(root, "VOC2012", {"trainval": [("2012_000001", (32, 32), [("cat", (4, 4, 28, 28), 0)])]})
    return root


def labelme_voc_root(dst: str) -> Tuple[str, str]:
    """A VOC root (symlinks) around labelme-examples' three VOC photos; returns ``(root, classes.txt)``."""
    base = os.path.join(dst, "VOCdevkit", "VOC2007")
    os.makedirs(os.path.join(base, "ImageSets", "Main"), exist_ok=True)
    for d in ("Annotations", "JPEGImages"):
        os.symlink(os.path.join(LABELME_VOC, d), os.path.join(base, d))
    ids = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(LABELME_VOC, "Annotations")))
    for split in ("trainval", "test"):
        with open(os.path.join(base, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")
    return dst, os.path.join(LABELME_VOC, "class_names.txt")


def labelme_available() -> bool:
    return os.path.isdir(LABELME_VOC) and os.path.isfile(os.path.join(LABELME_COCO, "annotations.json"))


def coco_json(path: str, images: List[dict], anns: List[dict], cats: List[dict]):
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
