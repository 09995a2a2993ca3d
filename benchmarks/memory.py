"""Memory over a long run: the resident set size (RSS) of the server process and of every
client process (Ray actors) after round 5 and after the last round.

Many Lightning Trainers in long-lived processes have been reported to leak (Lightning issues
2010, 8430, 18640); fedws builds two per client per round, so this checks that its processes stay
flat.

    python benchmarks/memory.py [--rounds 50] [--json PATH]

JSON keys: ``server_rss_mb`` and ``clients_rss_mb`` ({round: MB}), ``server_growth`` and
``clients_growth`` (relative growth from round 5 to the last round). Target: within 10%.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from measure import command_line, memory_mb, processes, write_json

from app.config import build
from app.learn.runtime import partitions


def client_processes() -> list[int]:
    return [p.pid for p in processes() if command_line(p.pid).startswith(b"ray::ClientAppActor")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dataset = "fashion_mnist" if Path("/usr/share/datasets/fashion-mnist").is_dir() else "synthetic"
    cfg = build(
        {
            "data": {
                "dataset": dataset,
                "train_samples": 3000,
                "test_samples": 2000,
                "partition": {"kind": "dirichlet", "alpha": 0.5, "num_clients": 10},
            },
            "model": {"arch": "cnn", "norm": "ws_gn", "width": 16},
            "federation": {"rounds": args.rounds},
        }
    )
    partitions(cfg.data)
    samples: dict[int, dict[str, float]] = {}

    def on_round(row: dict[str, float]) -> None:
        r = int(row["round"])
        if r in (5, args.rounds) or r % 10 == 0:
            clients = client_processes()
            samples[r] = {
                "server": memory_mb("self")[0],
                "clients": sum(memory_mb(p)[0] for p in clients) / max(1, len(clients)),
                "n_clients": len(clients),
            }
            print(
                f"round {r:>3}: server {samples[r]['server']:.0f} MB, "
                f"client processes ({len(clients)}) {samples[r]['clients']:.0f} MB each",
                flush=True,
            )

    from app.tools.simulation import run_simulation
    from server.server_app import make_server_app

    with tempfile.TemporaryDirectory() as tmp:
        app = make_server_app(cfg, Path(tmp) / "run", progress=on_round)
        run_simulation(app, num_clients=10)
    first, last = samples[5], samples[args.rounds]
    server_growth = last["server"] / first["server"] - 1
    clients_growth = last["clients"] / first["clients"] - 1
    print(
        f"growth from round 5 to round {args.rounds}: server {server_growth:+.1%}, "
        f"client processes {clients_growth:+.1%} (target: within 10%)"
    )
    result = {
        "server_rss_mb": {r: s["server"] for r, s in samples.items()},
        "clients_rss_mb": {r: s["clients"] for r, s in samples.items()},
        "server_growth": server_growth,
        "clients_growth": clients_growth,
    }
    write_json(args.json, result)


if __name__ == "__main__":
    main()
