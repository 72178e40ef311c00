"""Top-k accuracy of classifiers: the counts, the printed line, and the metric object the shared SNN
pipeline (:mod:`common.pipeline`) evaluates with."""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch

from common import dist

TOPK = (1, 5)


@torch.no_grad()
def correct_topk(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = TOPK) -> List[float]:
    """Number of samples of ``output [B, C]`` whose label is among the ``k`` highest scores, for each
    ``k`` (clamped to the number of classes)."""
    maxk = min(max(topk), output.shape[-1])
    hit = output.topk(maxk, dim=-1).indices == target.unsqueeze(-1)   # [B, maxk]
    return [float(hit[:, :min(k, maxk)].any(-1).sum()) for k in topk]


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> List[float]:
    """Top-k accuracies in percent."""
    n = max(target.numel(), 1)
    return [100.0 * c / n for c in correct_topk(output, target, topk)]


def format_acc(top1: float, top5: float) -> str:
    """The line every evaluation prints (the torchvision / APoT format)."""
    return f" * Acc@1 {top1:.3f} Acc@5 {top5:.3f}"


class TopK:
    """Top-k accuracy (%) of logits ``[B, C]`` against ``batch[1]`` -- a :class:`common.pipeline.Metric`:
    ``compute()`` gives ``{"top1": .., "top5": .., "samples": n}`` (one ``top<k>`` per ``k``), summed over
    the DDP ranks."""

    def __init__(self, topk: Sequence[int] = TOPK):
        self.topk = tuple(topk)
        self.correct, self.total = [0.0] * len(self.topk), 0.0

    def update(self, output: torch.Tensor, batch) -> None:
        y = batch[1].to(output.device, non_blocking=True)
        self.correct = [a + b for a, b in zip(self.correct, correct_topk(output, y, self.topk))]
        self.total += y.shape[0]

    def compute(self) -> dict:
        vals = dist.all_reduce_sum(self.correct + [self.total])
        total = vals[-1]
        out = {f"top{k}": 100.0 * c / total if total else 0.0 for k, c in zip(self.topk, vals[:-1])}
        out["samples"] = int(total)
        return out

    @classmethod
    def factory(cls, topk: Sequence[int] = TOPK) -> Callable[[], "TopK"]:
        """``make_metric`` for :func:`common.pipeline.evaluate` / :func:`~common.pipeline.evaluate_snn`."""
        return lambda: cls(topk)


__all__ = ["TOPK", "correct_topk", "accuracy", "format_acc", "TopK"]
