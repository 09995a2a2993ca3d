"""Seconds per round of a deployed federation: one SuperLink and two SuperNodes on this machine
(``fedws deploy superlink --insecure``, ``fedws deploy supernodes --insecure``), runs submitted
with ``flwr run``; with ``--baseline``, also from a baseline checkout, interleaved, against the
same SuperLink and nodes (each run's app comes from its own checkout, on the server and the
nodes).

    python benchmarks/deployment.py [--rounds 4] [--repeats 3] [--json PATH]
    git worktree add /tmp/fedws-baseline <commit>
    python benchmarks/deployment.py --baseline /tmp/fedws-baseline

Workload: 2 clients of 300 synthetic 16x16 images, ``cnn`` width 8 + ``ws_gn``, 1 local epoch,
batch 32, the global model tested every round: small enough that a round is what the
deployment costs besides the clients' arithmetic. Seconds per round: ``metrics.csv``'s
``round_s`` of every round but the first, the median over the repeats with the spread.
JSON keys: this_s_per_round, and with --baseline baseline_s_per_round, ratio (this /
baseline); spread.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from measure import (
    free_port,
    start_logged,
    stop_process_group,
    summary,
    wait_for_port,
    write_json,
)

from app import rundir

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKLOAD = {
    "seed": 0,
    "data": {
        "dataset": "synthetic",
        "synthetic": {"train_size": 600, "test_size": 200, "image_size": 16},
        "val_fraction": 0.0,
        "partition": {"kind": "iid", "num_clients": 2},
    },
    "model": {"arch": "cnn", "norm": "ws_gn", "width": 8},
    "train": {"batch_size": 32, "local_epochs": 1},
}


def flwr_run(app: Path, config: Path, out: Path, env: dict[str, str]) -> list[float]:
    """``flwr run`` of ``app`` against the bench SuperLink; the run's seconds per round."""
    run_config = f'config="{config}" out="{out}"'
    command = [str(BIN / "flwr"), "run", str(app), "fedws-bench", "--stream"]
    done = subprocess.run(
        [*command, "--run-config", run_config],
        cwd=app,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary_file = out / "summary.json"
    if done.returncode != 0 or not summary_file.is_file():
        tail = (done.stdout + done.stderr)[-2000:]
        raise RuntimeError(f"{shlex.join(command)} in {app} failed:\n{tail}")
    status = json.loads(summary_file.read_text())
    if status["status"] != "completed":
        raise RuntimeError(f"the run in {out} ended {status['status']}: {status['error']}")
    rows = rundir.read_csv(rundir.RunDir(out).metrics)
    return [float(r["round_s"]) for r in rows if int(r["round"]) > 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a checkout to compare with this one")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each side")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    baseline = args.baseline.resolve() if args.baseline else None
    if baseline is not None and not (baseline / "pyproject.toml").is_file():
        parser.error(f"--baseline {baseline}: not a fedws checkout (no pyproject.toml)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "bench.yaml"
        workload = {**WORKLOAD, "federation": {"strategy": "fedavg", "rounds": args.rounds}}
        config.write_text(yaml.safe_dump(workload))
        port = free_port()
        home = root / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedws-bench"\n\n[superlink.fedws-bench]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n'
        )
        env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        fedws = [sys.executable, "-m", "app.tools.cli", "deploy"]
        procs = []
        logs = root / "logs"
        logs.mkdir()
        try:
            for name, extra in (
                (
                    "superlink",
                    ["superlink", "--port", str(port), "--database", str(root / "link.db")],
                ),
                (
                    "supernodes",
                    [
                        "supernodes",
                        "--count",
                        "2",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--base-port",
                        str(free_port()),
                        "--state-dir",
                        str(root / "state"),
                    ],
                ),
            ):
                log = logs / f"{name}.log"
                procs.append(start_logged([*fedws, *extra, "--insecure"], log, REPO, env))
                if name == "superlink":
                    wait_for_port(port)
            sides = [("this", REPO)] + ([("baseline", baseline)] if baseline else [])
            seconds: dict[str, list[float]] = {side: [] for side, _ in sides}
            for repeat in range(args.repeats):
                for side, app in sides if repeat % 2 == 0 else sides[::-1]:
                    out = root / f"{side}-{repeat}"
                    seconds[side] += flwr_run(app, config, out, env)
                print(
                    f"[{repeat + 1}/{args.repeats}] s/round so far: "
                    + ", ".join(f"{k} {summary(v)['median']:.3f}" for k, v in seconds.items()),
                    flush=True,
                )
        finally:
            for proc in reversed(procs):  # each started in its own session: pgid == pid
                stop_process_group(proc.pid)
                proc.wait(timeout=20)
    stats = {side: summary(v) for side, v in seconds.items()}
    for side, st in stats.items():
        name = "this checkout" if side == "this" else f"baseline {baseline}"
        print(
            f"{name:<60} {st['median']:7.3f} s/round ({st['min']:.3f}-{st['max']:.3f}, n={st['n']})"
        )
    result = {"this_s_per_round": stats["this"]["median"], "spread": stats}
    if baseline is not None:
        ratio = stats["this"]["median"] / stats["baseline"]["median"]
        print(f"this / baseline = {ratio:.3f}")
        result |= {
            "baseline_s_per_round": stats["baseline"]["median"],
            "ratio": ratio,
            "baseline": str(baseline),
        }
    write_json(args.json, {**result, "rounds": args.rounds, "repeats": args.repeats})


if __name__ == "__main__":
    main()
