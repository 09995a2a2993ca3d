"""The run directory (DESIGN.md's contract), written as the run goes:

- ``config.yaml``: the resolved config;
- ``metrics.csv``: a row per round (round 0 = the initial model), through Lightning's CSVLogger;
  a TensorBoardLogger under ``tensorboard/`` as well when ``server.tensorboard`` is on;
- ``clients.csv``: a row per client per round;
- ``diagnostics.csv``: a row per round, quantity and layer (``app.diagnostics``; ``all`` for
  the whole model or the mean over layers);
- ``summary.json``: final and best metrics, timings, versions;
- ``checkpoints/last.ckpt`` (every round) and ``checkpoints/best.ckpt`` (best test accuracy).
"""

from __future__ import annotations

import csv
import json
import math
import platform
import time
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger

from app.config import Config, dump_config
from app.diagnostics import summarise
from app.errors import ConfigError

METRIC_COLUMNS = (
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "val_accuracy",
    "clients_ok",
    "clients_failed",
    "clients_rejected",
    "round_s",
)
CLIENT_COLUMNS = (
    "round",
    "client",
    "num_examples",
    "train_loss",
    "val_accuracy",
    "val_loss",
    "fit_s",
    "global_val_accuracy",
    "global_val_loss",
)
DIAGNOSTIC_COLUMNS = ("round", "quantity", "layer", "value")


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


def _loggers(cfg: Config, out: Path) -> list[Logger]:
    loggers: list[Logger] = [CSVLogger(save_dir=out, name="", version="")]
    if cfg.server.tensorboard:
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=out, name="tensorboard", version=""))
        except ModuleNotFoundError as err:
            raise ConfigError(
                "server.tensorboard",
                f"needs the tensorboard package ({err}): pip install tensorboard",
            ) from None
    return loggers


def _number(text: str) -> float:
    """A CSV cell back to the int or float it was written from."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _rows_until(path: Path, last_round: int) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if int(float(r["round"])) <= last_round]


class RunLog:
    """Writes the run directory. ``resume_round=k`` keeps the rows of rounds <= k of an
    interrupted run (and drops any later, half-written ones)."""

    def __init__(
        self,
        cfg: Config,
        out: Path,
        synthetic: bool,
        resume_round: int | None = None,
        elapsed_s: float = 0.0,
    ) -> None:
        self.cfg, self.out, self.synthetic = cfg, out, synthetic
        out.mkdir(parents=True, exist_ok=True)
        self.clients_path = out / "clients.csv"
        self.diagnostics_path = out / "diagnostics.csv"
        kept, kept_clients, self.diagnostics = [], [], []
        if resume_round is not None:
            kept = _rows_until(out / "metrics.csv", resume_round)
            kept_clients = _rows_until(self.clients_path, resume_round)
            self.diagnostics = _rows_until(self.diagnostics_path, resume_round)
        self.loggers = _loggers(cfg, out)
        with warnings.catch_warnings():  # an old run's files in OUT are replaced on purpose
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            for logger in self.loggers:
                logger.experiment  # noqa: B018 - creates the writers, clears an old metrics.csv
        (out / "config.yaml").write_text(dump_config(cfg))
        with open(self.clients_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CLIENT_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept_clients)
        with open(self.diagnostics_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=DIAGNOSTIC_COLUMNS)
            writer.writeheader()
            writer.writerows(self.diagnostics)
        self.rows = [{k: _number(r.get(k) or "0") for k in METRIC_COLUMNS} for r in kept]
        csv_logger = self.loggers[0]
        for row in self.rows:
            csv_logger.log_metrics(row, step=int(row["round"]))
        csv_logger.save()
        self.start = time.time() - elapsed_s

    @property
    def elapsed_s(self) -> float:
        return time.time() - self.start

    def log_round(
        self,
        row: dict[str, float],
        clients: list[dict[str, Any]],
        diagnosed: list[dict[str, Any]] = (),
    ) -> None:
        self.rows.append(row)
        self.diagnostics += diagnosed
        with open(self.diagnostics_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=DIAGNOSTIC_COLUMNS).writerows(diagnosed)
        for logger in self.loggers:
            logger.log_metrics({k: row[k] for k in METRIC_COLUMNS}, step=int(row["round"]))
            logger.save()
        with open(self.clients_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CLIENT_COLUMNS, restval="")
            writer.writerows(clients)

    def best(self) -> dict[str, float] | None:
        evaluated = [r for r in self.rows if not math.isnan(r["test_accuracy"])]
        return max(evaluated, key=lambda r: r["test_accuracy"]) if evaluated else None

    def finish(self, status: str = "completed", error: str | None = None) -> dict[str, Any]:
        for logger in self.loggers:
            logger.finalize(status="success" if status == "completed" else "failed")
        last = next((r for r in reversed(self.rows) if not math.isnan(r["test_accuracy"])), None)
        best = self.best()
        trained = [r for r in self.rows if r["round"] > 0]
        summary = {
            "status": status,
            "error": error,
            "rounds": int(self.rows[-1]["round"]) if self.rows else 0,
            "final": _pick(last),
            "best": _pick(best),
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
            "versions": versions(),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
        return summary


def _pick(row: dict[str, float] | None) -> dict[str, float] | None:
    if row is None:
        return None
    return {
        "round": int(row["round"]),
        "test_accuracy": row["test_accuracy"],
        "test_loss": row["test_loss"],
    }
