"""PNG figures of the detection task (matplotlib, Agg): mAP vs time step, per-layer statistics,
training curves."""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_map_vs_t(curves: Mapping[str, Sequence[float]], path: str, ann: Optional[Mapping[str, float]] = None,
                  title: str = "") -> str:
    """``curves``: label -> mAP (%) after t = 1..T; ``ann``: label -> horizontal reference line."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, m) in enumerate(curves.items()):
        ax.plot(range(1, len(m) + 1), m, marker="o", ms=3, label=label, color=f"C{i}")
    for i, (label, v) in enumerate((ann or {}).items()):
        if v is not None:
            ax.axhline(v, ls="--", lw=1, color=f"C{i}", alpha=0.6, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("time step t")
    ax.set_ylabel("mAP@0.5 (%)")
    ax.set_title(title or "SNN mAP vs time step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_layers(runs: Mapping[str, List[dict]], path: str, title: str = "") -> str:
    """``runs``: label -> ``layers`` of a metrics JSON: agreement with the ANN and firing rate per layer."""
    from common.plots import plot_layers as common_plot_layers
    return common_plot_layers(runs, path, title)


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
    stem = os.path.splitext(json_path)[0]
    label = f"{rec.get('neuron')} T={rec.get('T')}"
    title = f"{rec.get('version')} {rec.get('bit')}-bit, {label}"
    out = []
    if rec.get("per_step_map"):
        out.append(plot_map_vs_t({f"SNN {label}": rec["per_step_map"]}, stem + "_map_vs_t.png",
                                 {"ANN": rec.get("ann_map")}, title))
    if rec.get("layers"):
        out.append(plot_layers({label: rec["layers"]}, stem + "_layers.png", title))
    return out
