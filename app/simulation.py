"""The one place that starts Flower's simulation runtime from Python.

``flwr.simulation.run_simulation`` works in Flower 1.42 and is deprecated there; keeping the call
here means a move to ``flwr run`` (or a newer API) touches this module only.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from flwr.serverapp import ServerApp


def backend_config(
    num_cpus: float, num_gpus: float, ray_num_cpus: int | None = None
) -> dict[str, Any]:
    """Flower's Ray backend config: each simulated client's resources, and optionally how many
    CPUs the local Ray instance may use."""
    config: dict[str, Any] = {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    if ray_num_cpus is not None:
        config["init_args"] = {"num_cpus": ray_num_cpus}
    return config


def run_simulation(
    server_app: ServerApp,
    num_clients: int,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    ray_num_cpus: int | None = None,
    verbose: bool = False,
) -> None:
    """Run ``server_app`` against fedws's ClientApp on ``num_clients`` simulated SuperNodes
    (Ray backend); each node gets ``partition-id`` / ``num-partitions`` in its node config."""
    from flwr.simulation import run_simulation as flwr_run_simulation

    from clients.client_app import app as client_app

    flwr_logger = logging.getLogger("flwr")
    known = _DropKnownNotices()
    flwr_logger.addFilter(known)
    try:
        with warnings.catch_warnings():
            # Ray's notice about a future default; fedws relies on today's (num_gpus=0 hides GPUs)
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
            flwr_run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_clients,
                backend_config=backend_config(num_cpus, num_gpus, ray_num_cpus),
                verbose_logging=verbose,
            )
    finally:
        flwr_logger.removeFilter(known)


class _DropKnownNotices(logging.Filter):
    """Drops Flower's deprecation notice for the call this module exists to contain."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "The `run_simulation` function is deprecated" not in record.getMessage()
