"""Figures written next to results (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    # the scale starts at 0: near-uniform clients must not look skewed
    im = ax.imshow(counts, aspect="auto", cmap="viridis", vmin=0)
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
    return _save(fig, path)


def _panel_grid(n: int, max_cols: int, width: float):
    """A figure of ``n`` panels, ``max_cols`` to a row; the unused cells of the grid hidden."""
    plt = _pyplot()
    cols = min(n, max_cols)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.4 * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, axes


UNRELIABLE = " (server model: untrained BN, not meaningful)"


def accuracy_curves(
    panels: dict[str, list[tuple[str, list[tuple[int, float]]]]],
    path: Path,
    unreliable: set[str] = frozenset(),
) -> Path:
    """One panel per partition, one line per row label: the mean over seeds and the seeds'
    band (min to max). Labels in ``unreliable`` (FedBN's server model, whose BN layers never
    train) are drawn dashed grey and labelled as not meaningful."""
    fig, axes = _panel_grid(len(panels), max_cols=4, width=4.2)
    labels = list(dict.fromkeys(label for runs in panels.values() for label, _ in runs))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # the same in every panel
    for ax, (title, runs) in zip(axes.flat, panels.items(), strict=False):
        by_label: dict[str, list[dict[int, float]]] = {}
        for label, curve in runs:
            by_label.setdefault(label, []).append(dict(curve))
        for label, curves in by_label.items():
            rounds = sorted(set.intersection(*(set(c) for c in curves)))
            values = np.array([[c[r] for r in rounds] for c in curves])
            style = {"color": colours[label], "label": label}
            if label in unreliable:
                style = {"color": "grey", "linestyle": "--", "label": label + UNRELIABLE}
            ax.plot(rounds, values.mean(axis=0), marker=".", markersize=3, **style)
            if len(curves) > 1:
                ax.fill_between(
                    rounds, values.min(axis=0), values.max(axis=0), alpha=0.2, color=style["color"]
                )
        ax.set_title(title)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round")
        ax.set_ylabel("global test accuracy")
        ax.grid(alpha=0.3)
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 3), frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return _save(fig, path)


def accuracy_vs_alpha(points: list[tuple[str, float, float]], path: Path) -> Path:
    """Final accuracy (seed mean) against the Dirichlet alpha, log axis, a line per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    labels = list(dict.fromkeys(label for label, _, _ in points))
    for label in labels:
        by_alpha: dict[float, list[float]] = {}
        for lab, alpha, acc in points:
            if lab == label:
                by_alpha.setdefault(alpha, []).append(acc)
        alphas = sorted(by_alpha)
        ax.plot(alphas, [np.mean(by_alpha[a]) for a in alphas], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("Dirichlet alpha (log; smaller = more label skew)")
    ax.set_ylabel("final global test accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def client_spread(values: dict[str, list[float]], path: Path, title: str) -> Path:
    """Box plot of per-client accuracies, one box per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(values) + 2), 3.8))
    ax.boxplot(list(values.values()), tick_labels=list(values))
    ax.set_ylabel("client validation accuracy")
    ax.set_title(f"per-client accuracy, {title}")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


Series = dict[str, list[tuple[float, float]]]  # line label -> (x, y) points


def line_panels(
    panels: dict[str, Series],
    path: Path,
    xlabel: str = "round",
    log_y: tuple[str, ...] = (),
    categories: list[str] | None = None,
    ylabels: dict[str, str] | None = None,
    max_cols: int = 3,
) -> Path:
    """One panel per title, one line per label; ``log_y`` names the panels on a log scale,
    ``ylabels`` the panels' y-axis labels. With ``categories``, x values are indices into it
    (tick labels)."""
    fig, axes = _panel_grid(len(panels), max_cols=max_cols, width=4.4)
    # one colour and line style per label in every panel; styles keep coinciding lines visible
    labels = list(dict.fromkeys(label for series in panels.values() for label in series))
    styles = {
        label: {"color": f"C{i % 10}", "linestyle": ("-", "--", ":", "-.")[i % 4]}
        for i, label in enumerate(labels)
    }
    for ax, (title, series) in zip(axes.flat, panels.items(), strict=False):
        for label, points in series.items():
            points = sorted(p for p in points if np.isfinite(p[1]))
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, label=label, marker=".", markersize=4, **styles[label])
        if title in log_y and any(p[1] > 0 for s in series.values() for p in s):
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        if categories is not None:
            ax.set_xticks(range(len(categories)), categories)
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        if ylabels and title in ylabels:
            ax.set_ylabel(ylabels[title], fontsize=8)
        ax.grid(alpha=0.3)
        if 1 < len(series) <= 8:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


Groups = dict[str, dict[str, list[float]]]  # series label -> category -> values (the seeds)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def category_panels(
    panels: dict[str, Groups],
    path: Path,
    categories: list[str],
    xlabel: str,
    ylabels: dict[str, str],
    log_y: tuple[str, ...] = (),
    max_cols: int = 2,
) -> Path:
    """One panel per title with a value per series and category (a partition): the mean over
    the seeds as a point with its 95% confidence interval (Student t; a single seed: the point
    alone), no line joining categories; the series side by side with their own marker and
    colour, so coinciding ones stay visible. Panels without a value are left out. On a log
    axis (``log_y``) an interval reaching below a tenth of its mean is cut there (a log axis
    has no zero), and ticks are plain numbers."""
    from app.tools.stats import mean_ci

    panels = {t: g for t, g in panels.items() if any(v for s in g.values() for v in s.values())}
    fig, axes = _panel_grid(max(1, len(panels)), max_cols=max_cols, width=4.6)
    labels = list(dict.fromkeys(label for groups in panels.values() for label in groups))
    width = 0.6 / max(1, len(labels))
    legend: dict[str, Any] = {}
    for ax, (title, groups) in zip(axes.flat, panels.items(), strict=False):
        log = title in log_y
        for i, label in enumerate(labels):
            xs, ys, low, high = [], [], [], []
            for j, cat in enumerate(categories):
                values = [v for v in groups.get(label, {}).get(cat, []) if np.isfinite(v)]
                if values:
                    interval = mean_ci(values)
                    half = interval.half_width or 0.0
                    xs.append(j + (i - (len(labels) - 1) / 2) * width)
                    ys.append(interval.mean)
                    low.append(min(half, 0.9 * interval.mean) if log else half)
                    high.append(half)
            if xs:
                legend[label] = ax.errorbar(
                    xs, ys, yerr=[low, high], fmt=MARKERS[i % len(MARKERS)], capsize=3,
                    color=f"C{i % 10}", markersize=5, linestyle="none", label=label,
                )  # fmt: skip
        if log:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        ax.set_xticks(range(len(categories)), categories)
        ax.set_xlim(-0.5, len(categories) - 0.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabels.get(title, ""), fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    if legend:
        fig.legend(
            list(legend.values()), list(legend), loc="lower center", frameon=False,
            ncol=min(len(legend), 3),
        )  # fmt: skip
    rows = (len(legend) + 2) // 3
    fig.tight_layout(rect=(0, 0.05 * rows if legend else 0, 1, 1))
    return _save(fig, path)


def _plain_log_ticks(ax) -> None:
    """A log axis labelled in plain numbers (0.02, 5.9), never 5.86x10^0: the decades when it
    spans more than one, else a few plain ticks inside it."""
    from matplotlib.ticker import LogLocator, NullFormatter

    plain = _plain_formatter()
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=8))
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    if high / max(low, 1e-300) < 10:  # within one decade: label a few minor ticks
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0), numticks=8))
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())


def _plain_formatter():
    """Tick labels as plain numbers (0.02, 5.9), never 5.86x10^0."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: f"{value:.3g}")


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
