"""How a round's cost grows with the number of clients when the work does not: 10 clients a
round drawn from 10, 100 and 1,000 clients, each holding 60 Fashion-MNIST training images, so
a round trains the same 600 images in all three; 5 rounds, cnn + ws_gn (width 16), diagnostics
on, 10 clients a round evaluated too, the global test on the 10,000 test images every round.

    python benchmarks/scale.py [--json PATH] [--repeats 2]

Each size is a ``fedws run`` in a process of its own, the sizes interleaved (10, 100, 1000,
10, 100, 1000, ...); its process tree (driver, Ray, client actors) is sampled every 0.5 s for
the sum of its RSS (what the issue asks: shared pages counted once per process) and of its
PSS (shared pages split between the processes sharing them: the memory really held).
Per size, the median over the repeats: s/round (``round_s`` of rounds 2-5, pooled: round 1
includes the first query of the nodes and first touches), round 1, peak RSS and PSS.
JSON: ``s_per_round_100``, ``s_per_round_1000``, ``peak_rss_mb_100``, ``peak_rss_mb_1000``
(and ``_10``, ``peak_pss_mb_*``, ``first_round_s_*``), the 1000/100 ratios, and the memory
each client adds (PSS, from 10 to 1,000 clients). Target: both ratios <= 1.3.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import yaml
from measure import run_with_peak_memory, summary, write_json

from app import rundir

REPO = Path(__file__).resolve().parents[1]
PER_ROUND, PER_CLIENT, SIZES = 10, 60, (10, 100, 1000)


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


def one(clients: int, root: Path) -> dict:
    path = root / f"scale-{clients}.yaml"
    path.write_text(yaml.safe_dump(config(clients)))
    out = root / f"run-{clients}"
    command = [sys.executable, "-m", "app.tools.cli", "run", str(path), "-o", str(out)]
    log = root / "log.txt"
    code, wall, rss, pss = run_with_peak_memory([*command, "--no-progress"], REPO, log)
    if code != 0:
        raise SystemExit(f"{clients} clients failed:\n{log.read_text()[-2000:]}")
    rows = rundir.read_csv(rundir.RunDir(out).metrics)
    return {
        "rounds_s": [float(r["round_s"]) for r in rows if int(r["round"]) > 1],
        "first_round_s": next(float(r["round_s"]) for r in rows if int(r["round"]) == 1),
        "peak_rss_mb": rss,
        "peak_pss_mb": pss,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        raise SystemExit("needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist")
    runs: dict[int, list[dict]] = {n: [] for n in SIZES}
    for repeat in range(args.repeats):
        for clients in SIZES:
            with tempfile.TemporaryDirectory() as tmp:
                r = one(clients, Path(tmp))
            runs[clients].append(r)
            print(
                f"[{repeat + 1}/{args.repeats}] {clients:>5} clients: "
                f"{statistics.median(r['rounds_s']):.2f} s/round (round 1: "
                f"{r['first_round_s']:.1f} s), peak RSS sum {r['peak_rss_mb']:.0f} MB, "
                f"PSS {r['peak_pss_mb']:.0f} MB, wall {r['wall_s']:.0f} s",
                flush=True,
            )
    out: dict = {"cpus": os.cpu_count(), "repeats": args.repeats, "spread": {}}
    for n, rs in runs.items():
        per_round = summary([t for r in rs for t in r["rounds_s"]])
        out["spread"][n] = {"s_per_round": per_round}
        out[f"s_per_round_{n}"] = per_round["median"]
        for key in ("first_round_s", "peak_rss_mb", "peak_pss_mb"):
            values = summary([r[key] for r in rs])
            out["spread"][n][key] = values
            out[f"{key}_{n}"] = values["median"]
    out["ratio_s_per_round"] = out["s_per_round_1000"] / out["s_per_round_100"]
    out["ratio_peak_rss"] = out["peak_rss_mb_1000"] / out["peak_rss_mb_100"]
    out["ratio_peak_pss"] = out["peak_pss_mb_1000"] / out["peak_pss_mb_100"]
    out["pss_mb_per_client"] = (out["peak_pss_mb_1000"] - out["peak_pss_mb_10"]) / 990
    print(f"{'clients':>7} {'s/round':>8} {'round 1 s':>9} {'peak RSS sum MB':>16} {'PSS MB':>7}")
    for n in SIZES:
        print(
            f"{n:>7} {out[f's_per_round_{n}']:>8.2f} {out[f'first_round_s_{n}']:>9.1f} "
            f"{out[f'peak_rss_mb_{n}']:>16.0f} {out[f'peak_pss_mb_{n}']:>7.0f}"
        )
    print(
        f"1000 / 100 clients: time per round {out['ratio_s_per_round']:.3f}, peak RSS sum "
        f"{out['ratio_peak_rss']:.3f}, PSS {out['ratio_peak_pss']:.3f} (targets <= 1.3); "
        f"each client adds {1024 * out['pss_mb_per_client']:.0f} KB (PSS, 10 -> 1,000 clients)"
    )
    write_json(args.json, out)


if __name__ == "__main__":
    main()
