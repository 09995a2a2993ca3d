"""How a round's cost grows with the number of clients when the work does not: 10 clients a
round drawn from 100 and from 1,000 clients, each holding 60 Fashion-MNIST training images, so
a round trains the same 600 images in both; 5 rounds, cnn + ws_gn (width 16), diagnostics on,
10 clients a round evaluated too, the global test on the 10,000 test images every round.

    python benchmarks/scale.py [--json PATH]

Each size is a ``fedws run`` in a process of its own; its process tree (driver, Ray, client
actors) is sampled for RSS every 0.5 s. JSON: ``s_per_round_100``, ``s_per_round_1000`` (mean
``round_s`` of rounds 2-5: round 1 includes the first query of the nodes and first touches),
``peak_rss_mb_100``, ``peak_rss_mb_1000``, and the ratios. Target: both ratios <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from measure import run_with_peak_rss

from app import rundir

REPO = Path(__file__).resolve().parents[1]
PER_ROUND, PER_CLIENT = 10, 60


def config(clients: int) -> dict:
    return {
        "data": {
            "dataset": "fashion_mnist",
            "train_samples": clients * PER_CLIENT,
            "val_fraction": 0.1,
            "partition": {"kind": "iid", "num_clients": clients},
        },
        "model": {"arch": "cnn", "norm": "ws_gn", "width": 16},
        "federation": {
            "rounds": 5,
            "fraction_train": PER_ROUND / clients,
            "fraction_evaluate": PER_ROUND / clients,
        },
    }


def one(clients: int, root: Path) -> dict[str, float]:
    path = root / f"scale-{clients}.yaml"
    path.write_text(yaml.safe_dump(config(clients)))
    out = root / f"run-{clients}"
    command = [sys.executable, "-m", "app.tools.cli", "run", str(path), "-o", str(out)]
    code, wall, peak = run_with_peak_rss([*command, "--no-progress"], REPO, root / "log.txt")
    if code != 0:
        raise SystemExit(f"{clients} clients failed:\n{(root / 'log.txt').read_text()[-2000:]}")
    rows = rundir.read_csv(rundir.RunDir(out).metrics)
    rounds = [float(r["round_s"]) for r in rows if int(r["round"]) > 1]
    first = next(float(r["round_s"]) for r in rows if int(r["round"]) == 1)
    return {
        "s_per_round": statistics.mean(rounds),
        "first_round_s": first,
        "peak_rss_mb": peak,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        raise SystemExit("needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist")
    results = {}
    for clients in (100, 1000):
        with tempfile.TemporaryDirectory() as tmp:
            results[clients] = one(clients, Path(tmp))
        r = results[clients]
        print(
            f"{clients:>5} clients: {r['s_per_round']:.2f} s/round (round 1: "
            f"{r['first_round_s']:.1f} s), peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"wall {r['wall_s']:.0f} s",
            flush=True,
        )
    out = {
        "s_per_round_100": results[100]["s_per_round"],
        "s_per_round_1000": results[1000]["s_per_round"],
        "peak_rss_mb_100": results[100]["peak_rss_mb"],
        "peak_rss_mb_1000": results[1000]["peak_rss_mb"],
        "first_round_s_100": results[100]["first_round_s"],
        "first_round_s_1000": results[1000]["first_round_s"],
        "ratio_s_per_round": results[1000]["s_per_round"] / results[100]["s_per_round"],
        "ratio_peak_rss": results[1000]["peak_rss_mb"] / results[100]["peak_rss_mb"],
        "cpus": os.cpu_count(),
    }
    print(
        f"1000 / 100 clients: time per round {out['ratio_s_per_round']:.3f}, peak memory "
        f"{out['ratio_peak_rss']:.3f} (targets <= 1.3)"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
