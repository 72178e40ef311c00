"""PNG figures of the detection task (matplotlib, Agg): mAP vs time step, per-layer statistics,
training curves."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

from common.plots import _pyplot, _save, plot_layers, plot_metric_vs_t, plot_snn_record  # noqa: F401 (plot_layers: re-export)


def plot_map_vs_t(curves: Mapping[str, Sequence[float]], path: str, ann: Optional[Mapping[str, float]] = None,
                  title: str = "") -> str:
    """``curves``: label -> mAP (%) after t = 1..T; ``ann``: label -> horizontal reference line."""
    return plot_metric_vs_t(curves, path, ann, title, ylabel="mAP@0.5 (%)")


def plot_training(history: List[Dict], path: str, title: str = "") -> str:
    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(ep, [h.get("train_loss") for h in history])
    a1.set_ylabel("train loss")
    ev = [h for h in history if h.get("test_map") is not None]
    a2.plot([h["epoch"] for h in ev], [h["test_map"] for h in ev], marker="o")
    a2.set_ylabel("test mAP (%)")
    for a in (a1, a2):
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_snn_metrics(rec: Dict, json_path: str) -> List[str]:
    """mAP-vs-t and per-layer PNGs for one metrics JSON (written next to it)."""
    return plot_snn_record(rec, json_path, key="map", model="version", curve=plot_map_vs_t, suffix="map_vs_t")
