"""Experiment tracking through Lightning's loggers: a real MLflow store (SQLite, offline) found
through MLflow's own API, TensorBoard scalars, and one-line errors for missing packages."""

from __future__ import annotations

import importlib.util

import mlflow
import pytest
from helpers import InProcessGrid, set_task_identity, small_config

from app.config import ConfigError
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


def test_tensorboard_gets_the_same_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_config("federation.rounds=1", "logging.loggers=[csv, tensorboard]")
    run_federation(InProcessGrid(client_app, 4), cfg, tmp_path)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"test_accuracy", "train_loss", "diagnostics/update_cosine"} <= set(tags)
    assert [e.step for e in acc.Scalars("test_accuracy")] == [0, 1]
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
