"""End to end through Flower's simulation runtime (Ray): `fedws run` as a user runs it.

Each run starts Ray (seconds), so this file holds the few Ray-backed runs of the suite."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import FEDWS, REPO

from app.rundir import read_csv
from server.sampling import TRAIN, sample_partitions

pytestmark = pytest.mark.slow  # starts Ray or Flower processes

CONFIG = {
    "seed": 1,
    "data": {
        "dataset": "synthetic",
        "synthetic": {"train_size": 3000, "test_size": 500, "image_size": 16},
        "partition": {"kind": "iid", "num_clients": 8},
    },
    "model": {"arch": "cnn", "norm": "ws_gn", "width": 16},
    "optim": {"name": "adam", "lr": 0.003},
    "train": {"batch_size": 32, "local_epochs": 2},
    # 2 of the 8 clients a round: Ray gives the nodes random ids in each process, and the
    # choice must still be the same in both runs
    "federation": {"strategy": "fedavg", "rounds": 3, "fraction_train": 0.25},
}


def fedws_run(config: Path, out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [
            *FEDWS,
            "run",
            str(config),
            "-o",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    config = tmp / "synthetic.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    procs = [fedws_run(config, tmp / name) for name in ("a", "b")]
    return tmp, procs


def test_simulation_writes_the_run_directory_and_learns(two_runs):
    tmp, procs = two_runs
    out = tmp / "a"
    assert "[SYNTHETIC DATA]" in procs[0].stdout
    assert "global test accuracy: final" in procs[0].stdout
    for name in ("config.yaml", "metrics.csv", "clients.csv", "summary.json"):
        assert (out / name).is_file(), name
    # run.log: what the console showed and Flower's log; Ray workers' lines stay off the console
    log = (out / "run.log").read_text()
    assert "fedws run: synthetic" in log and "global test accuracy: final" in log
    assert "INFO flwr: Starting RecordingFedAvg strategy" in log  # Flower's log, at INFO
    assert "pid=" not in procs[0].stdout + procs[0].stderr
    assert (out / "checkpoints" / "last.ckpt").is_file()

    metrics = read_csv(out / "metrics.csv")
    assert [int(r["round"]) for r in metrics] == [0, 1, 2, 3]
    assert all(int(r["clients_ok"]) == 2 and int(r["clients_failed"]) == 0 for r in metrics[1:])
    clients = read_csv(out / "clients.csv")
    # one node per partition: every client evaluated once a round, the drawn ones trained
    for rnd in (1, 2, 3):
        these = [r for r in clients if r["round"] == str(rnd)]
        assert sorted(int(r["client"]) for r in these) == list(range(8))
        trained = [int(r["client"]) for r in these if r["num_examples"]]
        assert trained == sample_partitions(1, rnd, 8, 0.25, 1, TRAIN)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["synthetic_data"] is True
    # 10 balanced classes: chance is 0.1 (2.303 nats); 500 test samples put 0.2 far above it
    assert summary["final"]["test_accuracy"] > 0.2
    assert summary["final"]["test_loss"] < float(metrics[0]["test_loss"])


def test_same_config_and_seed_give_identical_accuracy_columns(two_runs):
    tmp, _ = two_runs
    a, b = read_csv(tmp / "a" / "metrics.csv"), read_csv(tmp / "b" / "metrics.csv")
    assert a
    for key in ("test_accuracy", "test_loss", "train_loss", "val_accuracy"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    ca, cb = read_csv(tmp / "a" / "clients.csv"), read_csv(tmp / "b" / "clients.csv")
    trained = [[(r["round"], r["client"]) for r in c if r["num_examples"]] for c in (ca, cb)]
    assert trained[0] == trained[1] and len(trained[0]) == 3 * 2  # the same clients per round
    assert [r["val_accuracy"] for r in ca] == [r["val_accuracy"] for r in cb]
