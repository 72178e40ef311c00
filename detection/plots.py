"""PNG figures of the detection task (matplotlib, Agg): mAP vs time step, and the figures of one SNN
metrics record."""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

from common.plots import plot_metric_vs_t, plot_snn_record


def plot_map_vs_t(curves: Mapping[str, Sequence[float]], path: str, ann: Optional[Mapping[str, float]] = None,
                  title: str = "") -> str:
    """``curves``: label -> mAP (%) after t = 1..T; ``ann``: label -> horizontal reference line."""
    return plot_metric_vs_t(curves, path, ann, title, ylabel="mAP@0.5 (%)")


def plot_snn_metrics(rec: Dict, json_path: str) -> List[str]:
    """mAP-vs-t and per-layer PNGs for one metrics JSON (written next to it)."""
    return plot_snn_record(rec, json_path, key="map", model="version", curve=plot_map_vs_t, suffix="map_vs_t")
