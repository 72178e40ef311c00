"""PNG figures of the segmentation task: mIoU after each time step, per-layer statistics, training curves,
prediction overlays."""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence

from common.plots import _pyplot, _save, plot_layers


def plot_miou_vs_t(curves: Mapping[str, Sequence[float]], path: str,
                   ann: Optional[Mapping[str, Optional[float]]] = None, title: str = "") -> str:
    """``curves``: label -> SNN mIoU (%) after t = 1..T; ``ann``: label -> ANN mIoU reference lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, vals) in enumerate(curves.items()):
        ax.plot(range(1, len(vals) + 1), vals, marker="o", ms=3, label=label, color=f"C{i}")
    for i, (label, v) in enumerate((ann or {}).items()):
        if v is not None:
            ax.axhline(v, ls="--", lw=1, color=f"C{i}", alpha=0.6, label=label)
    ax.set_xlabel("time step t")
    ax.set_ylabel("mIoU (%)")
    ax.set_title(title or "SNN mIoU vs time step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_metrics(rec: Dict, json_path: str) -> List[str]:
    """mIoU-vs-t and per-layer PNGs for one SNN metrics record (nothing for an ANN record)."""
    stem = os.path.splitext(json_path)[0]
    out = []
    label = f"{rec.get('neuron')} T={rec.get('T')}"
    title = f"{rec.get('model')} {rec.get('bit')}-bit, {label}"
    if rec.get("per_step_miou"):
        out.append(plot_miou_vs_t({f"SNN {label}": rec["per_step_miou"]}, stem + "_miou_vs_t.png",
                                  {"ANN": rec.get("ann_miou")}, title))
    if rec.get("layers"):
        out.append(plot_layers({label: rec["layers"]}, stem + "_layers.png", title))
    return out


def plot_training(history: List[Dict], path: str, title: str = "") -> str:
    """Training loss, validation mIoU and learning rate per epoch."""
    plt = _pyplot()
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(12, 3.5))
    ep = [h["epoch"] for h in history]
    a1.plot(ep, [h.get("train_loss") for h in history])
    a1.set_ylabel("train loss")
    ev = [h for h in history if h.get("val_miou") is not None]
    a2.plot([h["epoch"] for h in ev], [h["val_miou"] for h in ev], marker="o")
    a2.set_ylabel("val mIoU (%)")
    a3.plot(ep, [h.get("lr") for h in history])
    a3.set_ylabel("learning rate (end of epoch)")
    for a in (a1, a2, a3):
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_overlays(panels: Sequence[Sequence], titles: Sequence[str], path: str, row_labels: Sequence[str] = ()) -> str:
    """A grid of RGB images: ``panels[row][col]`` (``uint8 [H, W, 3]``), column titles, row labels."""
    plt = _pyplot()
    rows, cols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for r, row in enumerate(panels):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(row):
                ax.imshow(row[c])
            if r == 0 and c < len(titles):
                ax.set_title(titles[c], fontsize=8)
            if c == 0 and r < len(row_labels):
                ax.set_ylabel(row_labels[r], fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_miou_vs_t", "plot_metrics", "plot_training", "plot_overlays"]
