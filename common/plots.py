"""PNG figures (matplotlib, Agg backend -- no display needed).

* :func:`plot_accuracy_vs_t`: SNN top-1 after t = 1..T steps (one curve per run), ANN top-1 as a line;
* :func:`plot_layers`: per-layer agreement with the ANN's quantized levels and firing rate;
* :func:`plot_training`: loss / accuracy / learning-rate curves of an ANN training run;
* :func:`plot_snn_metrics`: the first two for one metrics JSON, written next to it.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> str:
    from matplotlib.ticker import MaxNLocator
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_accuracy_vs_t(curves: Mapping[str, Sequence[float]], path: str,
                       ann_top1: Optional[Mapping[str, float]] = None, title: str = "") -> str:
    """``curves``: label -> top-1 (%) after t = 1..T. ``ann_top1``: label -> horizontal reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, acc in curves.items():
        ax.plot(range(1, len(acc) + 1), acc, marker="o", label=label)
    for i, (label, acc) in enumerate((ann_top1 or {}).items()):
        if acc is not None:
            ax.axhline(acc, ls="--", lw=1, color=f"C{i}", alpha=0.6, label=label)
    ax.set_xlabel("time step t")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "SNN accuracy vs time step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_layers(runs: Mapping[str, List[dict]], path: str, title: str = "") -> str:
    """``runs``: label -> ``layers`` list of a metrics JSON (first layer first)."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.25 * max(len(v) for v in runs.values())), 6),
                                 sharex=True)
    for label, layers in runs.items():
        idx = range(1, len(layers) + 1)
        a1.plot(idx, [l["agreement"] for l in layers], marker=".", label=label)
        a2.plot(idx, [l["firing_rate"] for l in layers], marker=".", label=label)
    a1.set_ylabel("agreement with ANN")
    a1.set_ylim(0, 1.02)
    a2.set_ylabel("firing rate (spikes/neuron/step)")
    a2.set_xlabel("spiking layer")
    a1.set_title(title or "per-layer agreement and firing rate")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return _save(fig, path)


def plot_training(history: List[Dict], path: str, title: str = "") -> str:
    """``history``: per-epoch dicts with ``epoch``, ``train_loss``, ``train_top1``, ``test_top1``, ``lr``."""
    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.5))
    a1.plot(ep, [h.get("train_loss") for h in history], label="train")
    a1.plot(ep, [h.get("test_loss") for h in history], label="test")
    a1.set_ylabel("loss")
    a2.plot(ep, [h.get("train_top1") for h in history], label="train")
    a2.plot(ep, [h.get("test_top1") for h in history], label="test")
    a2.set_ylabel("top-1 (%)")
    a3.plot(ep, [h.get("lr") for h in history])
    a3.set_yscale("log")
    a3.set_ylabel("learning rate")
    for a in (a1, a2, a3):
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_snn_metrics(metrics: Dict, json_path: str) -> List[str]:
    """Accuracy-vs-t and per-layer PNGs for one SNN metrics JSON, named after it."""
    stem = os.path.splitext(json_path)[0]
    label = f"{metrics.get('neuron')} T={metrics.get('T')}"
    title = f"{metrics.get('arch')} {metrics.get('bit')}-bit, {label}"
    out = []
    if metrics.get("per_step_top1"):
        out.append(plot_accuracy_vs_t({f"SNN {label}": metrics["per_step_top1"]}, stem + "_acc_vs_t.png",
                                      {"ANN": metrics.get("ann_top1")}, title))
    if metrics.get("layers"):
        out.append(plot_layers({label: metrics["layers"]}, stem + "_layers.png", title))
    return out
