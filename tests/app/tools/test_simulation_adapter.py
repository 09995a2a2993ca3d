"""Flower's Ray backend config; the adapter's run itself is tested through the real runtime in
tests/test_simulation.py (each node holds its own partition)."""

from __future__ import annotations

import os

import pytest
from flwr.serverapp import ServerApp

from app.tools import simulation
from app.tools.simulation import backend_config


def test_backend_config_sets_client_resources():
    assert backend_config(2, 0.25) == {"client_resources": {"num_cpus": 2, "num_gpus": 0.25}}
    assert backend_config(1, 0, ray_num_cpus=3)["init_args"] == {"num_cpus": 3}
    cluster = backend_config(1, 0.5, ray_num_cpus=3, ray_address="10.0.0.5:6379")
    assert cluster["init_args"] == {"address": "10.0.0.5:6379"}


@pytest.mark.parametrize("users", [None, "7"])
def test_clients_run_at_the_servers_priority_unless_the_environment_says(monkeypatch, users):
    """Ray reads RAY_worker_niceness when its local instance starts, inside Flower's call."""
    if users is None:
        monkeypatch.delenv(simulation.WORKER_NICENESS, raising=False)
    else:
        monkeypatch.setenv(simulation.WORKER_NICENESS, users)
    seen = []

    def flower(**kwargs):
        seen.append(os.environ.get(simulation.WORKER_NICENESS))
        raise RuntimeError("Ray failed to start")  # the environment is restored all the same

    monkeypatch.setattr(simulation, "flwr_run_simulation", flower)
    with pytest.raises(RuntimeError):
        simulation.run_simulation(ServerApp(), num_clients=2)
    assert seen == ["0" if users is None else users]
    assert os.environ.get(simulation.WORKER_NICENESS) == users
