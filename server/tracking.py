"""Experiment tracking through Lightning's own loggers (``logging.loggers``).

- ``csv`` (always): ``metrics.csv`` of the run directory, the file every fedws reader uses;
- ``tensorboard``: ``OUT/tensorboard/``, the same scalars as the trackers below and the config as
  hparams;
- ``mlflow``: an MLflow tracking store (``logging.mlflow_uri``; default the SQLite database
  ``mlflow.db`` beside the run directory, which works offline), one MLflow run per fedws run in
  the experiment ``logging.experiment`` (default ``fedws``; a study: its name) with the
  flattened config as params, every round's numbers as metrics (step = round) and
  ``summary.json`` as an artifact (a new experiment keeps its artifacts in ``mlartifacts/``
  beside the run directory);
- ``wandb``: Weights & Biases, offline (files under ``OUT/wandb``) unless ``WANDB_API_KEY`` or
  ``WANDB_MODE=online`` says a server is configured.

The trackers get each round's ``metrics.csv`` row, the ``all`` value of every diagnostics
quantity (``diagnostics/<quantity>``) and each domain's test accuracy (``domains/<name>``);
rounds that measured nothing (NaN) are left out of them.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from app import rundir
from app.config import Config
from app.errors import ConfigError

DEFAULT_EXPERIMENT = "fedws"
MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"  # a new experiment's artifact folder, beside the run folder
INSTALL = {"mlflow": "pip install 'fedws[mlflow]'", "wandb": "pip install 'fedws[wandb]'"}
PACKAGE = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboard"}


def tracker_names(cfg: Config) -> list[str]:
    """The loggers asked for, ``csv`` first."""
    return list(cfg.logging.loggers)


def check_installed(cfg: Config) -> None:
    """A one-line error (exit 2) for a logger whose package is missing, before anything runs."""
    for name in tracker_names(cfg):
        package = PACKAGE.get(name)
        if package and importlib.util.find_spec(package) is None:
            hint = INSTALL.get(name, f"pip install {package}")
            raise ConfigError("logging.loggers", f"{name} needs the {package} package: {hint}")


def mlflow_uri(cfg: Config, out: Path) -> str:
    return cfg.logging.mlflow_uri or f"sqlite:///{out.resolve().parent / MLFLOW_DB}"


def mlflow_artifacts(uri: str) -> str | None:
    """Where a new MLflow experiment keeps its artifacts: beside a local store (a SQLite
    database's folder, or a file store's own), never MLflow's default ``./mlruns`` of whatever
    folder the command ran in; None (the server decides) for a tracking server."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///") :]).resolve().parent / MLFLOW_ARTIFACTS)
    return None  # a file store keeps them under itself; a server decides for itself


# the loggers whose start-up lines go to run.log only, and the level they are kept at there
CHATTY = {
    "mlflow": logging.INFO,
    "alembic": logging.INFO,
    "sqlalchemy": logging.WARNING,  # its INFO is a line per mapped column
    "lightning.pytorch.loggers.mlflow": logging.INFO,
    "py.warnings": logging.WARNING,
}


@contextmanager
def chatter_to(log_file: Path, cfg: Config) -> Iterator[None]:
    """Inside: the trackers' start-up chatter (MLflow's and SQLAlchemy's table creation,
    "experiment not found, creating", library warnings) goes to ``log_file`` only, off the
    console; their handlers and Python's warning display are restored after."""
    if "mlflow" in tracker_names(cfg):
        import mlflow  # noqa: F401 - its import sets up its own console handler: first, then ours
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {}
    for name, level in CHATTY.items():
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate, logger.level)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(level)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for name, (handlers, propagate, level) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:], logger.propagate = handlers, propagate
            logger.setLevel(level)
        handler.close()


def experiment(cfg: Config) -> str:
    return cfg.logging.experiment or DEFAULT_EXPERIMENT


