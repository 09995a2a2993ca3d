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
from app.errors import FedwsError
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
    # The bold entry is the highest mean shown in its column, as printed (4 decimals), and only
    # if no other entry shows the same, it rests on >= MIN_SEEDS_TO_BOLD seeds and lost none
    # to divergence; otherwise the column has no bold entry (a lower mean is never bolded).
    shown = {k: round(i.mean, 4) for k, i in intervals.items()}
    means = {
        k: shown[k] for k, i in intervals.items() if k not in diverged and i.n >= MIN_SEEDS_TO_BOLD
    }
    best = {}
    for col in cols:
        in_col = [m for (r, c), m in shown.items() if c == col]
        top = max(in_col, default=None)
        eligible = any(m == top for (r, c), m in means.items() if c == col)
        best[col] = top if eligible and in_col.count(top) == 1 else None
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


@dataclass(frozen=True)
class WhyQuantity:
    """A diagnostics quantity of the "Why" section (``app.learn.diagnostics``): which summary
    value is shown, what its table says, and its figure panel's title and y-axis label."""

    name: str
    which: str  # "mean" over rounds, or the "final" round's
    text: str
    title: str
    ylabel: str
    log: bool = False


WHY = (
    WhyQuantity(
        "update_cosine",
        "mean",
        "Update agreement: mean pairwise cosine of the client updates, "
        "mean over rounds (1: clients pull the same way).",
        "Update agreement",
        "mean cosine of client updates",
    ),
    WhyQuantity(
        "drift_spread",
        "mean",
        "Client disagreement: mean ‖w_k - mean_j w_j‖ / ‖w_prev‖, mean over rounds.",
        "Client disagreement",
        "distance of clients from their mean",
    ),
    WhyQuantity(
        "bn_divergence",
        "mean",
        "BN-statistics divergence: symmetric KL between each client's BN "
        "running statistics and the aggregated ones, mean over channels, clients, layers and "
        "rounds (only where BN statistics travel).",
        "BN statistics: clients vs aggregate",
        "divergence of client BN statistics",
        log=True,
    ),
    WhyQuantity(
        "bn_test_gap",
        "final",
        "Train/test statistics gap of the final global model: symmetric KL "
        "between its BN running statistics and the batch statistics of the test data, mean over "
        "layers (before any recalibration).",
        "BN statistics: train vs test",
        "gap between BN and test statistics",
        log=True,
    ),
)
RECALIBRATED = "bn_test_gap_recalibrated"


def _diagnostic(quantity: str, which: str):
    def value(cell: CellResult) -> float:
        entry = (cell.summary.get("diagnostics") or {}).get(quantity) or {}
        return float(entry.get(which, math.nan))

    return value


def _seed_values(cells: list[CellResult], value, suffix: str = "") -> plots.Groups:
    """Series (row label + ``suffix``) -> category (partition) -> the seeds' values."""
    groups: plots.Groups = {}
    for c in cells:
        v = value(c)
        if not math.isnan(v):
            groups.setdefault(c.row + suffix, {}).setdefault(c.column, []).append(v)
    return groups


def why_section(cells: list[CellResult], figures: Path, out: Path, links: list[str]) -> list[str]:
    """Markdown of the diagnostics next to the accuracy table and a figure of each against the
    partitions (points with their seeds' interval); ``links`` to each run's diagnostics.md
    (written by the caller). Empty when no cell recorded diagnostics."""
    done = [c for c in cells if c.completed and c.summary.get("diagnostics")]
    if not done:
        return []
    md = [
        "## Why: what the federation did to the models",
        "",
        "Per-run diagnostics (`diagnostics.csv` in each run; `fedws diagnose RUN_DIR` plots "
        "them). Strong label skew shows as low update agreement, high client disagreement "
        "and, for BatchNorm, diverging client statistics and a global model whose running "
        "statistics do not match what the test data produce.",
        "",
    ]
    panels: dict[str, plots.Groups] = {}
    for q in WHY:
        value = _diagnostic(q.name, q.which)
        if all(math.isnan(value(c)) for c in done):
            continue
        md += [q.text, "", accuracy_table(done, value, bold=False), ""]
        panels[q.title] = _seed_values(done, value)
        if q.name == "bn_test_gap":  # and after server-side recalibration, where it ran
            panels[q.title] |= _seed_values(
                done, _diagnostic(RECALIBRATED, q.which), ", recalibrated"
            )
    if panels:
        png = plots.category_panels(
            panels,
            figures / "why_vs_heterogeneity.png",
            categories=_ordered(c.column for c in cells),
            xlabel="partition",
            ylabels={q.title: q.ylabel for q in WHY},
            log_y=tuple(q.title for q in WHY if q.log),
        )
        md += [f"![diagnostics vs heterogeneity]({png.relative_to(out)})", ""]
    if links:
        md += ["Per run: " + " · ".join(links), ""]
    return md


