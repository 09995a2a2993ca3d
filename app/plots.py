"""Figures written next to results (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_heatmap(
    counts: np.ndarray, classes: tuple[str, ...] | list[str], path: Path, title: str
) -> Path:
    """Clients (rows) x classes (columns) heatmap of sample counts, annotated when small."""
    plt = _pyplot()
    n_clients, n_classes = counts.shape
    fig, ax = plt.subplots(
        figsize=(max(5.0, 0.55 * n_classes + 2), max(3.0, 0.32 * n_clients + 1.5))
    )
    im = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set_xticks(range(n_classes), [str(c) for c in classes], rotation=45, ha="right")
    step = max(1, n_clients // 25)
    ax.set_yticks(range(0, n_clients, step), [str(i) for i in range(0, n_clients, step)])
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_title(title)
    if n_clients * n_classes <= 400:
        threshold = counts.max() / 2 if counts.size else 0
        for i in range(n_clients):
            for j in range(n_classes):
                color = "black" if counts[i, j] > threshold else "white"
                ax.text(j, i, int(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, label="samples")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
