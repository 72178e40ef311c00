"""Detection metrics: VOC AP (11-point VOC07 and all-point), COCO AP through pycocotools' COCOeval.

:func:`voc_ap` / :func:`average_precision` follow the VOC devkit: detections of a class over all
images sorted by score; each is a true positive when its best-overlapping ground truth of that class
in its image has IoU > 0.5 and was not matched yet, a false positive otherwise; a best match that is
*difficult* makes the detection neither (and difficult boxes do not count as positives). AP is then
the 11-point interpolated precision (VOC2007, ``points=11``), the area under the precision envelope
(VOC2010+, ``points=0``) or the 101-point interpolation COCO uses (``points=101``).

:class:`DetectionMetric` is the task's metric for ``common.pipeline``: ``update(output, batch)``
decodes the raw predictions (:func:`detection.boxes.postprocess`), rescales them to each image's
original size and stores them with the ground truth; ``compute()`` gathers every rank's images
(``all_gather_object``) and returns, in percent::

    {"map": VOC07 11-point mAP@0.5 (COCO datasets: AP@[.5:.95]), "map_voc07", "map_all_point",
     "ap": {class: 11-point AP}, "ap_all_point": {...}, "images", "detections",
     "coco": {AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl} (COCO only), "map50",
     "map_agnostic", "naming_acc", "confusion"}   (finding vs naming the objects: :func:`finding_and_naming`)

When no class has non-difficult ground truth the VOC mAP is undefined: a warning, and it is reported as 0
(the trainer compares and prints it as a number).
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from common import dist

from .boxes import postprocess

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def interpolated_ap(rec: np.ndarray, prec: np.ndarray, points: int = 11) -> float:
    """AP from a recall / precision curve: ``points`` = 11 (VOC07), 101 (COCO) or 0 (all points)."""
    rec, prec = np.asarray(rec, np.float64), np.asarray(prec, np.float64)
    if points:
        thresholds = np.arange(0.0, 1.1, 0.1) if points == 11 else np.linspace(0.0, 1.0, points)
        vals = []
        for t in thresholds:
            p = prec[rec >= t]
            vals.append(p.max() if p.size else 0.0)
        return float(np.mean(vals))
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _iou_one(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    ix1 = np.maximum(gts[:, 0], box[0])
    iy1 = np.maximum(gts[:, 1], box[1])
    ix2 = np.minimum(gts[:, 2], box[2])
    iy2 = np.minimum(gts[:, 3], box[3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    union = (box[2] - box[0]) * (box[3] - box[1]) + (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1]) - inter
    return inter / np.maximum(union, 1e-12)


def match_class(dets: Sequence[tuple], gts: Dict[object, tuple], iou_thresh: float = 0.5):
    """``dets``: ``(image_key, score, box[4])``; ``gts``: ``image_key -> (boxes [n, 4], difficult [n])``
    of one class. Returns ``(recall, precision, n_positives)`` (VOC devkit matching)."""
    npos = int(sum(int((~d).sum()) for _, d in gts.values()))
    if not dets:
        return np.zeros(0), np.zeros(0), npos
    order = np.argsort(-np.asarray([d[1] for d in dets], np.float64), kind="mergesort")
    used = {k: np.zeros(len(b), bool) for k, (b, _) in gts.items()}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for j, di in enumerate(order):
        key, _, box = dets[di]
        g = gts.get(key)
        if g is None or len(g[0]) == 0:
            fp[j] = 1
            continue
        ious = _iou_one(np.asarray(box, np.float64), np.asarray(g[0], np.float64))
        k = int(ious.argmax())
        if ious[k] > iou_thresh:
            if g[1][k]:
                continue               # difficult: neither TP nor FP
            if not used[key][k]:
                tp[j], used[key][k] = 1, True
            else:
                fp[j] = 1
        else:
            fp[j] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / max(npos, 1)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return rec, prec, npos


def average_precision(dets, gts, iou_thresh: float = 0.5, points: int = 11) -> Optional[float]:
    """AP of one class (``None`` when the class has no non-difficult ground truth)."""
    rec, prec, npos = match_class(dets, gts, iou_thresh)
    if npos == 0:
        return None
    return interpolated_ap(rec, prec, points)


def voc_map(images: Dict[object, dict], num_classes: int, iou_thresh: float = 0.5, points: int = 11):
    """``images``: key -> ``{"boxes", "scores", "labels", "gt_boxes", "gt_labels", "difficult"}``
    (numpy, pixels). Returns ``(mAP over classes with ground truth, per-class AP list with None)``; the
    mAP is None when no class has non-difficult ground truth (e.g. every test object is difficult)."""
    aps = []
    for c in range(num_classes):
        dets, gts = [], {}
        for key, im in images.items():
            m = im["gt_labels"] == c
            gts[key] = (im["gt_boxes"][m], im["difficult"][m])
            for b, s in zip(im["boxes"][im["labels"] == c], im["scores"][im["labels"] == c]):
                dets.append((key, float(s), b))
        aps.append(average_precision(dets, gts, iou_thresh, points))
    valid = [a for a in aps if a is not None]
    return (float(np.mean(valid)) if valid else None), aps


def finding_and_naming(images: Dict[object, dict], num_classes: int, iou_thresh: float = 0.5) -> Dict[str, object]:
    """Whether a detector misses objects or names them wrong (percent; the ``images`` of :func:`voc_map`):

    * ``map_agnostic``: VOC07 11-point AP@``iou_thresh`` with every class merged into one, after a
      class-agnostic NMS at the same IoU (one box per object, whatever its name): how well objects are found;
    * ``naming_acc``: of the non-difficult ground-truth objects that some detection overlaps by more than
      ``iou_thresh``, the share whose highest-scoring such detection has the right class;
    * ``confusion``: ``[C, C + 1]`` counts of those objects, rows their class, columns the class of that
      detection, the last column the objects no detection overlaps.
    """
    from torchvision.ops import nms
    conf = np.zeros((num_classes, num_classes + 1), np.int64)
    dets, gts = [], {}
    for key, im in images.items():
        gb, gl, diff = np.asarray(im["gt_boxes"], np.float64), im["gt_labels"], im["difficult"]
        boxes, scores, labels = np.asarray(im["boxes"], np.float64), im["scores"], im["labels"]
        for b, c, d in zip(gb, gl, diff):
            if d:
                continue
            hit = _iou_one(b, boxes) > iou_thresh if len(boxes) else np.zeros(0, bool)
            conf[int(c), int(labels[hit][np.argmax(scores[hit])]) if hit.any() else num_classes] += 1
        if len(boxes):
            keep = nms(torch.from_numpy(boxes).float(), torch.from_numpy(np.asarray(scores, np.float32)), iou_thresh).numpy()
            dets += [(key, float(scores[k]), boxes[k]) for k in keep]
        gts[key] = (gb, np.asarray(diff, bool))
    ap = average_precision(dets, gts, iou_thresh, 11)
    found = conf[:, :num_classes].sum()
    return {"map_agnostic": None if ap is None else 100 * ap,
            "naming_acc": float(100 * np.trace(conf[:, :num_classes]) / found) if found else None,
            "confusion": conf.tolist()}


def coco_evaluate(coco_gt, results: List[dict], image_ids: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """pycocotools COCOeval (bbox) of ``results`` (COCO result dicts) -> the 12 stats in percent."""
    from pycocotools.cocoeval import COCOeval
    if not results:
        return {k: 0.0 for k in COCO_STATS}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(set(image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: max(0.0, float(v)) * 100.0 for k, v in zip(COCO_STATS, ev.stats)}


class DetectionMetric:
    """mAP accumulator (see the module docstring)."""

    def __init__(self, num_classes: int, anchors, classes: Optional[Sequence[str]] = None,
                 conf_thresh: float = 0.001, nms_thresh: float = 0.5, max_det: int = 100, coco=None,
                 primary: str = "voc07"):
        self.num_classes, self.anchors = int(num_classes), anchors
        self.classes = list(classes) if classes else [str(i) for i in range(num_classes)]
        self.conf_thresh, self.nms_thresh, self.max_det = conf_thresh, nms_thresh, max_det
        self.coco = coco            # detection.data.CocoInfo or None
        self.primary = primary if coco is None else "coco"
        self.images: Dict[object, dict] = {}

    def update(self, output: torch.Tensor, batch: dict):
        if "error" in batch:
            from .data import check_batch
            check_batch(batch)
        H, W = batch["image"].shape[-2:]
        dets = postprocess(output.detach(), self.anchors, (H, W), self.conf_thresh, self.nms_thresh, self.max_det)
        for d, (h, w), gb, gl, diff, idx, img_id in zip(dets, batch["orig_size"], batch["gt_boxes"],
                                                        batch["gt_labels"], batch["difficult"], batch["index"],
                                                        batch["id"]):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            self.images[idx] = {"boxes": (d["boxes"].cpu() * scale).numpy(), "scores": d["scores"].cpu().numpy(),
                                "labels": d["labels"].cpu().numpy(), "gt_boxes": gb.numpy(),
                                "gt_labels": gl.numpy(), "difficult": diff.numpy(), "id": img_id}

    def _gathered(self) -> Dict[object, dict]:
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return dict(self.images)
        parts: List[Optional[dict]] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self.images)
        merged = {}
        for p in parts:
            merged.update(p or {})
        return merged

    def results_coco(self, images: Optional[Dict[object, dict]] = None) -> List[dict]:
        """Detections as COCO result dicts (category ids of the annotation file, boxes ``xywh``)."""
        cat_ids = self.coco.cat_ids if self.coco is not None else list(range(1, self.num_classes + 1))
        out = []
        for im in (images if images is not None else self.images).values():
            for b, s, l in zip(im["boxes"], im["scores"], im["labels"]):
                out.append({"image_id": im["id"], "category_id": int(cat_ids[int(l)]),
                            "bbox": [round(float(b[0]), 2), round(float(b[1]), 2), round(float(b[2] - b[0]), 2),
                                     round(float(b[3] - b[1]), 2)], "score": round(float(s), 5)})
        return out

    def compute(self) -> Dict:
        images = self._gathered()
        m07, ap07 = voc_map(images, self.num_classes, 0.5, 11)
        mall, apall = voc_map(images, self.num_classes, 0.5, 0)
        if m07 is None:
            # the trainer compares / prints "map" as a number, so an undefined mAP is reported as 0
            if self.coco is None and images:
                dist.warn_once("no evaluated image has a non-difficult box of any class, so the mAP is undefined "
                               "(reported as 0.00); mark some test objects <difficult>0</difficult> or test on other images")
            m07 = mall = 0.0
        res = {"map_voc07": 100 * m07, "map_all_point": 100 * mall,
               "ap": {c: (None if a is None else 100 * a) for c, a in zip(self.classes, ap07)},
               "ap_all_point": {c: (None if a is None else 100 * a) for c, a in zip(self.classes, apall)},
               "images": len(images), "detections": int(sum(len(im["scores"]) for im in images.values())),
               **finding_and_naming(images, self.num_classes)}
        if self.coco is not None:
            stats = coco_evaluate(self.coco.coco, self.results_coco(images), [im["id"] for im in images.values()])
            res.update(coco=stats, map=stats["AP"], map50=stats["AP50"])
        else:
            res.update(map=res["map_voc07"], map50=res["map_voc07"])
        return res
