"""The run directory and the study folder: every file name, column list and reader, in one place.

A run directory (``fedws run``, ``flwr run .``, a study cell)::

    config.yaml        the resolved config
    metrics.csv        a row per round (METRIC_COLUMNS), round 0 = the initial model
    clients.csv        a row per client per round (CLIENT_COLUMNS)
    diagnostics.csv    a row per round, quantity and layer (DIAGNOSTIC_COLUMNS)
    domains.csv        multi-domain runs: a row per round and domain (DOMAIN_COLUMNS)
    summary.json       status, final and best metrics, timings, versions
    checkpoints/       last.ckpt, best.ckpt, clients/ (each client's local state)
    tensorboard/       TensorBoard events (optional)
    run.log            what the run printed, Flower's log, Ray workers' lines
    diagnostics.md     ``fedws diagnose``, with figures/

A study folder (``fedws study``)::

    study.yaml         the expanded grid: source, axes, cells
    runs/<cell>/       a run directory each, plus cell.yaml (the cell's config) and log.txt
    results.csv        a row per cell (RESULT_COLUMNS)
    report.md          with figures/
    study.log          what fedws study printed, Ray workers' lines

Every writer and reader imports its names from here (Lightning keeps its CSV logger's format
in one class the same way): a file name spelled in one place cannot disagree with itself.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import secrets
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from app.config import Config, build, without_unused_settings, yaml_dump, yaml_load
from app.errors import ConfigError, FedwsError

CONFIG = "config.yaml"
METRICS = "metrics.csv"
CLIENTS = "clients.csv"
DIAGNOSTICS = "diagnostics.csv"
DOMAINS = "domains.csv"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
BEST_CHECKPOINT = "best.ckpt"
CLIENT_STATE = "clients"  # under checkpoints/
TENSORBOARD = "tensorboard"
FIGURES = "figures"
DIAGNOSTICS_REPORT = "diagnostics.md"
RUN_LOG = "run.log"

STUDY = "study.yaml"
RUNS = "runs"
CELL_CONFIG = "cell.yaml"
CELL_LOG = "log.txt"
RESULTS = "results.csv"
STUDY_REPORT = "report.md"
STUDY_LOG = "study.log"

METRIC_COLUMNS = (
    "round",
    "test_accuracy",
    "test_loss",
    "train_loss",
    "val_accuracy",
    "global_val_accuracy",
    "global_val_loss",
    "clients_ok",
    "clients_failed",
    "clients_rejected",
    "eval_ok",
    "eval_failed",
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
    "local_state_round",
)
DIAGNOSTIC_COLUMNS = ("round", "quantity", "layer", "value")
# scored_by: "global" (the server's model) or "clients" (under fedbn: the mean over the
# domain's evaluated clients, each with its own BN layers); clients: how many
DOMAIN_COLUMNS = ("round", "domain", "test_accuracy", "test_loss", "scored_by", "clients")
RESULT_COLUMNS = (
    "cell",
    "status",
    "row",
    "column",
    "dataset",
    "arch",
    "norm",
    "strategy",
    "partition",
    "alpha",
    "seed",
    "final_test_accuracy",
    "final_test_loss",
    "best_val_round",
    "best_global_val_accuracy",
    "test_accuracy_at_best_val",
    "client_val_mean",
    "client_val_worst10",
    "test_round_to_target",
    "rounds",
    "wall_s",
    "error",
)

PENDING, COMPLETED, FAILED, DIVERGED = "pending", "completed", "failed", "diverged"
FINISHED = (COMPLETED, DIVERGED)  # a result: a study does not run these cells again
SELECTED_BY = "global_val_accuracy"  # the metrics.csv column the best round is chosen by


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def clients(self) -> Path:
        return self.path / CLIENTS

    @property
    def diagnostics(self) -> Path:
        return self.path / DIAGNOSTICS

    @property
    def domains(self) -> Path:
        return self.path / DOMAINS

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / LAST_CHECKPOINT

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / BEST_CHECKPOINT

    @property
    def client_state(self) -> Path:
        return self.checkpoints / CLIENT_STATE

    @property
    def figures(self) -> Path:
        return self.path / FIGURES

    @property
    def diagnostics_report(self) -> Path:
        return self.path / DIAGNOSTICS_REPORT

    @property
    def run_log(self) -> Path:
        return self.path / RUN_LOG

    @property
    def cell_config(self) -> Path:
        return self.path / CELL_CONFIG

    @property
    def cell_log(self) -> Path:
        return self.path / CELL_LOG


@dataclass(frozen=True)
class StudyDir:
    """The paths of one study folder."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def study(self) -> Path:
        return self.path / STUDY

    @property
    def results(self) -> Path:
        return self.path / RESULTS

    @property
    def report(self) -> Path:
        return self.path / STUDY_REPORT

    @property
    def figures(self) -> Path:
        return self.path / FIGURES

    @property
    def log(self) -> Path:
        return self.path / STUDY_LOG

    def run(self, cell: str) -> RunDir:
        return RunDir(self.path / RUNS / cell)


