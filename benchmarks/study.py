"""What a study spends besides its rounds: 4 Fashion-MNIST cells with the quick study's settings
(12,000 training images over 10 clients, cnn width 16, batch 32, 1 local epoch), 3 rounds each,
run as ``fedws study`` two ways, side by side and interleaved in one invocation:

- shared (the default): every cell in one Flower simulation runtime;
- isolated (the baseline, ``--isolated``): each cell a ``fedws run`` process of its own (its own
  Ray start, imports, client processes and dataset loading).

    python benchmarks/study.py [--repeats 2] [--json PATH]

Per mode, the median over the repeats (and the spread): ``study_wall_s`` (the whole command),
``cells_round_s_sum`` (the sum of every cell's round times, metrics.csv ``round_s`` of rounds
1-3) and ``startup_s_per_cell`` = (wall - round sum) / cells. Target: shared study wall <= 1.15 x
its round sum on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from measure import summary

from app import rundir

REPO = Path(__file__).resolve().parents[1]
CELLS = 4
STUDY = {
    "base": str(REPO / "configs" / "quickstart.yaml"),
    "overrides": {"data.train_samples": 12000, "federation.rounds": 3},
    "grid": {
        "model.norm": ["bn", "ws_gn"],
        "data.partition": [{"kind": "iid"}, {"kind": "dirichlet", "alpha": 0.1}],
    },
}


def one(mode: str, root: Path) -> dict[str, float]:
    study = root / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    out = root / "out"
    command = [sys.executable, "-m", "app.tools.cli", "study", str(study), "-o", str(out)]
    command += ["--no-progress"] + (["--isolated"] if mode == "isolated" else [])
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode} study failed:\n{proc.stderr[-2000:]}")
    rounds = 0.0
    for cell in (out / "runs").iterdir():
        rows = rundir.read_csv(rundir.RunDir(cell).metrics)
        rounds += sum(float(r["round_s"]) for r in rows if int(r["round"]) > 0)
    return {
        "study_wall_s": wall,
        "cells_round_s_sum": rounds,
        "startup_s_per_cell": (wall - rounds) / CELLS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        raise SystemExit("needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist")
    samples: dict[str, list[dict[str, float]]] = {"shared": [], "isolated": []}
    for repeat in range(args.repeats):  # interleaved: shared, isolated, shared, isolated...
        for mode in samples:
            with tempfile.TemporaryDirectory() as tmp:
                result = one(mode, Path(tmp))
            samples[mode].append(result)
            print(
                f"[{repeat + 1}/{args.repeats}] {mode}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in result.items()),
                flush=True,
            )
    out: dict[str, object] = {"cells": CELLS, "rounds_per_cell": 3, "cpus": os.cpu_count()}
    for mode, runs in samples.items():
        out[mode] = {key: summary([r[key] for r in runs]) for key in runs[0]}
    shared = out["shared"]
    ratio = shared["study_wall_s"]["median"] / shared["cells_round_s_sum"]["median"]
    out["study_wall_s"] = shared["study_wall_s"]["median"]
    out["cells_round_s_sum"] = shared["cells_round_s_sum"]["median"]
    out["startup_s_per_cell"] = shared["startup_s_per_cell"]["median"]
    out["ratio_wall_to_rounds"] = ratio
    iso = out["isolated"]
    print(f"{'mode':<10} {'study wall s':>13} {'round sum s':>12} {'start-up s/cell':>16}")
    for mode in samples:
        m = out[mode]
        print(
            f"{mode:<10} {m['study_wall_s']['median']:>13.1f} "
            f"{m['cells_round_s_sum']['median']:>12.1f} {m['startup_s_per_cell']['median']:>16.2f}"
        )
    print(
        f"shared: wall / round sum = {ratio:.3f} (target <= 1.15); isolated: "
        f"{iso['study_wall_s']['median'] / iso['cells_round_s_sum']['median']:.3f}"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
