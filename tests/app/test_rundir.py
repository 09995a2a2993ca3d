"""The run directory's one home: names, columns and readers."""

from __future__ import annotations

import ast
import csv
import json
import math

from helpers import REPO
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from app import rundir
from app.rundir import RunDir, StudyDir

NAMES = {
    value
    for key, value in vars(rundir).items()
    if key.isupper() and isinstance(value, str) and "." in value
}


def test_metrics_csv_is_the_name_lightnings_csv_logger_writes():
    assert ExperimentWriter.NAME_METRICS_FILE == rundir.METRICS


def test_no_other_module_spells_a_run_directory_file_name():
    assert {"summary.json", "config.yaml", "metrics.csv", "clients.csv", "study.yaml"} <= NAMES
    spelled = []
    for package in ("app", "clients", "server"):
        for path in (REPO / package).rglob("*.py"):
            if path.name == "rundir.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in NAMES:
                    spelled.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}")
    assert not spelled, spelled


def test_paths_of_a_run_and_a_study(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.summary == tmp_path / "summary.json"
    assert run.last_checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert run.client_state == tmp_path / "checkpoints" / "clients"
    study = StudyDir(tmp_path)
    assert study.run("cell-a").metrics == tmp_path / "runs" / "cell-a" / "metrics.csv"
    assert study.results == tmp_path / "results.csv"


def test_readers(tmp_path):
    run = RunDir(tmp_path)
    assert rundir.run_status(run) == rundir.PENDING
    assert rundir.read_csv(run.metrics) == []
    with open(run.metrics, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["round", "test_accuracy"])
        writer.writeheader()
        writer.writerows(
            [
                {"round": 0, "test_accuracy": 0.1},
                {"round": 1, "test_accuracy": ""},
                {"round": 2, "test_accuracy": 0.5},
            ]
        )
    assert rundir.metric_curve(run, "test_accuracy") == [(0, 0.1), (2, 0.5)]
    assert [r["round"] for r in rundir.rows_until(run.metrics, 1)] == ["0", "1"]
    assert math.isnan(rundir.cell_float("")) and rundir.cell_number("3") == 3
    run.summary.write_text("{not json")
    assert rundir.run_status(run) == rundir.PENDING  # half-written: not finished
    rundir.write_summary(run, {"status": rundir.FAILED, "error": "x"})
    assert rundir.run_status(run) == rundir.FAILED
    assert json.loads(run.summary.read_text())["error"] == "x"
