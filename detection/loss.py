"""YOLOv2 targets and loss, as in yjh0410's yolov2.

Target assignment (:func:`build_targets`), per ground-truth box (normalised ``xyxy``) at input size
``(h, w)`` and stride 32:

* boxes smaller than 1 pixel at the input size are skipped;
* the responsible cell holds the box centre; the anchors (all centred, in grid cells) are compared by
  IoU with the box's ``(w, h)``. If no anchor has IoU > ``ignore_thresh`` (0.5), the best one is the
  positive. Otherwise the best one is the positive and every other anchor above the threshold is
  *ignored* (objectness mask -1, no loss);
* a positive gets ``tx, ty`` = the centre's offset in its cell, ``tw, th = log(box / anchor)``, the box-
  size weight ``2 - w*h`` (normalised area) and the box itself (for the IoU terms). Later boxes of an
  image overwrite earlier ones in the same cell / anchor (as the original).

Target tensor ``[B, H*W*A, 11]``: ``obj (1 / 0 / -1), class, tx, ty, tw, th, weight, x1, y1, x2, y2``.

Loss (:func:`yolo_loss`), every term summed over boxes and divided by the batch size:

* objectness: MSE of ``sigmoid(conf)`` (clamped to [1e-4, 1 - 1e-4]) against the IoU of the decoded
  box with its ground truth (detached), x5 on positives; ``sigmoid(conf)^2`` x1 on negatives;
* class: cross-entropy on positives;
* ``tx, ty``: BCE-with-logits, ``tw, th``: MSE, both weighted by ``2 - w*h``, on positives;
* IoU: smooth-L1 of the decoded box's IoU against 1, on positives.

Distillation (:func:`distill_loss`, ``train.py --teacher``): the student's prediction against a trained
teacher's on the same images.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch
import torch.nn.functional as F

from .boxes import box_iou_pairs, decode_boxes, grid_size

IGNORE_THRESH = 0.5
TARGET_COLUMNS = 11


def _anchor_iou(wh: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """IoU of one ``(w, h)`` with every anchor, all centred at the origin."""
    inter = torch.minimum(wh[None], anchors).prod(-1)
    return inter / (wh.prod() + anchors.prod(-1) - inter)


@torch.no_grad()
def build_targets(boxes: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], anchors,
                  input_hw: Tuple[int, int], ignore_thresh: float = IGNORE_THRESH) -> torch.Tensor:
    """``boxes[b]``: ``[n, 4]`` normalised ``xyxy``; ``labels[b]``: ``[n]`` class indices. -> ``[B, H*W*A, 11]``."""
    H, W = grid_size(input_hw)
    h_in, w_in = int(input_hw[0]), int(input_hw[1])
    anc = torch.as_tensor(anchors, dtype=torch.float64)
    A = anc.shape[0]
    out = torch.zeros(len(boxes), H, W, A, TARGET_COLUMNS, dtype=torch.float64)
    for b, (bx, lb) in enumerate(zip(boxes, labels)):
        for (x1, y1, x2, y2), c in zip(bx.double().cpu().tolist(), lb.cpu().tolist()):
            bw_px, bh_px = (x2 - x1) * w_in, (y2 - y1) * h_in
            if bw_px < 1.0 or bh_px < 1.0:
                continue
            cx, cy = (x1 + x2) / 2 * W, (y1 + y2) / 2 * H          # centre in grid cells
            gw, gh = (x2 - x1) * W, (y2 - y1) * H                  # size in grid cells
            gx, gy = int(cx), int(cy)
            if not (0 <= gx < W and 0 <= gy < H):
                continue
            iou = _anchor_iou(torch.tensor([gw, gh], dtype=torch.float64), anc)
            best = int(iou.argmax())
            over = (iou > ignore_thresh).tolist()
            over[best] = True
            for a in range(A):
                if not over[a]:
                    continue
                cell = out[b, gy, gx, a]
                if a == best:
                    weight = 2.0 - (x2 - x1) * (y2 - y1)
                    cell[:] = torch.tensor([1.0, c, cx - gx, cy - gy, math.log(gw / anc[a, 0]),
                                            math.log(gh / anc[a, 1]), weight, x1, y1, x2, y2], dtype=torch.float64)
                else:
                    cell[0] = -1.0
                    cell[6] = -1.0
    return out.view(len(boxes), H * W * A, TARGET_COLUMNS).float()


def yolo_loss(pred: torch.Tensor, targets: torch.Tensor, anchors, input_hw: Tuple[int, int]
              ) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Total loss and its parts (``conf``, ``cls``, ``box`` = txty + twth, ``iou``) as floats."""
    targets = targets.to(pred.device)
    B = pred.shape[0]
    pred = pred.float()
    obj, weight = targets[..., 0], targets[..., 6]
    pos = (weight > 0).float()
    # objectness: the target is the IoU of the decoded box with its ground truth
    boxes = decode_boxes(pred, anchors, input_hw)
    iou = box_iou_pairs(boxes, targets[..., 7:11])
    sig = torch.sigmoid(pred[..., 4]).clamp(1e-4, 1.0 - 1e-4)
    conf_loss = (5.0 * (obj == 1.0).float() * (sig - iou.detach()) ** 2
                 + 1.0 * (obj == 0.0).float() * sig ** 2).sum() / B
    cls_loss = (F.cross_entropy(pred[..., 5:].permute(0, 2, 1), targets[..., 1].long(), reduction="none")
                * pos).sum() / B
    txty = F.binary_cross_entropy_with_logits(pred[..., 0:2], targets[..., 2:4], reduction="none").sum(-1)
    twth = F.mse_loss(pred[..., 2:4], targets[..., 4:6], reduction="none").sum(-1)
    box_loss = ((txty + twth) * weight * pos).sum() / B
    iou_loss = (F.smooth_l1_loss(iou, torch.ones_like(iou), reduction="none") * pos).sum() / B
    total = conf_loss + cls_loss + box_loss + iou_loss
    parts = {"conf": float(conf_loss.detach()), "cls": float(cls_loss.detach()), "box": float(box_loss.detach()),
             "iou": float(iou_loss.detach())}
    return total, parts


def distill_loss(pred: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Knowledge distillation from a teacher detector's raw prediction of the same images (same grid and
    anchors): per anchor, the KL divergence of the student's class distribution from the teacher's plus the
    squared difference of the box outputs ``tx, ty, tw, th``, weighted by the teacher's objectness
    ``sigmoid(conf)`` (anchors the teacher sees as empty count little), summed and divided by the batch size
    as :func:`yolo_loss`. Zero where the predictions agree; the teacher gets no gradient."""
    s, t = pred.float(), teacher.detach().float()
    kl = F.kl_div(F.log_softmax(s[..., 5:], -1), F.log_softmax(t[..., 5:], -1), reduction="none",
                  log_target=True).sum(-1)
    box = ((s[..., 0:4] - t[..., 0:4]) ** 2).sum(-1)
    return ((kl + box) * torch.sigmoid(t[..., 4])).sum() / s.shape[0]
