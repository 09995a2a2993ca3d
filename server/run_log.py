"""Writes the run directory (names and columns: ``app.rundir``) as the run goes:

- ``config.yaml``: the resolved config;
- ``metrics.csv``: a row per round (round 0 = the initial model), through Lightning's CSVLogger;
  a TensorBoardLogger under ``tensorboard/`` as well with ``tensorboard`` in ``logging.loggers``;
- ``clients.csv``: a row per client per round;
- ``diagnostics.csv``: a row per round, quantity and layer (``app.learn.diagnostics``; ``all``
  for the whole model or the mean over layers);
- ``summary.json``: final and best metrics, timings, versions.

The checkpoints are the evaluator's (``server.evaluation``).
"""

from __future__ import annotations

import csv
import functools
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Any

from app import rundir
from app.config import Config, dump_config
from app.learn.diagnostics import summarise
from app.rundir import CLIENT_COLUMNS, DIAGNOSTIC_COLUMNS, DOMAIN_COLUMNS, METRIC_COLUMNS, RunDir
from server.tracking import finish_trackers, flat_config, log_artifact, log_final, tracked_metrics
from server.tracking import make_loggers as tracking_loggers
from server.tracking import state as tracking_state


def versions() -> dict[str, str]:
    import flwr
    import lightning
    import torch
    import torchmetrics

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "flwr": flwr.__version__,
    }


