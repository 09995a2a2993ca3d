"""Experiment tracking through Lightning's own loggers (``logging.loggers``).

- ``csv`` (always): ``metrics.csv`` of the run directory, the file every fedws reader uses;
- ``tensorboard``: ``OUT/tensorboard/``, the same scalars as the trackers below and the config as
  hparams (``server.tensorboard: true`` turns it on too);
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
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger

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
    names = list(cfg.logging.loggers)
    if cfg.server.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def check_installed(cfg: Config) -> None:
    """A one-line error (exit 2) for a logger whose package is missing, before anything runs."""
    for name in tracker_names(cfg):
        package = PACKAGE.get(name)
        if package and importlib.util.find_spec(package) is None:
            hint = INSTALL.get(name, f"pip install {package}")
            raise ConfigError("logging.loggers", f"{name} needs the {package} package: {hint}")


def mlflow_uri(cfg: Config, out: Path) -> str:
    return cfg.logging.mlflow_uri or f"sqlite:///{out.resolve().parent / MLFLOW_DB}"


def experiment(cfg: Config) -> str:
    return cfg.logging.experiment or DEFAULT_EXPERIMENT


def make_loggers(cfg: Config, out: Path, resume: dict[str, Any] | None = None) -> list[Logger]:
    """The run's Lightning loggers, ``CSVLogger`` first. ``resume``: what ``state()`` returned
    in the interrupted run (the MLflow run to continue)."""
    check_installed(cfg)
    resume = resume or {}
    loggers: list[Logger] = [CSVLogger(save_dir=out, name="", version="")]
    for name in tracker_names(cfg)[1:]:
        if name == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            # default_hp_metric: the config is written as hparams with a placeholder metric
            loggers.append(TensorBoardLogger(save_dir=out, name=rundir.TENSORBOARD, version=""))
        elif name == "mlflow":
            from lightning.pytorch.loggers import MLFlowLogger

            logging.getLogger("mlflow").setLevel(logging.WARNING)  # store set-up chatter
            loggers.append(
                MLFlowLogger(
                    experiment_name=experiment(cfg),
                    run_name=out.name,
                    tracking_uri=mlflow_uri(cfg, out),
                    # with the default store, artifacts beside it, never in the working folder;
                    # a store of the user's keeps its own artifact location
                    artifact_location=(
                        None
                        if cfg.logging.mlflow_uri
                        else str(out.resolve().parent / MLFLOW_ARTIFACTS)
                    ),
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
