"""PNG figures (matplotlib, Agg backend -- no display needed), shared by the tasks.

* :func:`plot_metric_vs_t`: a task's SNN metric after t = 1..T steps (one curve per run), the ANN's as a line;
* :func:`plot_layers`: per-layer agreement with the ANN's quantized levels and firing rate;
* :func:`plot_training`: loss / accuracy / learning-rate curves of an ANN training run;
* :func:`plot_snn_record`: the first two for one SNN metrics JSON, written next to it.

The classification figures (top-1 vs t) are :mod:`classification.plots`.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence


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


def plot_metric_vs_t(curves: Mapping[str, Sequence[float]], path: str, ann: Optional[Mapping[str, float]] = None,
                     title: str = "", ylabel: str = "metric (%)") -> str:
    """``curves``: label -> the SNN's metric after t = 1..T; ``ann``: label -> horizontal reference line."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, vals) in enumerate(curves.items()):
        ax.plot(range(1, len(vals) + 1), vals, marker="o", ms=4, label=label, color=f"C{i}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for i, (label, v) in enumerate((ann or {}).items()):
        if v is not None:
            ax.axhline(v, ls="--", lw=1, color=f"C{i}", alpha=0.6, label=label)
    ax.set_xlabel("time step t")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"SNN {ylabel.split(' (')[0]} vs time step")
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


def plot_training(history: List[Dict], path: str, title: str = "", key: str = "test_top1",
                  label: str = "top-1 (%)", train_key: Optional[str] = "train_top1") -> str:
    """Training curves: loss (``train_loss``, and ``test_loss`` where recorded), the evaluated metric
    ``key`` (and ``train_key``, where recorded) and the learning rate per epoch."""
    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.5))
    a1.plot(ep, [h.get("train_loss") for h in history], label="train")
    if any(h.get("test_loss") is not None for h in history):
        a1.plot(ep, [h.get("test_loss") for h in history], label="test")
    a1.set_ylabel("loss")
    if train_key and any(h.get(train_key) is not None for h in history):
        a2.plot(ep, [h.get(train_key) for h in history], label="train")
    ev = [h for h in history if h.get(key) is not None]
    a2.plot([h["epoch"] for h in ev], [h[key] for h in ev], marker="o", label=key.split("_")[0])
    a2.set_ylabel(label)
    a3.plot(ep, [h.get("lr") for h in history])
    a3.set_yscale("log")
    a3.set_ylabel("learning rate")
    for a in (a1, a2, a3):
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        if a is not a3:
            a.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_snn_record(rec: Dict, json_path: str, *, key: str, model: str, curve: Callable[..., str],
                    suffix: str) -> List[str]:
    """The PNGs of one SNN metrics record, named after its JSON: ``<stem>_<suffix>.png`` (``curve`` of
    ``rec["per_step_<key>"]`` with ``rec["ann_<key>"]`` as the reference line) and ``<stem>_layers.png``.
    ``model``: the record's key naming the network (for the title)."""
    stem = os.path.splitext(json_path)[0]
    label = f"{rec.get('neuron')} T={rec.get('T')}"
    title = f"{rec.get(model)} {rec.get('bit')}-bit, {label}"
    out = []
    if rec.get(f"per_step_{key}"):
        out.append(curve({f"SNN {label}": rec[f"per_step_{key}"]}, f"{stem}_{suffix}.png",
                         {"ANN": rec.get(f"ann_{key}")}, title))
    if rec.get("layers"):
        out.append(plot_layers({label: rec["layers"]}, stem + "_layers.png", title))
    return out