def write_run_diagnostics(out: Path, cells: list[CellResult]) -> list[str]:
    """Each run's ``diagnostics.md`` (``fedws diagnose``), as links naming row, column and seed."""
    links = []
    for c in cells:
        run = StudyDir(out).run(c.id)
        if c.completed and run.diagnostics.is_file():
            seed = f", seed {c.config.seed}" if c.config else ""
            report = write_diagnostics(run.path).relative_to(out)
            links.append(f"[{c.row}, {c.column}{seed}]({report})")
    return links


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
    training = ["the initialisation", "the batch order"]
    if any(c.federation.fraction_train < 1 or c.federation.fraction_evaluate < 1 for c in configs):
        training.append("which clients take part each round")
    if all(c.data.partition.seed == c.seed for c in configs):
        natural = any(c.data.partition.kind == "natural" for c in configs)
        drawn = (
            ["each client's train/val split (the clients are fixed by the data's column)"]
            if natural
            else ["the partition"]
        )
        if any(c.data.train_samples for c in configs):
            drawn.append("the training subset")
        if any(c.data.test_samples for c in configs):
            drawn.append("the test subset")
        return f"Intervals over {listed}: each seed draws " + _words(drawn + training) + "."
    if len(data_seeds) == 1:
        return (
            f"Intervals over {listed} with the data draws pinned to seed {data_seeds[0]} "
            f"(data.partition.seed): training noise only ({_words(training)}), one draw of the "
            "data."
        )
    return (
        f"Intervals over {listed}; the data draws used seeds {_seed_list(data_seeds)} "
        "(data.partition.seed set per cell): see each run's config.yaml for what varied."
    )


def _words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


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
    """Write ``results.csv``, ``report.md`` and the PNGs under ``out/figures``: each section
    built by its own function; files are written here and by the figure functions only."""
    study = StudyDir(out)
    meta, cells = load_results(out)
    write_results_csv(out, cells, meta.get("target_accuracy"))
    figures = study.figures
    figures.mkdir(exist_ok=True)
    base = meta.get("baseline")
    counts, skipped = _label_counts_or_reason(cells)
    md = _header(meta, cells)
    md += _global_section(cells, meta["axes"], base)
    md += _client_section(cells, base)
    md += _domain_sections(cells, base)
    md += why_section(cells, figures, out, write_run_diagnostics(out, cells))
    md += _curve_sections(cells, figures, out)
    md += _label_section(counts, skipped, figures, out)
    md += _spread_section(cells, counts, figures, out)
    md += _failed_section(cells)
    study.report.write_text("\n".join(md))
    return study.report


def _header(meta: dict[str, Any], cells: list[CellResult]) -> list[str]:
    done = [c for c in cells if c.completed]
    failed = [c for c in cells if c.status == rundir.FAILED]
    diverged = [c for c in cells if c.diverged]
    pending = [c for c in cells if c.status not in (*rundir.FINISHED, rundir.FAILED)]
    return [
        "# fedws study report",
        "",
        f"Study `{meta.get('source')}`; {len(done)} of {len(cells)} cells completed"
        + (f", {len(diverged)} diverged" if diverged else "")
        + (f", {len(failed)} failed" if failed else "")
        + (f", {len(pending)} not run" if pending else "")
        + f". Written {dt.datetime.now().isoformat(timespec='seconds')} by `fedws report`.",
        "",
    ]


