"""A study's results table and report, rebuilt from its run directories alone.

``results.csv``: a row per cell. ``report.md``: the accuracy tables (each cell the mean over
seeds ± the half-width of its 95% confidence interval, Student t, with what the seeds varied
said in words; the best mean per column in bold only when it rests on >= 3 seeds and is not
tied), paired differences against a baseline row on the same seeds, accuracy-vs-round curves,
accuracy vs heterogeneity, the label distribution of each partition and the per-client
accuracy spread under the strongest skew. FedBN's server model (BatchNorm layers never
trained) is left out of the global-model tables, kept in the client and per-domain ones.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app import rundir
from app.config import Config
from app.data.partitions import label_entropy
from app.rundir import RESULT_COLUMNS, StudyDir
from app.tools import plots
from app.tools.partitions import partition_views
from app.tools.run_report import write_diagnostics
from app.tools.stats import mean_ci, paired
from app.tools.study import axis_label

PARTITION_KEY, SEED_KEY = "data.partition", "seed"


@dataclass
class CellResult:
    id: str
    axes: dict[str, Any]
    config: Config | None
    summary: dict[str, Any]
    curve: list[tuple[int, float]]  # (round, test accuracy) where evaluated
    client_acc: list[float]  # last round, global model on each client's validation split
    row: str
    column: str

    @property
    def status(self) -> str:
        return self.summary.get("status", rundir.PENDING)

    @property
    def completed(self) -> bool:
        return self.status == rundir.COMPLETED

    @property
    def diverged(self) -> bool:
        return self.status == rundir.DIVERGED

    @property
    def final(self) -> float:
        return _number((self.summary.get("final") or {}).get("test_accuracy"))

    @property
    def best(self) -> dict[str, Any]:
        """The round chosen on validation data (``summary.json``'s ``best``), or {}."""
        return self.summary.get("best") or {}


def _number(value: Any) -> float:
    """A summary value as a float; NaN for null (not measured, or non-finite)."""
    return math.nan if value is None else float(value)


def _resolved(cfg: Config | None, key: str) -> Any:
    node: Any = cfg.to_dict() if cfg else {}
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _load_cell(
    study: StudyDir,
    cid: str,
    axes: dict[str, Any],
    study_axes: list[str],
    name: str | None = None,
) -> CellResult:
    run = study.run(cid)
    cfg = rundir.run_config(run)
    summary = rundir.read_summary(run) or {"status": rundir.PENDING}
    curve = rundir.metric_curve(run, "test_accuracy")
    clients = rundir.read_csv(run.clients)
    last = max((int(r["round"]) for r in clients), default=None)
    client_acc = []
    for r in clients:  # only the global model's score: never a locally trained model's
        if int(r["round"]) == last:
            acc = rundir.cell_float(r["global_val_accuracy"])
            if not math.isnan(acc):
                client_acc.append(acc)

    def label(key: str) -> str:
        value = axes[key] if key in axes else _resolved(cfg, key)
        if isinstance(value, bool):  # a switch: named when on, left out when off
            return key.split(".")[-1] if value else ""
        return axis_label(value)

    row_keys = [k for k in study_axes if k not in (PARTITION_KEY, SEED_KEY)]
    row = name or ", ".join(filter(None, (label(k) for k in row_keys)))
    row = row or (cfg.model.norm if cfg else cid)
    column = label(PARTITION_KEY) if PARTITION_KEY in study_axes else "all"
    return CellResult(cid, axes, cfg, summary, curve, client_acc, row, column)


def load_results(out: Path) -> tuple[dict[str, Any], list[CellResult]]:
    study = StudyDir(out)
    meta = rundir.read_study(study)
    cells = [
        _load_cell(study, c["id"], c["axes"], meta["axes"], c.get("label")) for c in meta["cells"]
    ]
    return meta, cells


def _worst10(values: list[float]) -> float:
    if not values:
        return math.nan
    k = max(1, math.ceil(0.1 * len(values)))
    return float(np.mean(sorted(values)[:k]))


def write_results_csv(out: Path, cells: list[CellResult], target: float | None) -> Path:
    path = StudyDir(out).results
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for c in cells:
            cfg, s = c.config, c.summary
            reached = [r for r, acc in c.curve if target is not None and acc >= target]
            part = cfg.data.partition if cfg else None
            writer.writerow(
                {
                    "cell": c.id,
                    "status": c.status,
                    "row": c.row,
                    "column": c.column,
                    "dataset": cfg.data.dataset if cfg else "",
                    "arch": cfg.model.arch if cfg else "",
                    "norm": cfg.model.norm if cfg else "",
                    "strategy": cfg.federation.strategy if cfg else "",
                    "partition": part.kind if part else "",
                    "alpha": _alpha(part),
                    "seed": cfg.seed if cfg else "",
                    "final_test_accuracy": c.final if c.completed else "",
                    "final_test_loss": _blank((s.get("final") or {}).get("test_loss")),
                    "best_val_round": c.best.get("round", ""),
                    "best_global_val_accuracy": _blank(c.best.get(rundir.SELECTED_BY)),
                    "test_accuracy_at_best_val": _blank(c.best.get("test_accuracy")),
                    "client_val_mean": _blank(_client_mean(c)) if c.completed else "",
                    "client_val_worst10": _blank(_worst10(c.client_acc)) if c.completed else "",
                    "test_round_to_target": reached[0] if reached else "",
                    "rounds": s.get("rounds", ""),
                    "wall_s": s.get("wall_s", ""),
                    "error": s.get("error") or "",
                }
            )
    return path


def _alpha(part) -> Any:
    """The Dirichlet concentration the partition used, if any."""
    if part is None:
        return ""
    if part.kind in ("dirichlet", "quantity"):
        return part.concentration
    return _blank(part.alpha) if part.kind == "domains" else ""


def _blank(value: Any) -> Any:
    """A results.csv cell: empty for a value that was not measured (None or NaN)."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _ordered(values) -> list[str]:
    return list(dict.fromkeys(values))


def _final(cell: CellResult) -> float:
    return cell.final


def _client_mean(cell: CellResult) -> float:
    return float(np.mean(cell.client_acc)) if cell.client_acc else math.nan


def _groups(cells: list[CellResult], value) -> dict[tuple[str, str], dict[int, float]]:
    """(row, column) -> {seed: value} over the completed cells where ``value`` was measured."""
    groups: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for c in cells:
        if c.completed and c.config is not None and not math.isnan(value(c)):
            groups[(c.row, c.column)][c.config.seed] = value(c)
    return groups


def accuracy_table(cells: list[CellResult], value=_final, bold: bool = True) -> str:
    """Markdown: rows x columns of the mean over seeds of ``value`` (default: the final global
    test accuracy) with its 95% confidence interval (Student t; "n=1, no CI" for one seed),
    the best mean of each column in bold (with ``bold``). A diverged run has no accuracy: its
    cell says how many of its seeds diverged, and at which rounds, and is never bolded."""
    rows, cols = _ordered(c.row for c in cells), _ordered(c.column for c in cells)
    diverged: dict[tuple[str, str], list[str]] = defaultdict(list)
    for c in cells:
        if c.diverged:
            diverged[(c.row, c.column)].append(f"r{c.summary.get('diverged_round')}")
    return _table(rows, cols, _groups(cells, value), diverged, bold)


def _table(
    rows: list[str],
    cols: list[str],
    groups: dict[tuple[str, str], dict[int, float]],
    diverged: dict[tuple[str, str], list[str]],
    bold: bool = True,
) -> str:
    seeds = max((len(g) for g in groups.values()), default=0)
    intervals = {k: mean_ci(list(g.values())) for k, g in groups.items() if g}
    # a group with diverged seeds averages only the others: it is shown, never bolded as best;
    # nor is a mean over fewer than MIN_SEEDS_TO_BOLD seeds, nor a tie
    means = {
        k: i.mean for k, i in intervals.items() if k not in diverged and i.n >= MIN_SEEDS_TO_BOLD
    }
    best = {}
    for col in cols:
        in_col = [m for (r, c), m in means.items() if c == col]
        top = max(in_col, default=None)
        best[col] = top if in_col.count(top) == 1 else None
    lines = ["| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        cells_md = []
        for col in cols:
            interval = intervals.get((row, col))
            lost = diverged.get((row, col), [])
            note = f"diverged ({', '.join(lost)})" if lost else ""
            if interval is None:
                cells_md.append(note or "–")
                continue
            text = interval.text()
            if 1 < interval.n < MIN_SEEDS_TO_BOLD:
                text += f" (n={interval.n}: {FEW_SEEDS})"
            elif 1 < interval.n < seeds:
                text += f" (n={interval.n})"
            if bold and best[col] is not None and means.get((row, col)) == best[col]:
                text = f"**{text}**"
            cells_md.append(f"{text}; {len(lost)} {note}" if lost else text)
        lines.append(f"| {row} | " + " | ".join(cells_md) + " |")
    return "\n".join(lines)


MEAN_OVER_DOMAINS = "mean"
MIN_SEEDS_TO_BOLD = 3  # t_{0.975, 1} = 12.7: a two-seed interval is nearly meaningless
FEW_SEEDS = "too few seeds, wide interval"


def _domain_groups(cells: list[CellResult]) -> tuple[list[str], dict]:
    """The domain names (and "mean") and (row, domain) -> {seed: final accuracy}."""
    names: list[str] = []
    groups: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for c in cells:
        final = (c.summary.get("domains") or {}).get("test_accuracy") or {}
        if not (c.completed and c.config and final):
            continue
        names += [d for d in final if d not in names]
        for domain, acc in final.items():
            if acc is not None:
                groups[(c.row, domain)][c.config.seed] = acc
        measured = [a for a in final.values() if a is not None]
        if measured and len(measured) == len(final):  # a mean over every domain, or none
            groups[(c.row, MEAN_OVER_DOMAINS)][c.config.seed] = sum(measured) / len(measured)
    return ([*names, MEAN_OVER_DOMAINS] if names else []), groups


def domain_table(cells: list[CellResult]) -> str | None:
    """Markdown: rows x (each domain, their mean) of the final test accuracy of each domain's
    test images scored by the model a client of that domain uses, mean ± 95% CI over seeds;
    None when no run had domains."""
    cols, groups = _domain_groups(cells)
    if not cols:
        return None
    diverged: dict[tuple[str, str], list[str]] = defaultdict(list)
    for c in cells:  # as in the main table: its seeds are lost for every domain and the mean
        if c.diverged:
            for col in cols:
                diverged[(c.row, col)].append(f"r{c.summary.get('diverged_round')}")
    return _table(_ordered(c.row for c in cells), cols, groups, diverged)


def baseline_row(cells: list[CellResult], named: str | None = None) -> str | None:
    """The row of the paired comparisons' baseline: the study's ``baseline`` row if it names
    one, else BatchNorm under FedAvg (the first such row, when an on/off switch splits it)."""
    if named is not None:
        return named if any(c.row == named for c in cells) else None
    for c in cells:
        cfg = c.config
        if cfg and cfg.model.norm == "bn" and cfg.federation.strategy == "fedavg":
            return c.row
    return None


def paired_table(
    cells: list[CellResult], value=_final, domains: bool = False, baseline: str | None = None
) -> str | None:
    """Markdown: for each column (partition; with ``domains``, each domain and their mean) and
    each row, the mean over seeds of ``value`` minus the baseline's on the same seed and
    partition, its 95% CI and how many seeds it won; None without a baseline row."""
    base = baseline_row(cells, baseline)
    if base is None:
        return None
    rows = [r for r in _ordered(c.row for c in cells) if r != base]
    if domains:
        cols, groups = _domain_groups(cells)
    else:
        cols, groups = _ordered(c.column for c in cells), _groups(cells, value)
    lost: dict[tuple[str, str], int] = defaultdict(int)
    for c in cells:  # seeds that diverged have no value: left out of the pairs, and said so
        if c.diverged:
            for col in cols if domains else [c.column]:
                lost[(c.row, col)] += 1
    lines = ["| minus " + base + " | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for row in rows:
        entries = []
        for col in cols:
            result = paired(groups.get((row, col), {}), groups.get((base, col), {}))
            text = result.text() if result else "–"
            if result and 1 < result.interval.n < MIN_SEEDS_TO_BOLD:
                text += f" ({FEW_SEEDS})"
            gone = lost[(row, col)] + lost[(base, col)]
            entries.append(f"{text} ({gone} diverged seed(s) left out)" if gone else text)
        lines.append(f"| {row} | " + " | ".join(entries) + " |")
    return "\n".join(lines)


# The "Why" section: (quantity, which summary value, what the table shows); the quantities
# are app.learn.diagnostics'.
# each "Why" quantity's figure panel: a title in words and the y-axis label
WHY_PANELS = {
    "update_cosine": ("Update agreement", "mean pairwise cosine (mean over rounds)"),
    "drift_spread": ("Client disagreement", "spread around the mean (mean over rounds)"),
    "bn_divergence": ("BN statistics: clients vs aggregate", "symmetric KL (mean over rounds)"),
    "bn_test_gap": ("BN statistics: train vs test", "symmetric KL, final model"),
}
RECALIBRATED = "bn_test_gap_recalibrated"
WHY = (
    (
        "update_cosine",
        "mean",
        "Update agreement: mean pairwise cosine of the client updates, "
        "mean over rounds (1: clients pull the same way).",
    ),
    (
        "drift_spread",
        "mean",
        "Client disagreement: mean ‖w_k - mean_j w_j‖ / ‖w_prev‖, mean over rounds.",
    ),
    (
        "bn_divergence",
        "mean",
        "BN-statistics divergence: symmetric KL between each client's BN "
        "running statistics and the aggregated ones, mean over channels, clients, layers and "
        "rounds (only where BN statistics travel).",
    ),
    (
        "bn_test_gap",
        "final",
        "Train/test statistics gap of the final global model: symmetric KL "
        "between its BN running statistics and the batch statistics of the test data, mean over "
        "layers (before any recalibration).",
    ),
)


def _diagnostic(quantity: str, which: str):
    def value(cell: CellResult) -> float:
        entry = (cell.summary.get("diagnostics") or {}).get(quantity) or {}
        return float(entry.get(which, math.nan))

    return value


def why_section(out: Path, cells: list[CellResult], figures: Path) -> list[str]:
    """Markdown of the diagnostics next to the accuracy table, and a figure of each against
    heterogeneity; empty when no cell recorded diagnostics."""
    done = [c for c in cells if c.completed and c.summary.get("diagnostics")]
    if not done:
        return []
    cols = _ordered(c.column for c in cells)
    md = [
        "## Why: what the federation did to the models",
        "",
        "Per-run diagnostics (`diagnostics.csv` in each run; `fedws diagnose RUN_DIR` plots "
        "them). Strong label skew shows as low update agreement, high client disagreement "
        "and, for BatchNorm, diverging client statistics and a global model whose running "
        "statistics do not match what the test data produce.",
        "",
    ]
    panels: dict[str, dict[str, list[tuple[float, float]]]] = {}
    ylabels: dict[str, str] = {}

    def series_of(value, suffix: str = "") -> dict[str, list[tuple[float, float]]]:
        series: dict[str, list[tuple[float, float]]] = {}
        for row in _ordered(c.row for c in done):
            for i, col in enumerate(cols):
                values = [value(c) for c in done if c.row == row and c.column == col]
                values = [v for v in values if not math.isnan(v)]
                if values:
                    series.setdefault(row + suffix, []).append((i, float(np.mean(values))))
        return series

    for quantity, which, text in WHY:
        value = _diagnostic(quantity, which)
        if all(math.isnan(value(c)) for c in done):
            continue
        md += [f"{text}", "", accuracy_table(done, value, bold=False), ""]
        title, ylabel = WHY_PANELS[quantity]
        panels[title] = series_of(value)
        if quantity == "bn_test_gap":  # and after server-side recalibration, where it ran
            panels[title] |= series_of(_diagnostic(RECALIBRATED, which), " (recalibrated)")
        ylabels[title] = ylabel
    if panels:
        log_y = tuple(t for t in panels if t.startswith("BN "))
        png = plots.line_panels(
            panels,
            figures / "why_vs_heterogeneity.png",
            "partition",
            log_y,
            categories=cols,
            ylabels=ylabels,
            max_cols=2,
        )
        md += [f"![diagnostics vs heterogeneity]({png.relative_to(out)})", ""]
    links = []
    for c in done:
        run = StudyDir(out).run(c.id)
        if run.diagnostics.is_file():
            seed = f", seed {c.config.seed}" if c.config else ""
            report = write_diagnostics(run.path).relative_to(out)
            links.append(f"[{c.row}, {c.column}{seed}]({report})")
    if links:
        md += ["Per run: " + " · ".join(links), ""]
    return md


def settings_line(cells: list[CellResult], axes: list[str]) -> str:
    cfg = next((c.config for c in cells if c.config), None)
    if cfg is None:
        return ""
    seeds = len({c.config.seed for c in cells if c.config})
    d, p = cfg.data, cfg.data.partition
    parts = [
        f"dataset {d.dataset}"
        + (" (SYNTHETIC)" if d.dataset == "synthetic" else "")
        + (f" ({Path(d.root).name})" if d.dataset == "imagefolder" and d.root else ""),
        f"{d.train_samples or 'all'} training samples",
        f"{p.num_clients} clients",
        f"{cfg.federation.rounds} rounds",
        f"{cfg.model.arch} (width {cfg.model.width or 'default'})",
        f"{cfg.train.local_epochs} local epoch(s), batch {cfg.train.batch_size}",
        f"{cfg.optim.name} lr {cfg.optim.lr}",
        f"{seeds} seed(s)",
    ]
    return "Settings: " + ", ".join(parts) + f". Varied: {', '.join(axes)}."


def _partition_counts(cells: list[CellResult]) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """Label counts (clients x classes) of each column's partition, from the data itself."""
    first: dict[str, CellResult] = {}
    for c in cells:
        if c.config is not None:
            first.setdefault(c.column, c)
    views = partition_views([c.config.data for c in first.values()])
    return {col: (v.counts, v.dataset.classes) for col, v in zip(first, views, strict=True)}


CI_NOTE = (
    "Mean over seeds ± the half-width of its 95% confidence interval (Student t; "
    '"n=1, no CI" for a single seed; fewer than 3 seeds: marked, never bolded).'
)


def _seed_list(seeds: list[int]) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def interval_coverage(cells: list[CellResult]) -> str:
    """In words, what the seeds of the study varied, so what its intervals cover."""
    configs = [c.config for c in cells if c.config is not None]
    if not configs:
        return ""
    seeds = sorted({c.seed for c in configs})
    data_seeds = sorted({c.data.partition.seed for c in configs})
    listed = f"seed{'s' if len(seeds) > 1 else ''} {_seed_list(seeds)}"
    if all(c.data.partition.seed == c.seed for c in configs):
        return (
            f"Intervals over {listed}: each seed draws the partition (and every other draw "
            "from the data), the initialisation and the batch order."
        )
    if len(data_seeds) == 1:
        return (
            f"Intervals over {listed} with the partition pinned to seed {data_seeds[0]} "
            "(data.partition.seed): training noise only (initialisation and batch order), "
            "one draw of the data."
        )
    return (
        f"Intervals over {listed}; the data draws used seeds {_seed_list(data_seeds)} "
        "(data.partition.seed set per cell): see each run's config.yaml for what varied."
    )


def global_cells(cells: list[CellResult]) -> list[CellResult]:
    """The cells whose server model is a global model: FedBN's on a BN model is not (its BN
    layers never train), so it has no place in a global-accuracy table."""
    return [c for c in cells if not (c.config and c.config.server_model_untrained)]


def _paired_section(
    cells: list[CellResult], value, what: str, domains: bool = False, baseline: str | None = None
) -> list[str]:
    table = paired_table(cells, value, domains, baseline)
    if table is None:
        if baseline is not None:
            rows = ", ".join(f"`{r}`" for r in _ordered(c.row for c in cells))
            return [
                f"(No paired comparison: the study's baseline `{baseline}` names no row; "
                f"the rows are {rows}.)",
                "",
            ]
        return []
    base = baseline_row(cells, baseline)
    return [
        f"Paired differences of the {what} against `{base}` on the same seed and partition: "
        "mean difference ± 95% CI half-width (Student t over the seeds), and on how many seeds "
        "the row beat the baseline.",
        "",
        table,
        "",
    ]


def write_report(out: Path) -> Path:
    """Write ``results.csv``, ``report.md`` and the PNGs under ``out/figures``."""
    study = StudyDir(out)
    meta, cells = load_results(out)
    target = meta.get("target_accuracy")
    write_results_csv(out, cells, target)
    figures = study.figures
    figures.mkdir(exist_ok=True)
    done = [c for c in cells if c.completed]
    failed = [c for c in cells if c.status == rundir.FAILED]
    diverged = [c for c in cells if c.diverged]
    pending = [c for c in cells if c.status not in (*rundir.FINISHED, rundir.FAILED)]
    cols = _ordered(c.column for c in cells)
    glob = global_cells(cells)
    left_out = _ordered(c.row for c in cells if c not in glob)
    untrained_note = (
        f" Left out of this table and its paired differences: {', '.join(left_out)} (the "
        "server's model keeps BatchNorm layers that never trained, so it is not the method's "
        "model; see the client accuracy below)."
        if left_out
        else ""
    )

    md = [
        "# fedws study report",
        "",
        f"Study `{meta.get('source')}`; {len(done)} of {len(cells)} cells completed"
        + (f", {len(diverged)} diverged" if diverged else "")
        + (f", {len(failed)} failed" if failed else "")
        + (f", {len(pending)} not run" if pending else "")
        + f". Written {dt.datetime.now().isoformat(timespec='seconds')} by `fedws report`.",
        "",
        "## Final global test accuracy",
        "",
        settings_line(cells, meta["axes"])
        + " "
        + CI_NOTE
        + " Best mean per column in bold. "
        + interval_coverage(cells)
        + untrained_note,
        "",
        accuracy_table(glob),
        "",
    ]
    base = meta.get("baseline")
    md += _paired_section(glob, _final, "final global test accuracy", baseline=base)
    md += [
        "## Mean client accuracy",
        "",
        "The final global model on each client's own validation split (under FedBN with the "
        "client's local BatchNorm layers): the personalised view, mean over clients, then over "
        "seeds (" + CI_NOTE + ") FedBN keeps BN layers on the clients, so its global test "
        "accuracy above measures a model with untrained BN layers; this table is its fair "
        "comparison.",
        "",
        accuracy_table(cells, _client_mean),
        "",
    ]
    md += _paired_section(cells, _client_mean, "mean client accuracy", baseline=base)
    for col in cols:  # a per-domain table for each partition with domains
        in_col = [c for c in cells if c.column == col]
        per_domain = domain_table(in_col)
        if per_domain is None:
            continue
        md += [
            "## Per-domain test accuracy" + (f" ({col})" if len(cols) > 1 else ""),
            "",
            "Each domain's test images (in the domain's style, or its own folder), scored by "
            "the model a client of that domain uses: the global model, or under FedBN the "
            "global weights with that client's own BN layers (mean over the domain's "
            "clients); final round, then " + CI_NOTE[0].lower() + CI_NOTE[1:] + " The mean "
            "is over every domain (a run missing one has none).",
            "",
            per_domain,
            "",
        ]
        md += _paired_section(in_col, None, "per-domain accuracy", True, base)
    md += why_section(out, cells, figures)
    if done:
        fedbn = {c.row for c in done if c.config and c.config.server_model_untrained}
        curves = plots.accuracy_curves(
            {col: [(c.row, c.curve) for c in done if c.column == col] for col in cols},
            figures / "accuracy_vs_round.png",
            unreliable=fedbn,
        )
        md += ["## Accuracy vs round", "", f"![accuracy vs round]({curves.relative_to(out)})", ""]
        alpha_points = [
            (c.row, c.config.data.partition.concentration, c.final)
            for c in global_cells(done)
            if c.config and c.config.data.partition.kind == "dirichlet"
        ]
        if len({a for _, a, _ in alpha_points}) >= 2:
            png = plots.accuracy_vs_alpha(alpha_points, figures / "accuracy_vs_alpha.png")
            md += [
                "## Accuracy vs heterogeneity",
                "",
                "Final global accuracy against the Dirichlet concentration (smaller = more skew).",
                "",
                f"![accuracy vs alpha]({png.relative_to(out)})",
                "",
            ]
    try:
        counts = _partition_counts(cells)
    except Exception as err:  # the data may be gone when a report is rebuilt elsewhere
        counts = {}
        md += [f"(Label distributions skipped: {err})", ""]
    if counts:
        md += ["## Label distributions", ""]
        for i, (col, (matrix, classes)) in enumerate(counts.items()):
            png = plots.label_heatmap(matrix, classes, figures / f"labels_{i}.png", col)
            entropy = float(label_entropy(matrix).mean())
            md += [
                f"{col}: mean label entropy {entropy:.3f} bits",
                "",
                f"![{col}]({png.relative_to(out)})",
                "",
            ]
    if done:
        if counts:
            strongest = min(counts, key=lambda col: float(label_entropy(counts[col][0]).mean()))
        else:
            strongest = min(
                cols, key=lambda col: np.mean([c.final for c in done if c.column == col] or [1])
            )
        spread = {
            row: [a for c in done if c.column == strongest and c.row == row for a in c.client_acc]
            for row in _ordered(c.row for c in done)
        }
        spread = {k: v for k, v in spread.items() if v}
        if spread:
            png = plots.client_spread(spread, figures / "client_spread.png", strongest)
            md += [
                f"## Per-client accuracy under the strongest skew ({strongest})",
                "",
                "The final global model on each client's local validation split, all seeds pooled.",
                "",
                f"![client spread]({png.relative_to(out)})",
                "",
            ]
    if failed:
        md += (
            ["## Failed cells", ""]
            + [f"- `{c.id}`: {c.summary.get('error')}" for c in failed]
            + [""]
        )
    study.report.write_text("\n".join(md))
    return study.report
