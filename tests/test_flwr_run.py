"""`flwr run .` runs the same ServerApp and ClientApp through Flower's own CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from helpers import pids_with, stop_process_group

REPO = Path(__file__).resolve().parents[1]


def superlinks_of(flwr_home: Path) -> list[int]:
    """PIDs of the detached local SuperLinks that `flwr run` started under ``flwr_home``."""
    return pids_with("flower-superlink", str(flwr_home))


def test_flwr_run_dot_runs_the_federation(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "dataset": "synthetic",
                    "synthetic": {"train_size": 400, "test_size": 100, "image_size": 16},
                    "partition": {"kind": "iid", "num_clients": 2},
                },
                "model": {"arch": "cnn", "norm": "ws_gn", "width": 8},
                "federation": {"rounds": 1},
            }
        )
    )
    out = tmp_path / "run"
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    flwr = str(Path(sys.executable).parent / "flwr")
    try:
        proc = subprocess.run(
            [
                flwr,
                "run",
                ".",
                "--run-config",
                f'config="{config}" out="{out}" set="federation.rounds=2"',
                "--federation-config",
                "num-supernodes=2",
                "--stream",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        for pid in superlinks_of(home):  # detached: each leads its own process group
            stop_process_group(os.getpgid(pid))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds"] == 2  # the `set` override reached the ServerApp
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert not superlinks_of(home)
