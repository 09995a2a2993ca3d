"""The one place that starts Flower's simulation runtime from Python.

``flwr.simulation.run_simulation`` works in Flower 1.42 and is deprecated there; keeping the call
here means a move to ``flwr run`` (or a newer API) touches this module only.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation as flwr_run_simulation

from clients.client_app import app as client_app


def backend_config(
    num_cpus: float,
    num_gpus: float,
    ray_num_cpus: int | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Flower's Ray backend config: each simulated client's resources; optionally how many CPUs
    a local Ray instance may use, or the address of an existing Ray cluster to join (Ray also
    reads ``RAY_ADDRESS`` from the environment)."""
    config: dict[str, Any] = {"client_resources": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    init_args: dict[str, Any] = {}
    if ray_address is not None:
        init_args["address"] = ray_address
    elif ray_num_cpus is not None:  # a cluster's size is its own
        init_args["num_cpus"] = ray_num_cpus
    if init_args:
        config["init_args"] = init_args
    return config


def run_simulation(
    server_app: ServerApp,
    num_clients: int,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    ray_num_cpus: int | None = None,
    ray_address: str | None = None,
    verbose: bool = False,
) -> None:
    """Run ``server_app`` against fedws's ClientApp on ``num_clients`` simulated SuperNodes
    (Ray backend); each node gets ``partition-id`` / ``num-partitions`` in its node config.
    Says so first: Ray and its client processes take seconds to start before round 1."""
    print(starting_line(num_clients, num_cpus, num_gpus, ray_num_cpus, ray_address), flush=True)
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
                backend_config=backend_config(num_cpus, num_gpus, ray_num_cpus, ray_address),
                verbose_logging=verbose,
            )
    finally:
        flwr_logger.removeFilter(known)


def starting_line(
    num_clients: int,
    num_cpus: float,
    num_gpus: float,
    ray_num_cpus: int | None = None,
    ray_address: str | None = None,
) -> str:
    """What the runtime is about to start: Flower's Ray backend runs as many client processes
    as the CPUs (and GPUs) hold clients of the requested size, at most one per client."""
    each = f"{num_cpus:g} CPU" + (f", {num_gpus:g} GPU" if num_gpus else "") + " each"
    if ray_address is not None:
        where = f"on the Ray cluster at {ray_address} ({each})"
    else:
        cpus = ray_num_cpus or os.cpu_count() or 1
        processes = max(1, min(num_clients, int(cpus // num_cpus)))
        where = f"on {processes} client process{'es' if processes > 1 else ''} ({each})"
    return (
        f"starting Flower simulation: {num_clients} clients {where}; round 1 begins once Ray "
        "and the client processes are up"
    )


class _DropKnownNotices(logging.Filter):
    """Drops Flower's deprecation notice for the call this module exists to contain."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "The `run_simulation` function is deprecated" not in record.getMessage()
