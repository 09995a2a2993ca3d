"""What a study spends besides its rounds: 4 Fashion-MNIST cells with the quick study's settings
(12,000 training images over 10 clients, cnn width 16, batch 32, 1 local epoch), 3 rounds each,
run as ``fedws study`` two ways, side by side and interleaved in one invocation:

- shared (the default): every cell in one Flower simulation runtime;
- isolated (the baseline, ``--isolated``): each cell a ``fedws run`` process of its own (its own
  Ray start, imports, client processes and dataset loading).

    python benchmarks/study.py [--repeats 2] [--json PATH]

Per mode, the median over the repeats (and the spread): ``study_wall_s`` (the whole command),
``cells_round_s_sum`` (the sum of every cell's round times, metrics.csv ``round_s`` of rounds
0-3; round 0 is the server's evaluation of the initial model) and ``startup_s_per_cell`` =
(wall - round sum) / cells. Also ``round0_s_sum`` and ``runtime_start_in_round1_s``: how much
longer the first cell's round 1 took than the other cells' (it waits for Ray and the client
processes to start; the shared runtime pays it once, inside that round). Target: shared study
wall <= 1.15 x its round sum on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from measure import summary, write_json

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
    first = yaml.safe_load((out / rundir.STUDY).read_text())["cells"][0]["id"]
    rounds = round0 = 0.0
    round1: dict[str, float] = {}
    for cell in (out / "runs").iterdir():
        rows = rundir.read_csv(rundir.RunDir(cell).metrics)
        rounds += sum(float(r["round_s"]) for r in rows)
        round0 += sum(float(r["round_s"]) for r in rows if int(r["round"]) == 0)
        round1[cell.name] = next(float(r["round_s"]) for r in rows if int(r["round"]) == 1)
    others = [v for k, v in round1.items() if k != first]
    return {
        "study_wall_s": wall,
        "cells_round_s_sum": rounds,
        "startup_s_per_cell": (wall - rounds) / CELLS,
        # round 0 is the initial model's server evaluation: work, counted in the round sum
        "round0_s_sum": round0,
        # the first round of the first cell waits for the runtime's start (Ray, the client
        # processes' imports and data), the other cells' first rounds do not
        "runtime_start_in_round1_s": round1[first] - statistics.median(others),
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
    # the stricter reading: the runtime's start, paid inside the first round, as start-up
    start = shared["runtime_start_in_round1_s"]["median"]
    out["ratio_runtime_start_as_startup"] = out["study_wall_s"] / (out["cells_round_s_sum"] - start)
    keys = ("study_wall_s", "cells_round_s_sum", "round0_s_sum", "runtime_start_in_round1_s")
    keys += ("startup_s_per_cell",)
    print(f"{'mode':<10}" + "".join(f" {k:>26}" for k in keys))
    for mode in samples:
        m = out[mode]
        print(f"{mode:<10}" + "".join(f" {m[k]['median']:>26.2f}" for k in keys))
    print(
        f"shared: wall / round sum = {ratio:.3f} (target <= 1.15), "
        f"{out['ratio_runtime_start_as_startup']:.3f} with the runtime's start as start-up; "
        f"isolated: {iso['study_wall_s']['median'] / iso['cells_round_s_sum']['median']:.3f}"
    )
    write_json(args.json, out)


if __name__ == "__main__":
    main()