class _MetricsWriter(ExperimentWriter):
    """Lightning's CSV writer, writing ``metrics.csv`` as documented: the columns in
    ``rundir.METRIC_COLUMNS`` order (any other after them), no ``step`` column (``round`` is
    the step), float32 values at float32 precision (``rundir.csv_value``)."""

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        values = {k: v.item() if hasattr(v, "item") else v for k, v in metrics_dict.items()}
        self.metrics.append({k: rundir.csv_value(v) for k, v in values.items()})

    def _record_new_keys(self) -> set[str]:
        current = set().union(*self.metrics)
        new = current - set(self.metrics_keys)
        known = set(self.metrics_keys) | current
        self.metrics_keys[:] = [c for c in rundir.METRIC_COLUMNS if c in known] + sorted(
            known - set(rundir.METRIC_COLUMNS)
        )
        return new


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` writing the run directory's ``metrics.csv`` (``_MetricsWriter``)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _MetricsWriter(log_dir=self.log_dir)
        return self._experiment


def make_loggers(cfg: Config, out: Path, resume: dict[str, Any] | None = None) -> list[Logger]:
    """The run's Lightning loggers, ``CSVLogger`` first. ``resume``: what ``state()`` returned
    in the interrupted run (the MLflow run to continue)."""
    check_installed(cfg)
    resume = resume or {}
    loggers: list[Logger] = [RunCSVLogger(save_dir=out, name="", version="")]
    for name in tracker_names(cfg)[1:]:
        if name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            # the config as hparams, with Lightning's placeholder hp_metric (-1) that the final
            # test accuracy replaces at the end (log_final): the HParams view's column
            loggers.append(TensorBoardLogger(save_dir=out, name=rundir.TENSORBOARD, version=""))
        elif name == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            uri = mlflow_uri(cfg, out)
            loggers.append(
                MLFlowLogger(
                    experiment_name=experiment(cfg),
                    run_name=out.name,
                    tracking_uri=uri,
                    artifact_location=mlflow_artifacts(uri),
                    run_id=resume.get("mlflow_run_id"),
                )
            )
        elif name == "wandb":
            from lightning.pytorch.loggers import WandbLogger

            online = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online"
            loggers.append(
                WandbLogger(
                    project=experiment(cfg),
                    name=out.name,
                    save_dir=str(out),
                    offline=not online,
                    id=resume.get("wandb_run_id"),
                    resume="allow" if resume.get("wandb_run_id") else None,
                )
            )
    return loggers


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as params: every leaf by its dotted key."""
    return cfg.flat()


def tracked_metrics(
    row: dict[str, float], diagnosed: list[dict[str, Any]], domain_rows: list[dict[str, Any]]
) -> dict[str, float]:
    """One round's numbers for the trackers: the metrics row (without ``round``), each
    diagnostics quantity's ``all`` value, each domain's test accuracy; finite values only."""
    metrics = {k: float(v) for k, v in row.items() if k != "round"}
    for r in diagnosed:
        if r["layer"] == "all":
            metrics[f"diagnostics/{r['quantity']}"] = float(r["value"])
    for r in domain_rows:
        metrics[f"domains/{r['domain']}/test_accuracy"] = float(r["test_accuracy"])
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


def state(loggers: list[Logger]) -> dict[str, Any]:
    """What a resumed run needs to continue the same tracker runs, and where they are."""
    found: dict[str, Any] = {}
    for logger in loggers:
        if type(logger).__name__ == "MLFlowLogger":
            found["mlflow_run_id"] = logger.run_id
            found["mlflow_experiment"] = logger._experiment_name
            found["mlflow_uri"] = logger._tracking_uri
        elif type(logger).__name__ == "WandbLogger":
            found["wandb_run_id"] = logger.version
    return found


def log_final(loggers: list[Logger], final: dict[str, float] | None) -> None:
    """TensorBoard's ``hp_metric`` (its hparams view's column): the final test accuracy, at
    the final round."""
    for logger in loggers:
        if type(logger).__name__ == "TensorBoardLogger" and final is not None:
            step = int(final["round"])
            logger.log_metrics({"hp_metric": float(final["test_accuracy"])}, step=step)


def finish_trackers(loggers: list[Logger]) -> None:
    """Close what Lightning's ``finalize`` leaves open: a W&B run (so the next run in this
    process, a study's next cell, starts its own)."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()


def log_artifact(loggers: list[Logger], path: Path) -> None:
    """Attach a file (``summary.json``, a figure) to the MLflow run."""
    for logger in loggers:
        if type(logger).__name__ == "MLFlowLogger":
            logger.experiment.log_artifact(logger.run_id, str(path))
