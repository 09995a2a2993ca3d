"""``fedws compare RUN_DIR... [-o OUT]``: any runs side by side, from their run directories.

A table of each run's final global test accuracy, the round chosen on validation data with the
test accuracy at it, wall time and status, next to the config keys whose values differ between
the runs (only those); one figure of global test accuracy per round. Writes ``OUT/compare.md``,
``OUT/compare.csv`` and ``OUT/accuracy_vs_round.png``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import rundir
from app.config import Config
from app.errors import ConfigError
from app.rundir import RunDir
from app.tools import plots

COMPARE_MD, COMPARE_CSV, FIGURE = "compare.md", "compare.csv", "accuracy_vs_round.png"


@dataclass(frozen=True)
class Compared:
    name: str
    config: Config
    summary: dict[str, Any]
    curve: list[tuple[int, float]]

    @property
    def server_model_meaningless(self) -> bool:
        """FedBN's server keeps untrained BN layers: its test curve is not the method's."""
        return self.config.server_model_untrained


def _names(runs: list[Path]) -> list[str]:
    """Each run's folder name, with as many parent folders as it takes to tell them apart."""
    parts = [r.resolve().parts for r in runs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise ConfigError(" ".join(map(str, runs)), "the same run directory is given twice")


def load(runs: list[Path]) -> list[Compared]:
    out = []
    for name, path in zip(_names(runs), runs, strict=True):
        run = RunDir(path)
        if not run.config.is_file():
            raise ConfigError(
                str(path), "not a run directory (no config.yaml): give fedws run's -o"
            )
        summary = rundir.read_summary(run) or {"status": rundir.PENDING}
        curve = rundir.metric_curve(run, "test_accuracy")
        out.append(Compared(name, rundir.read_config(run.config), summary, curve))
    return out


def differing_keys(runs: list[Compared]) -> list[str]:
    """The dotted config keys whose values are not the same in every run."""
    flats = [r.config.flat() for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def table(runs: list[Compared]) -> tuple[list[str], list[list[str]]]:
    keys = differing_keys(runs)
    header = [
        "run",
        "status",
        "final_test_accuracy",
        "best_val_round",
        "test_accuracy_at_best_val",
        "wall_s",
        *keys,
    ]
    rows = []
    for r in runs:
        final, best = r.summary.get("final") or {}, r.summary.get("best") or {}
        flat = r.config.flat()
        rows.append(
            [
                r.name,
                str(r.summary.get("status")),
                _fmt(final.get("test_accuracy")),
                _fmt(best.get("round")),
                _fmt(best.get("test_accuracy")),
                _fmt(r.summary.get("wall_s")),
                *(str(flat.get(k)) for k in keys),
            ]
        )
    return header, rows


def write(runs: list[Compared], out: Path) -> tuple[Path, Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table(runs)
    with open(out / COMPARE_CSV, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    png = plots.accuracy_curves(
        {"global test accuracy": [(r.name, r.curve) for r in runs if r.curve]},
        out / FIGURE,
        unreliable={r.name for r in runs if r.server_model_meaningless},
    )
    md = [
        "# fedws compare",
        "",
        "Final global test accuracy, the round chosen on validation data and the test accuracy "
        "at it, wall time; then the config keys whose values differ between the runs.",
        "",
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"![global test accuracy per round]({png.name})",
        "",
    ]
    (out / COMPARE_MD).write_text("\n".join(md))
    return out / COMPARE_MD, out / COMPARE_CSV, png
