"""Experiment tracking through Lightning's loggers: a real MLflow store (SQLite, offline) found
through MLflow's own API, TensorBoard scalars, and one-line errors for missing packages."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import mlflow
import pytest
from helpers import InProcessGrid, set_task_identity, small_config, tensorboard_scalars

from app.config import ConfigError
from app.rundir import read_csv
from app.tools.cli import main
from clients.client_app import app as client_app
from server import tracking
from server.server_app import run_federation


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    set_task_identity(monkeypatch)


def test_a_run_is_found_through_mlflows_api_with_params_and_round_metrics(tmp_path):
    out = tmp_path / "runs" / "tiny"
    cfg = small_config(
        "federation.rounds=2",
        "logging.loggers=[csv, mlflow]",
        "logging.experiment=tracking-test",
        "model.norm=bn",
    )
    summary = run_federation(InProcessGrid(client_app, 4), cfg, out)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # the default: beside the run directory
    assert summary["tracking"]["mlflow_uri"] == uri

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tracking-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.norm"] == "bn" and params["federation.rounds"] == "2"
    assert params["data.partition.kind"] == "iid"
    history = {
        key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        for key in ("test_accuracy", "clients_ok", "diagnostics/update_cosine")
    }
    assert [s for s, _ in history["test_accuracy"]] == [0, 1, 2]
    assert history["test_accuracy"][-1][1] == pytest.approx(summary["final"]["test_accuracy"])
    assert history["clients_ok"] == [(0, 0.0), (1, 4.0), (2, 4.0)]  # round 0 trains nobody
    assert [s for s, _ in history["diagnostics/update_cosine"]] == [1, 2]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "summary.json" in artifacts
    assert list((tmp_path / "runs" / "mlartifacts").rglob("summary.json"))  # not in the cwd


def csv_series(out: Path) -> dict[str, list[tuple[int, float]]]:
    """What a tracker should get from a run: every number of metrics.csv, and each diagnostics
    quantity's ``all`` row of diagnostics.csv, as tag -> [(round, value), ...]."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in read_csv(out / "metrics.csv"):
        for column, value in r.items():
            if column != "round" and value and math.isfinite(float(value)):
                series.setdefault(column, []).append((int(r["round"]), float(value)))
    for r in read_csv(out / "diagnostics.csv"):
        if r["layer"] == "all":
            tag = f"diagnostics/{r['quantity']}"
            series.setdefault(tag, []).append((int(r["round"]), float(r["value"])))
    return series


def test_tensorboard_gets_the_same_scalars(tmp_path):
    cfg = small_config("federation.rounds=1", "logging.loggers=[csv, tensorboard]")
    run_federation(InProcessGrid(client_app, 4), cfg, tmp_path)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert {"test_accuracy", "train_loss", "diagnostics/update_cosine"} <= set(scalars)
    assert [step for step, _ in scalars["test_accuracy"]] == [0, 1]
    # the numbers read back are the CSV files' numbers, each at its round
    want = csv_series(tmp_path)
    assert {"test_accuracy", "train_loss", "diagnostics/update_cosine"} <= set(want)
    assert set(want) <= set(scalars)
    for tag, series in want.items():
        assert [step for step, _ in scalars[tag]] == [step for step, _ in series], tag
        got = [value for _, value in scalars[tag]]
        assert got == pytest.approx([value for _, value in series], rel=1e-6), tag
    # and the config as hparams (TensorBoard's HParams plugin data)
    assert b"_hparams_/session_start_info" in events.read_bytes()
    assert b"data.partition.kind" in events.read_bytes()


def test_a_missing_tracker_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = small_config("logging.loggers=[csv, wandb]")
    with pytest.raises(
        ConfigError, match=r"wandb needs the wandb package: pip install 'fedws\[wandb\]'"
    ):
        tracking.check_installed(cfg)
    config = tmp_path / "c.yaml"
    config.write_text("logging: {loggers: [csv, wandb]}\ndata: {dataset: synthetic}\n")
    assert main(["run", str(config), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedws: config error: logging.loggers: wandb needs")


def test_csv_cannot_be_turned_off():
    with pytest.raises(ConfigError, match="must include csv"):
        small_config("logging.loggers=[mlflow]")


def test_a_run_from_a_scratch_folder_leaves_nothing_in_it_and_keeps_chatter_off_the_console(
    tmp_path, monkeypatch, capfd
):
    scratch, store = tmp_path / "scratch", tmp_path / "store"
    scratch.mkdir(), store.mkdir()
    monkeypatch.chdir(scratch)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    cfg = small_config(
        "federation.rounds=1",
        "logging.loggers=[csv, mlflow, tensorboard]",
        f"logging.mlflow_uri={uri}",
        "logging.experiment=scratch-test",
    )
    out = tmp_path / "run"
    summary = run_federation(InProcessGrid(client_app, 4), cfg, out)
    assert list(scratch.iterdir()) == []  # no ./mlruns, no lightning_logs
    assert list((store / "mlartifacts").rglob("summary.json"))  # beside the database
    console = capfd.readouterr()
    chatter = ("Creating initial MLflow database tables", "not found. Creating it")
    assert not any(c in console.out + console.err for c in chatter)
    log = (out / "run.log").read_text()
    assert "Creating initial MLflow database tables" in log  # kept, in the run's log
    assert log.count("seed: 0") == 0 and "'fedws-config': <config.yaml>" in log

    # the final test accuracy replaces the -1 placeholder
    step, value = tensorboard_scalars(out / "tensorboard")["hp_metric"][-1]
    assert value == pytest.approx(summary["final"]["test_accuracy"]) and step > 0


def test_metrics_csv_has_the_documented_columns_in_order_at_float32_precision(tmp_path):
    from app import rundir

    run_federation(InProcessGrid(client_app, 4), small_config("federation.rounds=1"), tmp_path)
    rows = read_csv(tmp_path / "metrics.csv")
    assert tuple(rows[0]) == rundir.METRIC_COLUMNS  # no step column, not alphabetical
    assert all(len(r["test_accuracy"]) <= 10 for r in rows)  # 0.145, not 0.14499999582767487
    assert [r["round"] for r in rows] == ["0", "1"]
    clients = read_csv(tmp_path / "clients.csv")
    assert clients and all(len(r["val_accuracy"]) <= 10 for r in clients)


def test_csv_values_are_float32_short_and_lossless():
    import numpy as np

    from app.rundir import csv_value

    single = float(np.float32(0.118))
    assert csv_value(single) == "0.118" and float(np.float32(csv_value(single))) == single
    assert csv_value(0.1) == 0.1  # a float64 that no float32 holds: written as Python does
    assert csv_value(3) == 3 and csv_value(float("nan")) != csv_value(float("nan"))
