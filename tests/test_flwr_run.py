"""`flwr run .` runs the same ServerApp and ClientApp through Flower's own CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def superlinks_of(flwr_home: Path) -> list[int]:
    """PIDs of the detached local SuperLinks that `flwr run` started under ``flwr_home``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            pids.append(int(proc.name))
    return pids


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgid(pid), sig)


def stop(pids: list[int]) -> None:
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        _signal_group(pid, signal.SIGKILL)


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
        stop(superlinks_of(home))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds"] == 2  # the `set` override reached the ServerApp
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert not superlinks_of(home)