def _global_section(cells: list[CellResult], axes: list[str], base: str | None) -> list[str]:
    """The final global test accuracy and its paired differences, global models only."""
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
        "## Final global test accuracy",
        "",
        settings_line(cells, axes)
        + " "
        + CI_NOTE
        + " Best mean per column in bold. "
        + interval_coverage(cells)
        + untrained_note,
        "",
        accuracy_table(glob),
        "",
    ]
    return md + _paired_section(glob, _final, "final global test accuracy", baseline=base)


def _client_section(cells: list[CellResult], base: str | None) -> list[str]:
    md = [
        "## Mean client accuracy",
        "",
        "The final global model on each client's own validation split (under FedBN with the "
        "client's local BatchNorm layers): the personalised view, mean over clients, then over "
        "seeds (" + CI_NOTE + ") FedBN keeps BN layers on the clients, so its global test "
        "accuracy is not a measure of it; this table is its fair comparison. "
        + interval_coverage(cells),
        "",
        accuracy_table(cells, _client_mean),
        "",
    ]
    return md + _paired_section(cells, _client_mean, "mean client accuracy", baseline=base)


def _domain_sections(cells: list[CellResult], base: str | None) -> list[str]:
    """A per-domain table for each partition with domains."""
    cols = _ordered(c.column for c in cells)
    md: list[str] = []
    for col in cols:
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
    return md


def _curve_sections(cells: list[CellResult], figures: Path, out: Path) -> list[str]:
    """Accuracy against the round per partition, and against the Dirichlet alpha."""
    done = [c for c in cells if c.completed]
    if not done:
        return []
    cols = _ordered(c.column for c in cells)
    fedbn = {c.row for c in done if c.config and c.config.server_model_untrained}
    curves = plots.accuracy_curves(
        {col: [(c.row, c.curve) for c in done if c.column == col] for col in cols},
        figures / "accuracy_vs_round.png",
        unreliable=fedbn,
    )
    md = ["## Accuracy vs round", "", f"![accuracy vs round]({curves.relative_to(out)})", ""]
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
    return md


LabelCounts = dict[str, tuple[np.ndarray, tuple[str, ...]]]


def _label_counts_or_reason(cells: list[CellResult]) -> tuple[LabelCounts, str | None]:
    """Each partition's label counts, or why they could not be read (the data may be gone
    when a report is rebuilt on another machine): a missing or unusable dataset, nothing else."""
    try:
        return _partition_counts(cells), None
    except (FedwsError, OSError) as err:
        return {}, str(err)


def _label_section(counts: LabelCounts, skipped: str | None, figures: Path, out: Path) -> list[str]:
    if skipped is not None:
        return [f"(Label distributions skipped: {skipped})", ""]
    if not counts:
        return []
    md = ["## Label distributions", ""]
    for i, (col, (matrix, classes)) in enumerate(counts.items()):
        png = plots.label_heatmap(matrix, classes, figures / f"labels_{i}.png", col)
        entropy = float(label_entropy(matrix).mean())
        md += [
            f"{col}: mean label entropy {entropy:.3f} bits",
            "",
            f"![{col}]({png.relative_to(out)})",
            "",
        ]
    return md


def _spread_section(
    cells: list[CellResult], counts: LabelCounts, figures: Path, out: Path
) -> list[str]:
    """Per-client accuracy under the strongest skew (the lowest mean label entropy, else the
    lowest accuracy)."""
    done = [c for c in cells if c.completed]
    if not done:
        return []
    cols = _ordered(c.column for c in cells)
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
    if not spread:
        return []
    png = plots.client_spread(spread, figures / "client_spread.png", strongest)
    return [
        f"## Per-client accuracy under the strongest skew ({strongest})",
        "",
        "The final global model on each client's local validation split, all seeds pooled.",
        "",
        f"![client spread]({png.relative_to(out)})",
        "",
    ]


def _failed_section(cells: list[CellResult]) -> list[str]:
    failed = [c for c in cells if c.status == rundir.FAILED]
    if not failed:
        return []
    return (
        ["## Failed cells", ""] + [f"- `{c.id}`: {c.summary.get('error')}" for c in failed] + [""]
    )
