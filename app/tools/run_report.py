"""``fedws diagnose RUN_DIR``: a run's report, ``diagnostics.md`` and its figures, from the run
directory alone.

Reads ``diagnostics.csv`` (the measurements of ``app.learn.diagnostics``, written by the
server), ``metrics.csv`` and ``config.yaml``; writes ``RUN_DIR/diagnostics.md`` and
``RUN_DIR/figures/diag_*.png``.
"""

from __future__ import annotations

import math
from pathlib import Path

from app import rundir
from app.learn.diagnostics import ALL, GROUPS
from app.rundir import RunDir
from app.tools import plots

EXPLAIN = {
    "drift_mean": "mean over clients of ‖w_k - w_prev‖ / ‖w_prev‖",
    "drift_max": "max over clients of the same",
    "drift_spread": "mean over clients of ‖w_k - mean_j w_j‖ / ‖w_prev‖ (0: clients agree)",
    "update_cosine": "mean pairwise cosine of the client updates (1: same direction)",
    "bn_divergence": "client vs aggregated BN running stats, symmetric KL (mean over channels, "
    "clients, layers)",
    "bn_test_gap": "global model's BN running stats vs the test data's batch stats, symmetric KL",
    "bn_test_gap_recalibrated": "the same after server-side BN recalibration",
    "test_accuracy_raw": "test accuracy without recalibration",
    "test_loss_raw": "test loss without recalibration",
}


def _last(points: list[tuple[float, float]]) -> float:
    finite = [v for _, v in sorted(points) if math.isfinite(v)]
    return finite[-1] if finite else math.nan


def layer_names(layers: list[str]) -> dict[str, str]:
    """Legend names for the layers of a per-layer quantity (BN layers, in model order): what
    they are ("norm 1", "norm 2", ...), not module paths; ``all`` is their mean."""
    named = [layer for layer in layers if layer != ALL]
    names = {layer: f"norm {i}" for i, layer in enumerate(named, start=1)}
    return names | {ALL: "mean over layers"}


def write_diagnostics(run: Path, out: Path | None = None) -> Path:
    """Write ``diagnostics.md`` and its figures into ``out`` (default: the run directory);
    return its path."""
    folder = RunDir(run)
    run = folder.path
    curves = rundir.read_diagnostics(folder)
    cfg = rundir.read_config(folder.config)
    summary = rundir.read_summary(folder) or {}
    target = RunDir(out) if out is not None else folder
    target.path.mkdir(parents=True, exist_ok=True)
    figures = target.figures
    p = cfg.data.partition
    partition = p.kind + (f"({p.concentration})" if p.kind == "dirichlet" else "")
    md = [
        f"# fedws diagnostics: {run.name}",
        "",
        f"{cfg.data.dataset}, {cfg.model.arch} + {cfg.model.norm}, {cfg.federation.strategy}, "
        f"{p.num_clients} clients, partition {partition}, {cfg.federation.rounds} rounds"
        + (", BN recalibration on" if cfg.server.bn_recalibration else "")
        + f"; run status: {summary.get('status', 'unknown')}.",
        "",
    ]
    if not curves:
        md += ["No diagnostics were recorded (`server.diagnostics: false`?).", ""]
    else:
        md += ["| quantity | final | mean over rounds | meaning |", "|---|---|---|---|"]
        for quantity, layers in curves.items():
            points = layers.get(ALL, [])
            values = [v for r, v in points if r > 0 and math.isfinite(v)] or [
                v for _, v in points if math.isfinite(v)
            ]
            mean = sum(values) / len(values) if values else math.nan
            md.append(
                f"| {quantity} | {_last(points):.4g} | {mean:.4g} | {EXPLAIN.get(quantity, '')} |"
            )
        md.append("")

    names = {
        ALL: "whole model",
        "convs": "convolutions",
        "norms": "norm layers",
        "classifier": "classifier",
        "other": "other layers",
    }
    drift = {
        f"Client drift: {names.get(group, group)}": {
            "mean over clients": curves.get("drift_mean", {}).get(group, []),
            "max over clients": curves.get("drift_max", {}).get(group, []),
            "spread around their mean": curves.get("drift_spread", {}).get(group, []),
        }
        for group in (ALL, *GROUPS)
        if group in curves.get("drift_mean", {})
    }
    ylabels = {title: "distance / ||w_prev||" for title in drift}
    if "update_cosine" in curves:
        drift["Update agreement"] = {"mean pairwise cosine": curves["update_cosine"][ALL]}
        ylabels["Update agreement"] = "cosine (1: same direction)"
    if drift:
        png = plots.line_panels(drift, figures / "diag_drift.png", ylabels=ylabels, max_cols=2)
        md += [
            "## Client drift and update agreement",
            "",
            f"![drift]({png.relative_to(target.path)})",
            "",
        ]

    bn = {
        title: {layer_names(list(curves[q]))[layer]: points for layer, points in curves[q].items()}
        for q, title in (
            ("bn_divergence", "BN statistics: clients vs aggregate"),
            ("bn_test_gap", "BN statistics: train vs test"),
            ("bn_test_gap_recalibrated", "BN statistics: train vs test, recalibrated"),
        )
        if q in curves
    }
    if bn:
        png = plots.line_panels(
            bn,
            figures / "diag_bn_statistics.png",
            log_y=tuple(bn),
            ylabels=dict.fromkeys(bn, "symmetric KL divergence"),
            max_cols=2,
        )
        md += [
            "## BatchNorm statistics",
            "",
            "One line per BN layer (norm 1 is the first in the model), and their mean. A large "
            "gap between the global model's running statistics and what the test data produce "
            "means the model normalizes test inputs with the wrong mean/variance: "
            "recalibration removes exactly that part.",
            "",
            f"![BN statistics]({png.relative_to(target.path)})",
            "",
        ]
    accuracy = {"global test accuracy": rundir.metric_curve(folder, "test_accuracy")}
    if "test_accuracy_raw" in curves:
        accuracy = {
            "with BN recalibration": accuracy["global test accuracy"],
            "without": curves["test_accuracy_raw"][ALL],
        }
    png = plots.line_panels(
        {"Global test accuracy": accuracy},
        figures / "diag_accuracy.png",
        ylabels={"Global test accuracy": "accuracy"},
    )
    md += ["## Accuracy", "", f"![accuracy]({png.relative_to(target.path)})", ""]
    target.diagnostics_report.write_text("\n".join(md))
    return target.diagnostics_report
