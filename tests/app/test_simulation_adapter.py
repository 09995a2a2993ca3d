from __future__ import annotations

import flwr.simulation

from app.simulation import backend_config, run_simulation


def test_backend_config_sets_client_resources():
    assert backend_config(2, 0.25) == {"client_resources": {"num_cpus": 2, "num_gpus": 0.25}}
    assert backend_config(1, 0, ray_num_cpus=3)["init_args"] == {"num_cpus": 3}
    cluster = backend_config(1, 0.5, ray_num_cpus=3, ray_address="10.0.0.5:6379")
    assert cluster["init_args"] == {"address": "10.0.0.5:6379"}


def test_adapter_hands_fedws_apps_to_flower(monkeypatch):
    calls = []
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: calls.append(kw))
    server_app = object()
    run_simulation(server_app, num_clients=5, num_cpus=1, num_gpus=0.5)
    (kw,) = calls
    from clients.client_app import app as client_app

    assert kw["server_app"] is server_app and kw["client_app"] is client_app
    assert kw["num_supernodes"] == 5
    assert kw["backend_config"]["client_resources"] == {"num_cpus": 1, "num_gpus": 0.5}
