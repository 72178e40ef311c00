"""Training and evaluation loops of the image classifiers' ANNs (shared by CIFAR and ImageNet), and what
the SNN fine-tuner needs of the classification task (a reshuffling training loader, the train-top-1
score); the SNN itself is evaluated and fine-tuned through :mod:`common.pipeline`.

Every loop is DDP-aware: it reads :func:`common.dist.context`, reduces its counts over the ranks and
shows progress / writes output on rank 0 only. Loaders yield ``(images, targets)`` (a DALI pipeline
must be wrapped to yield those). Accuracies are percentages.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from common import dist
from common.logger import TensorBoard, log, progress
from common.metrics import AverageMeter, CountMeter, reduce_meters
from common.runs import set_loader_epoch, sgd_step

from .metrics import TOPK, TopK, correct_topk, format_acc


def _to(batch, device):
    x, y = batch[0], batch[1]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------- ANN
def train_one_epoch(model: nn.Module, loader, criterion, optimizer, epoch: int, *, print_freq: int = 100,
                    show_progress: bool = True, tb: Optional[TensorBoard] = None,
                    max_iters: Optional[int] = None, amp: bool = False) -> Dict[str, float]:
    """One epoch of SGD (the forward pass in bfloat16 autocast with ``amp``). ``epoch`` is 1-based (for
    messages). Returns train loss / top-1 / top-5."""
    ctx = dist.context()
    model.train()
    set_loader_epoch(loader, epoch)
    loss_m, top1, top5 = AverageMeter("loss"), AverageMeter("acc1", ":.2f"), AverageMeter("acc5", ":.2f")
    n_iter = len(loader) if max_iters is None else min(len(loader), max_iters)
    bar = progress(loader, f"train {epoch}", show_progress, total=n_iter)
    t0 = time.time()
    for i, batch in enumerate(bar):
        if i >= n_iter:
            break
        x, y = _to(batch, ctx.device)
        out, loss = sgd_step(model, x, y, criterion, optimizer, epoch, i + 1, amp=amp)
        c1, c5 = correct_topk(out.detach(), y, TOPK)
        n = y.shape[0]
        loss_m.update(loss.item(), n)
        top1.update(100.0 * c1 / n, n)
        top5.update(100.0 * c5 / n, n)
        if i % print_freq == 0 or i + 1 == n_iter:
            _report_train(bar, epoch, i, n_iter, loss_m, top1, top5, optimizer)
            if tb is not None:
                tb.scalars((epoch - 1) * n_iter + i, "train_iter/", loss=loss_m.val, top1=top1.val)
    reduce_meters([loss_m, top1, top5])
    return {"train_loss": loss_m.avg, "train_top1": top1.avg, "train_top5": top5.avg,
            "train_seconds": time.time() - t0}


def _report_train(bar, epoch, i, n, loss_m, top1, top5, optimizer):
    lr = optimizer.param_groups[0]["lr"]
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(loss=f"{loss_m.avg:.4f}", acc1=f"{top1.avg:.2f}", lr=f"{lr:.3g}", refresh=False)
    else:
        log(f"Epoch: [{epoch}][{i + 1}/{n}]  {loss_m}  {top1}  {top5}  lr {lr:.4g}")


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion=None, *, desc: str = "test", show_progress: bool = True,
             print_result: bool = True) -> Dict[str, float]:
    """Loss / top-1 / top-5 of an ANN over the whole loader (summed over ranks)."""
    ctx = dist.context()
    model.eval()
    counts, loss_sum = CountMeter(len(TOPK)), 0.0
    for batch in progress(loader, desc, show_progress):
        x, y = _to(batch, ctx.device)
        out = model(x)
        if criterion is not None:
            loss_sum += float(criterion(out, y)) * y.shape[0]
        counts.update(correct_topk(out, y, TOPK), y.shape[0])
    loss_sum = dist.all_reduce_sum([loss_sum])[0]
    counts.reduce()
    top1, top5 = counts.percent()
    if print_result:
        log(format_acc(top1, top5))
    return {"top1": top1, "top5": top5, "loss": loss_sum / max(counts.total, 1), "samples": int(counts.total)}


# ---------------------------------------------------------------------------------------- training driver
def epoch_steps(net: nn.Module, model: nn.Module, train_loader, val_loader, optimizer, scheduler, *,
                print_freq: int = 100, show_progress: bool = True,
                max_iters: Optional[int] = None, amp: bool = False) -> Tuple[Callable[..., dict], Callable[[int], dict]]:
    """``(train_epoch(epoch, tb=None), evaluate(epoch))`` for :func:`common.runner.epochs` /
    :func:`common.runner.train`: an epoch of SGD on ``net`` (the DDP wrapper, if any) and a scheduler
    step; the test loss / top-1 / top-5 of ``model``."""
    criterion = nn.CrossEntropyLoss()

    def train_epoch(epoch: int, tb: Optional[TensorBoard] = None) -> dict:
        lr = optimizer.param_groups[0]["lr"]
        tr = train_one_epoch(net, train_loader, criterion, optimizer, epoch + 1, print_freq=print_freq,
                             show_progress=show_progress, tb=tb, max_iters=max_iters, amp=amp)
        scheduler.step()
        return {"lr": lr, **tr}

    def test(epoch: int) -> dict:
        te = evaluate(model, val_loader, criterion, desc=f"test {epoch + 1}", show_progress=show_progress)
        return {"test_loss": te["loss"], "test_top1": te["top1"], "test_top5": te["top5"]}
    return train_epoch, test


# ---------------------------------------------------------------------------------------- SNN fine-tuning
def fixed_batches(loader, n: int) -> List:
    """The first ``n`` batches of ``loader``, drawn once and kept (tensors copied: a DALI pipeline may
    reuse its buffers) -- the same images for every accept / revert decision of the fine-tuner."""
    return [tuple(t.clone() if torch.is_tensor(t) else t for t in b) for b in itertools.islice(iter(loader), n)]


def top1_score(loader, *, max_batches: Optional[int] = None, desc: str = "score (train top-1)",
               show_progress: bool = True) -> Callable[[nn.Module], float]:
    """``score(net)``: the whole SNN's top-1 over (the first ``max_batches`` batches of) ``loader`` --
    the fine-tuner's acceptance score (as in the original: on the training set, with augmentation)."""
    from common import pipeline

    def score(net) -> float:
        return pipeline.evaluate(net, loader, TopK.factory((1,)), desc=desc, progress=show_progress,
                                 max_batches=max_batches)["top1"]
    return score
