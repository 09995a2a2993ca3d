"""Flower's Ray backend config; the adapter's run itself is tested through the real runtime in
tests/test_simulation.py (each node holds its own partition)."""

from __future__ import annotations

from app.tools.simulation import backend_config


def test_backend_config_sets_client_resources():
    assert backend_config(2, 0.25) == {"client_resources": {"num_cpus": 2, "num_gpus": 0.25}}
    assert backend_config(1, 0, ray_num_cpus=3)["init_args"] == {"num_cpus": 3}
    cluster = backend_config(1, 0.5, ray_num_cpus=3, ray_address="10.0.0.5:6379")
    assert cluster["init_args"] == {"address": "10.0.0.5:6379"}