# --- writers ----------------------------------------------------------------------------------


class WriteError(FedwsError):
    """A run or study folder could not be written (a full disk, no permission, a path through
    a file): one line naming the file and the system's reason instead of a traceback. Exit
    code 2: the output folder (or the disk) has to change."""

    exit_code = 2

    def __init__(self, path: Path, err: OSError) -> None:
        if err.filename is not None:  # the file the system call was about
            super().__init__(f"cannot write {err.filename}: {err.strerror or err}")
        else:  # e.g. a write() on a full disk names no file
            super().__init__(f"writing {path} failed: {err.strerror or err}")
        self.path = Path(path if err.filename is None else err.filename)


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Inside, an ``OSError`` becomes a ``WriteError`` naming the file it names, else ``path``."""
    try:
        yield
    except OSError as err:
        raise WriteError(path, err) from None


@contextlib.contextmanager
def replacing(
    path: Path, mode: str = "w", permissions: int = 0o666, **open_args: Any
) -> Iterator[IO]:
    """A file object whose content replaces ``path`` whole or not at all: it is written under
    a temporary name in the same folder, flushed to the disk, then renamed over ``path``
    (``os.replace`` is atomic on one file system). On any error the temporary file is removed
    and ``path`` keeps its old content (or stays absent): a full disk or a killed process never
    leaves a 0-byte or half-written file for a reader to trust. The file is created new
    (``O_EXCL``) with ``permissions`` (less the umask) from its first byte: 0o600 for a
    private key is never readable by others, not even for a moment."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions)
    try:
        with open(fd, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_whole(path: Path, data: str | bytes | memoryview, permissions: int = 0o666) -> None:
    """Write ``data`` to ``path`` through ``replacing``: the old file or the new one, whole."""
    with replacing(path, "w" if isinstance(data, str) else "wb", permissions) as f:
        f.write(data)


# --- readers ----------------------------------------------------------------------------------


def csv_value(value: Any) -> Any:
    """A number as a run's CSV files write it: a float that a float32 holds exactly (a metric
    torchmetrics or the model computed) at float32 precision, ``0.118`` rather than
    ``0.11800000071525574``; any other value as Python writes it (lossless either way)."""
    if isinstance(value, float) and math.isfinite(value):
        import numpy as np

        single = np.float32(value)
        if float(single) == value:
            return str(single)
    return value


def read_csv(path: Path) -> list[dict[str, str]]:
    """Every row of a CSV file as a dict; no rows when the file does not exist."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def rows_until(path: Path, last_round: int) -> list[dict[str, str]]:
    """The rows of a per-round CSV file up to and including ``last_round``."""
    return [r for r in read_csv(path) if int(float(r["round"])) <= last_round]


def cell_float(text: str | None) -> float:
    """A CSV cell as a float; NaN when empty or not a number."""
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def cell_number(text: str) -> int | float:
    """A CSV cell back to the int or float it was written from."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def metric_curve(run: RunDir, key: str) -> list[tuple[int, float]]:
    """(round, value) of ``metrics.csv`` column ``key`` where it was measured."""
    points = [(int(r["round"]), cell_float(r.get(key))) for r in read_csv(run.metrics)]
    return [p for p in points if not math.isnan(p[1])]


def read_summary(run: RunDir) -> dict[str, Any] | None:
    """``summary.json``, or None when the run has not finished (or the file is unreadable)."""
    try:
        return json.loads(run.summary.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_status(run: RunDir) -> str:
    """``completed``, ``failed`` (or another status the summary names) or ``pending``."""
    return (read_summary(run) or {}).get("status", PENDING)


def write_summary(run: RunDir, summary: dict[str, Any]) -> None:
    """``summary.json``, whole or not at all (``write_whole``): a study takes a run whose
    summary says completed as done, so a half-written one must never exist. A non-finite
    number (a diverged run's loss) is written as null."""
    write_whole(run.summary, json.dumps(_json_safe(summary), indent=2, allow_nan=False))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def read_config(path: Path) -> Config:
    """A config file written by fedws (``config.yaml``, ``cell.yaml``), validated; a file from
    an earlier fedws that wrote every setting, used or not, loses the unused ones first."""
    return build(without_unused_settings(yaml_load(path.read_text()) or {}))


# written by a run and read by others, but no number of the run depends on them (of the
# simulation's resources only the device does: result_settings keeps it)
NUMBER_NEUTRAL = ("logging", "simulation")
# The version of what produces a run's numbers: the data draws and the algorithms. Bump it when
# a change makes the same config give other numbers; a study reruns a finished cell whose
# summary.json names another version (or none: written before versions were recorded).
# 2: partitions drawn as NIID-Bench draws them, the run's seed drawing the data, FedAdam as
# Reddi et al.'s Algorithm 2.
RESULTS_VERSION = 2


def result_settings(cfg: Config) -> dict[str, Any]:
    """``cfg``'s settings that can change a number of the run (``NUMBER_NEUTRAL`` left out,
    but the device the clients train on): two runs with equal ones compute the same results
    with the same ``RESULTS_VERSION``."""
    kept = {
        k: v
        for k, v in cfg.flat().items()
        if not any(k == n or k.startswith(f"{n}.") for n in NUMBER_NEUTRAL)
    }
    kept["device"] = "gpu" if cfg.simulation.num_gpus > 0 else "cpu"
    return kept


def holds_run(run: RunDir) -> bool:
    """Whether the folder holds (part of) a run: its config, metrics or summary."""
    return any(p.exists() for p in (run.config, run.metrics, run.summary))


RUN_FILES = (CONFIG, METRICS, CLIENTS, DIAGNOSTICS, DOMAINS, SUMMARY, DIAGNOSTICS_REPORT, RUN_LOG)
RUN_FOLDERS = (CHECKPOINTS, TENSORBOARD, FIGURES)


def clear_run(run: RunDir) -> None:
    """Remove a run's files and folders (and nothing else) so a new run starts clean; a
    folder that holds no run (a study's, a mistaken -o) is left alone."""
    if not holds_run(run):
        return
    import shutil

    for name in RUN_FILES:
        (run.path / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(run.path / name, ignore_errors=True)


def run_config(run: RunDir) -> Config | None:
    """The run's resolved config, else the study cell's config, else None."""
    for path in (run.config, run.cell_config):
        if path.is_file():
            return read_config(path)
    return None


def write_study(study: StudyDir, meta: dict[str, Any]) -> None:
    """``study.yaml``: the study's source file, axes, target accuracy and cells (whole or not
    at all: ``write_whole``)."""
    write_whole(study.study, yaml_dump(meta, sort_keys=False))


def read_study(study: StudyDir) -> dict[str, Any]:
    return yaml_load(study.study.read_text())


Curves = dict[str, dict[str, list[tuple[int, float]]]]  # quantity -> layer -> (round, value)


def read_diagnostics(run: RunDir) -> Curves:
    """``diagnostics.csv`` as curves: quantity -> layer -> [(round, value)]."""
    if not run.diagnostics.is_file():
        raise ConfigError(str(run.path), f"holds no {DIAGNOSTICS} (not a fedws run directory?)")
    curves: Curves = defaultdict(lambda: defaultdict(list))
    for r in read_csv(run.diagnostics):
        curves[r["quantity"]][r["layer"]].append((int(r["round"]), float(r["value"])))
    return curves