def _writes(method):
    """``method`` writes the run directory: an ``OSError`` there (a full disk, a path through
    a file) becomes one line naming the file (``rundir.WriteError``, exit code 2) instead of a
    traceback from deep inside the run."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as err:
            raise rundir.WriteError(self.run.path, err) from None

    return wrapper


class RunLog:
    """Writes the run directory. ``resume_round=k`` keeps the rows of rounds <= k of an
    interrupted run (and drops any later, half-written ones)."""

    @_writes
    def __init__(
        self,
        cfg: Config,
        out: Path,
        synthetic: bool,
        resume_round: int | None = None,
        elapsed_s: float = 0.0,
        domains: bool = False,
        tracking: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.run, self.synthetic = cfg, RunDir(out), synthetic
        out.mkdir(parents=True, exist_ok=True)
        self.clients_path = self.run.clients
        self.diagnostics_path = self.run.diagnostics
        kept, kept_clients, self.diagnostics = [], [], []
        if resume_round is not None:
            kept = rundir.rows_until(self.run.metrics, resume_round)
            kept_clients = rundir.rows_until(self.clients_path, resume_round)
            self.diagnostics = rundir.rows_until(self.diagnostics_path, resume_round)
        self.domains = domains
        self.domain_rows = []
        if domains and resume_round is not None:
            self.domain_rows = rundir.rows_until(self.run.domains, resume_round)
        self.loggers = tracking_loggers(cfg, out, tracking if resume_round is not None else None)
        with warnings.catch_warnings():  # an old run's files in OUT are replaced on purpose
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            for logger in self.loggers:
                logger.experiment  # noqa: B018 - creates the writers, clears an old metrics.csv
        self.trackers = self.loggers[1:]
        if resume_round is None:
            for logger in self.trackers:
                logger.log_hyperparams(flat_config(cfg))
        # whole or not at all: a resumed run rewrites the kept rows of the old files
        rundir.write_whole(self.run.config, dump_config(cfg))
        with rundir.replacing(self.clients_path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CLIENT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept_clients)
        self.kept_clients = kept_clients
        with rundir.replacing(self.diagnostics_path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=DIAGNOSTIC_COLUMNS)
            writer.writeheader()
            writer.writerows(self.diagnostics)
        if domains:
            with rundir.replacing(self.run.domains, newline="") as f:
                writer = csv.DictWriter(f, fieldnames=DOMAIN_COLUMNS)
                writer.writeheader()
                writer.writerows(self.domain_rows)
        self.rows = [{k: rundir.cell_number(r.get(k) or "0") for k in METRIC_COLUMNS} for r in kept]
        csv_logger = self.loggers[0]
        for row in self.rows:
            csv_logger.log_metrics(row, step=int(row["round"]))
        csv_logger.save()
        self.start = time.time() - elapsed_s

    def trained_clients(self) -> set[int]:
        """The clients that trained in the rounds kept from an interrupted run."""
        return {int(r["client"]) for r in self.kept_clients if r.get("num_examples")}

    @property
    def elapsed_s(self) -> float:
        return time.time() - self.start

    @_writes
    def log_round(
        self,
        row: dict[str, float],
        clients: list[dict[str, Any]],
        diagnosed: list[dict[str, Any]] = (),
        domain_rows: list[dict[str, Any]] = (),
    ) -> None:
        self.rows.append(row)
        tracked = tracked_metrics(row, list(diagnosed), list(domain_rows))
        for logger in self.trackers:
            logger.log_metrics(tracked, step=int(row["round"]))
        if domain_rows:
            self.domain_rows += domain_rows
            with open(self.run.domains, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=DOMAIN_COLUMNS).writerows(domain_rows)
        self.diagnostics += diagnosed
        with open(self.diagnostics_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=DIAGNOSTIC_COLUMNS).writerows(diagnosed)
        csv_logger = self.loggers[0]
        csv_logger.log_metrics({k: row[k] for k in METRIC_COLUMNS}, step=int(row["round"]))
        for logger in self.loggers:
            logger.save()
        with open(self.clients_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CLIENT_COLUMNS, restval="")
            writer.writerows({k: rundir.csv_value(v) for k, v in c.items()} for c in clients)

    def best(self) -> dict[str, float] | None:
        """The round chosen on validation data, never on the test split: the highest
        ``global_val_accuracy`` (the global model on the clients' validation splits, weighted
        by their size) among the rounds whose test accuracy was measured; the earliest on a
        tie. None without validation data (``data.val_fraction: 0``)."""
        candidates = [
            r
            for r in self.rows
            if math.isfinite(r[rundir.SELECTED_BY]) and math.isfinite(r["test_accuracy"])
        ]
        return max(candidates, key=lambda r: r[rundir.SELECTED_BY]) if candidates else None

    @_writes
    def finish(
        self,
        status: str = rundir.COMPLETED,
        error: str | None = None,
        diverged_round: int | None = None,
    ) -> dict[str, Any]:
        """Write ``summary.json``: ``final`` is the last round whose test accuracy was measured
        (the headline), ``best`` the round ``best()`` chose, with the test accuracy at it."""
        last = next((r for r in reversed(self.rows) if not math.isnan(r["test_accuracy"])), None)
        if diverged_round is not None:  # a diverged run has no final model
            last = None
        log_final(self.trackers, last)
        for logger in self.loggers:
            logger.finalize(status="success" if status in rundir.FINISHED else "failed")
        finish_trackers(self.loggers)
        best = _pick(self.best())
        if best is not None:
            best = {**best, rundir.SELECTED_BY: self.best()[rundir.SELECTED_BY]}
            best["selected_by"] = rundir.SELECTED_BY
        trained = [r for r in self.rows if r["round"] > 0]
        summary = {
            "status": status,
            "error": error,
            "diverged_round": diverged_round,
            "rounds": int(self.rows[-1]["round"]) if self.rows else 0,
            "final": _pick(last),
            "best": best,
            "wall_s": round(time.time() - self.start, 3),
            "mean_round_s": (
                round(sum(r["round_s"] for r in trained) / len(trained), 3) if trained else None
            ),
            "seed": self.cfg.seed,
            "partition_seed": self.cfg.data.partition.seed,
            "dataset": self.cfg.data.dataset,
            "synthetic_data": self.synthetic,
            "model": {"arch": self.cfg.model.arch, "norm": self.cfg.model.norm},
            "strategy": self.cfg.federation.strategy,
            "diagnostics": summarise(self.diagnostics),
            "domains": _final_domains(self.domain_rows) if self.domains else None,
            "tracking": self.tracking_state() or None,
            "versions": versions(),
            "results_version": rundir.RESULTS_VERSION,
        }
        rundir.write_summary(self.run, summary)
        log_artifact(self.loggers, self.run.summary)
        return summary

    def tracking_state(self) -> dict[str, Any]:
        """Where the trackers keep this run (for ``--resume`` and for ``summary.json``)."""
        return tracking_state(self.loggers)


def _pick(row: dict[str, float] | None) -> dict[str, float] | None:
    if row is None:
        return None
    return {
        "round": int(row["round"]),
        "test_accuracy": row["test_accuracy"],
        "test_loss": row["test_loss"],
    }


def _final_domains(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last round's per-domain test accuracy and their mean (the FedBN/FedWon headline):
    the mean only when every domain was scored in that round, else null (a mean over the
    domains measured would overstate)."""
    if not rows:
        return None
    last = max(int(r["round"]) for r in rows)
    final = {r["domain"]: float(r["test_accuracy"]) for r in rows if int(r["round"]) == last}
    every = {r["domain"] for r in rows}
    scored = [v for v in final.values() if math.isfinite(v)]
    complete = len(scored) == len(every) and set(final) == every
    return {
        "round": last,
        "test_accuracy": final,
        "mean_test_accuracy": sum(scored) / len(scored) if complete else None,
        "scored_by": next(r["scored_by"] for r in rows if int(r["round"]) == last),
    }
