"""PNG figures of the classification task: SNN top-1 after each time step, and the figures of one SNN
metrics JSON (the per-layer and training figures are :mod:`common.plots`)."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

from common.plots import plot_metric_vs_t, plot_snn_record


def plot_accuracy_vs_t(curves: Mapping[str, Sequence[float]], path: str,
                       ann_top1: Optional[Mapping[str, float]] = None, title: str = "") -> str:
    """``curves``: label -> top-1 (%) after t = 1..T. ``ann_top1``: label -> horizontal reference."""
    return plot_metric_vs_t(curves, path, ann_top1, title or "SNN accuracy vs time step", "top-1 accuracy (%)")


def plot_snn_metrics(metrics: Dict, json_path: str) -> List[str]:
    """Accuracy-vs-t and per-layer PNGs for one SNN metrics JSON, named after it
    (``<stem>_acc_vs_t.png``, ``<stem>_layers.png``)."""
    return plot_snn_record(metrics, json_path, key="top1", model="arch", curve=plot_accuracy_vs_t,
                           suffix="acc_vs_t")


__all__ = ["plot_accuracy_vs_t", "plot_snn_metrics"]
