"""Box decoding and post-processing of the raw YOLOv2 prediction (outside the model).

The model returns ``pred [B, H*W*A, 5+C]``: per grid cell (row-major) and anchor,
``(tx, ty, tw, th, conf, class logits)``. Decoding (yjh0410 / YOLOv2)::

    cx = (sigmoid(tx) + grid_x) / W,   cy = (sigmoid(ty) + grid_y) / H        (normalised to [0, 1])
    w  = exp(tw) * anchor_w / W,       h  = exp(th) * anchor_h / H             (anchors in grid cells)
    score(class c) = sigmoid(conf) * softmax(class logits)[c]

:func:`postprocess`: the best class per box, boxes with score >= ``conf_thresh`` (0.001), clipped
to the image, class-wise NMS (``torchvision.ops.batched_nms``, IoU 0.5 tiny / 0.6 r34), at most
``max_det`` per image.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torchvision.ops import batched_nms

from .models import STRIDE


def grid_size(input_hw: Tuple[int, int]) -> Tuple[int, int]:
    return int(input_hw[0]) // STRIDE, int(input_hw[1]) // STRIDE


def _grid(H: int, W: int, anchors: torch.Tensor):
    """Cell offsets ``[H*W*A, 2]`` (x, y) and anchor sizes ``[H*W*A, 2]`` matching the prediction order."""
    A = anchors.shape[0]
    ys, xs = torch.meshgrid(torch.arange(H, device=anchors.device), torch.arange(W, device=anchors.device),
                            indexing="ij")
    cells = torch.stack([xs, ys], -1).reshape(H * W, 1, 2).expand(H * W, A, 2).reshape(-1, 2).to(anchors.dtype)
    return cells, anchors.repeat(H * W, 1)


def decode_boxes(pred: torch.Tensor, anchors: Sequence[Sequence[float]], input_hw: Tuple[int, int]) -> torch.Tensor:
    """Normalised ``xyxy`` boxes ``[B, N, 4]`` of the prediction (differentiable)."""
    H, W = grid_size(input_hw)
    anc = torch.as_tensor(anchors, dtype=pred.dtype, device=pred.device)
    if pred.shape[1] != H * W * anc.shape[0]:
        raise ValueError(f"prediction has {pred.shape[1]} boxes, expected {H}x{W}x{anc.shape[0]} for input "
                         f"{tuple(input_hw)}")
    cells, wh_anchor = _grid(H, W, anc)
    scale = pred.new_tensor([W, H])
    cxy = (torch.sigmoid(pred[..., 0:2]) + cells) / scale
    wh = torch.exp(pred[..., 2:4].clamp(max=10.0)) * wh_anchor / scale
    return torch.cat([cxy - wh / 2, cxy + wh / 2], dim=-1)


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of corresponding ``xyxy`` boxes (``[..., 4]`` each) -> ``[...]``."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a + area_b - inter).clamp(min=1e-12)


@torch.no_grad()
def postprocess(pred: torch.Tensor, anchors, input_hw: Tuple[int, int], conf_thresh: float = 0.001,
                nms_thresh: float = 0.5, max_det: int = 100) -> List[Dict[str, torch.Tensor]]:
    """Per image: ``{"boxes" [n, 4] normalised xyxy in [0, 1], "scores" [n], "labels" [n]}``."""
    pred = pred.float()
    boxes = decode_boxes(pred, anchors, input_hw).clamp(0.0, 1.0)
    probs = torch.sigmoid(pred[..., 4:5]) * torch.softmax(pred[..., 5:], dim=-1)
    scores, labels = probs.max(-1)
    out = []
    for b in range(pred.shape[0]):
        keep = scores[b] >= conf_thresh
        bx, sc, lb = boxes[b][keep], scores[b][keep], labels[b][keep]
        k = batched_nms(bx, sc, lb, nms_thresh)[:max_det]
        out.append({"boxes": bx[k], "scores": sc[k], "labels": lb[k]})
    return out


def kmeans_anchors(wh: torch.Tensor, k: int = 5, iters: int = 100, seed: int = 0) -> List[List[float]]:
    """YOLOv2's anchor clustering: k-means of box sizes ``wh [N, 2]`` with distance ``1 - IoU``
    (boxes sharing a centre). Returns k ``[w, h]`` sorted by area."""
    wh = wh.double()
    if wh.shape[0] < k:
        raise ValueError(f"{wh.shape[0]} boxes are too few for {k} anchors")
    g = torch.Generator().manual_seed(seed)
    centres = wh[torch.randperm(wh.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        inter = torch.minimum(wh[:, None], centres[None]).prod(-1)
        iou = inter / (wh.prod(-1)[:, None] + centres.prod(-1)[None] - inter)
        assign = iou.argmax(1)
        new = torch.stack([wh[assign == j].median(0).values if (assign == j).any() else centres[j]
                           for j in range(k)])
        if torch.allclose(new, centres):
            break
        centres = new
    order = centres.prod(-1).argsort()
    return [[round(float(w), 3), round(float(h), 3)] for w, h in centres[order]]
