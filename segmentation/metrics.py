"""Segmentation metrics from a confusion matrix, reduced over DDP ranks.

``conf[g, p]`` counts the pixels of ground-truth class ``g`` predicted as ``p`` (ignore-label pixels
left out). Per class ``IoU = conf[c, c] / (row_c + col_c - conf[c, c])``; a class that is neither in
the ground truth nor predicted has no IoU (``None``) and does not enter the mean -- mIoU averages the
classes with a defined IoU (equal class weights). A class absent from the ground truth but predicted
somewhere has IoU 0. Pixel accuracy = trace / total; mean accuracy averages ``conf[c, c] / row_c`` over
the classes present in the ground truth. All values are percentages.

Class 0 is the background (every dataset of this task has it first), which splits the mIoU into *finding*
and *naming* the objects: ``item_iou`` is the IoU of objects-vs-background (every class but 0 merged);
``naming_acc`` the share of the pixels that are objects in both the ground truth and the prediction that
got the right class; ``miou_if_named`` the mIoU those same pixels would give with their true class, i.e.
what the found extents alone would score. A net whose ``miou_if_named`` is far above its ``miou`` mostly
names objects wrong; one near it misses their extent.

:class:`SegMetric` is the pipeline's ``Metric``: ``update(output, batch)`` / ``compute()``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch


IGNORE = 255
DIAGNOSIS = ("item_iou", "naming_acc", "miou_if_named")   # finding vs naming the objects (see the module's text)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE) -> torch.Tensor:
    """``int64 [C, C]`` confusion matrix of integer ``pred`` / ``target`` maps of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    t = target.reshape(-1).long()
    p = pred.reshape(-1).long()
    keep = t != ignore_index
    t, p = t[keep], p[keep]
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"target labels outside 0..{num_classes - 1} (other than {ignore_index})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _miou(conf: torch.Tensor) -> float:
    tp = conf.diag()
    union = conf.sum(1) + conf.sum(0) - tp
    valid = union > 0
    return float(100.0 * (tp[valid] / union[valid]).mean()) if bool(valid.any()) else 0.0


def scores(conf: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """mIoU, per-class IoU, pixel / mean accuracy (percent) of a confusion matrix."""
    conf = conf.double()
    tp = conf.diag()
    gt = conf.sum(1)
    pr = conf.sum(0)
    union = gt + pr - tp
    iou: List[Optional[float]] = [float(100.0 * tp[c] / union[c]) if union[c] > 0 else None
                                  for c in range(conf.shape[0])]
    valid = [v for v in iou if v is not None]
    acc = [float(100.0 * tp[c] / gt[c]) for c in range(conf.shape[0]) if gt[c] > 0]
    total = float(conf.sum())
    both = float(conf[1:, 1:].sum())                  # objects in the ground truth and in the prediction
    either = total - float(conf[0, 0])
    named = conf.clone()
    named[1:, 1:] = torch.diag(conf[1:, 1:].sum(1))   # each such pixel given its true class
    out = {
        "miou": sum(valid) / len(valid) if valid else 0.0,
        "per_class_iou": iou,
        "pixel_acc": float(100.0 * tp.sum() / total) if total > 0 else 0.0,
        "mean_acc": sum(acc) / len(acc) if acc else 0.0,
        "pixels": int(total),
        "classes_present": int((gt > 0).sum()),
        "item_iou": 100.0 * both / either if either > 0 else None,
        "naming_acc": float(100.0 * tp[1:].sum() / both) if both > 0 else None,
        "miou_if_named": _miou(named) if conf.shape[0] > 1 else None,
        "confusion": conf.round().long().tolist(),
    }
    if class_names is not None:
        out["class_names"] = list(class_names)
    return out


def reduce_confusion(conf: torch.Tensor) -> torch.Tensor:
    """Sum a confusion matrix over the DDP ranks (a copy; identity in one process)."""
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return conf.clone()
    dev = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    t = conf.to(dev, torch.float64).clone()   # exact for counts < 2^53
    tdist.all_reduce(t)
    return t.round().long().cpu()


class SegMetric:
    """Confusion-matrix accumulator over batches (the pipeline's ``Metric``).

    ``update(output, batch)``: ``output`` are logits ``[B, C, H, W]`` (argmax over C; logits of another
    size are resized to the mask's bilinearly first) or a label map ``[B, H, W]``; ``batch`` is
    ``(images, masks)`` or a dict with ``"mask"``. ``compute()`` reduces over the ranks and returns
    :func:`scores` (``miou`` first).
    """

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None, ignore_index: int = IGNORE):
        self.num_classes = int(num_classes)
        self.class_names = list(class_names) if class_names is not None else None
        self.ignore_index = ignore_index
        self.conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)

    @staticmethod
    def target_of(batch) -> torch.Tensor:
        if isinstance(batch, dict):
            return batch["mask"]
        if isinstance(batch, (list, tuple)):
            return batch[1]
        raise TypeError(f"cannot find the masks in a batch of type {type(batch).__name__}")

    @torch.no_grad()
    def update(self, output, batch):
        target = self.target_of(batch).to(torch.long)
        if isinstance(output, (list, tuple)):
            output = output[0]
        if output.dim() == 4:
            if output.shape[1] != self.num_classes:
                raise ValueError(f"the model predicts {output.shape[1]} classes, the data has {self.num_classes}")
            if tuple(output.shape[-2:]) != tuple(target.shape[-2:]):
                output = torch.nn.functional.interpolate(output.float(), size=tuple(target.shape[-2:]),
                                                         mode="bilinear", align_corners=True)
            pred = output.argmax(1)
        else:
            pred = output
        self.conf += confusion_matrix(pred.cpu(), target.cpu(), self.num_classes, self.ignore_index)

    def compute(self) -> Dict[str, object]:
        return scores(reduce_confusion(self.conf), self.class_names)

    def reset(self):
        self.conf.zero_()


def make_metric_factory(num_classes: int, class_names: Optional[Sequence[str]] = None):
    """``make_metric()`` for :func:`common.pipeline.evaluate` / ``evaluate_snn``."""
    def make_metric():
        return SegMetric(num_classes, class_names)
    return make_metric


__all__ = ["IGNORE", "DIAGNOSIS", "confusion_matrix", "scores", "reduce_confusion", "SegMetric", "make_metric_factory"]
