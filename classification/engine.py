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
from typing import Callable, Dict, List, Optional

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
                    max_iters: Optional[int] = None) -> Dict[str, float]:
    """One epoch of SGD. ``epoch`` is 1-based (for messages). Returns train loss / top-1 / top-5."""
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
        out, loss = sgd_step(model, x, y, criterion, optimizer, epoch, i + 1)
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
def fit(model: nn.Module, optimizer, scheduler, train_loader, val_loader, *, epochs: int, start_epoch: int = 0,
        best_acc1: float = 0.0, history: Optional[List[dict]] = None,
        on_epoch_end: Optional[Callable[[int, float, bool, List[dict]], None]] = None,
        print_freq: int = 100, show_progress: bool = True, tb: Optional[TensorBoard] = None,
        max_iters: Optional[int] = None) -> tuple:
    """Train epochs ``start_epoch .. epochs-1``, evaluate after each, track the best test top-1.

    ``on_epoch_end(epochs_done, best_acc1, is_best, history)`` is called on every rank after each
    epoch (the caller saves checkpoints on rank 0). Returns ``(best_acc1, history)``.
    """
    history = list(history or [])
    criterion = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, epochs):
        lr = optimizer.param_groups[0]["lr"]
        log(f"epoch {epoch + 1}/{epochs}  lr {lr:.4g}")
        tr = train_one_epoch(model, train_loader, criterion, optimizer, epoch + 1, print_freq=print_freq,
                             show_progress=show_progress, tb=tb, max_iters=max_iters)
        scheduler.step()
        te = evaluate(dist.unwrap(model), val_loader, criterion, desc=f"test {epoch + 1}", show_progress=show_progress)
        is_best = te["top1"] > best_acc1 or not history
        best_acc1 = max(best_acc1, te["top1"]) if history else te["top1"]
        history.append({"epoch": epoch + 1, "lr": lr, **tr, "test_loss": te["loss"], "test_top1": te["top1"],
                        "test_top5": te["top5"], "best_acc1": best_acc1})
        log(f"epoch {epoch + 1}/{epochs}: train loss {tr['train_loss']:.4f} top-1 {tr['train_top1']:.2f} | "
            f"test top-1 {te['top1']:.2f} top-5 {te['top5']:.2f} | best {best_acc1:.2f}")
        if tb is not None:
            tb.scalars(epoch + 1, "epoch/", lr=lr, train_loss=tr["train_loss"], train_top1=tr["train_top1"],
                       test_loss=te["loss"], test_top1=te["top1"], test_top5=te["top5"])
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, best_acc1, is_best, history)
    return best_acc1, history


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
