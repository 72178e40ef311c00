"""PNG figures of the segmentation task: mIoU after each time step, per-layer statistics, prediction
overlays."""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence

from common.plots import _pyplot, plot_metric_vs_t, plot_snn_record


def plot_miou_vs_t(curves: Mapping[str, Sequence[float]], path: str,
                   ann: Optional[Mapping[str, Optional[float]]] = None, title: str = "") -> str:
    """``curves``: label -> SNN mIoU (%) after t = 1..T; ``ann``: label -> ANN mIoU reference lines."""
    return plot_metric_vs_t(curves, path, ann, title, ylabel="mIoU (%)")


def plot_metrics(rec: Dict, json_path: str) -> List[str]:
    """mIoU-vs-t and per-layer PNGs for one SNN metrics record (nothing for an ANN record)."""
    return plot_snn_record(rec, json_path, key="miou", model="model", curve=plot_miou_vs_t, suffix="miou_vs_t")


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


__all__ = ["plot_miou_vs_t", "plot_metrics", "plot_overlays"]
