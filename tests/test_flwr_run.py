"""`flwr run .` runs the same ServerApp and ClientApp through Flower's own CLI, called as the
README says, from a shell that has only activated the virtual environment."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import (
    FEDWS,
    REPO,
    bare_env,
    free_port,
    pids_with,
    stop_process_group,
    tiny_config_file,
)

pytestmark = pytest.mark.slow  # starts Ray or Flower processes


def superlinks_of(flwr_home: Path) -> list[int]:
    """PIDs of the detached local SuperLinks that `flwr run` started under ``flwr_home``."""
    return pids_with("flower-superlink", str(flwr_home))


def test_flwr_run_dot_runs_the_federation(tmp_path):
    config = tiny_config_file(tmp_path / "tiny.yaml", "federation.rounds=1")
    out = tmp_path / "run"
    home = tmp_path / "flwr-home"
    # the README's lines: activate the venv (flwr starts flower-superlink by name from PATH),
    # then `flwr run .`; nothing else puts Flower on PATH
    activate = Path(sys.executable).parent / "activate"
    flwr_run = [
        "flwr",
        "run",
        ".",
        "--run-config",
        f'config="{config}" out="{out}" set="federation.rounds=2"',
        "--federation-config",
        "num-supernodes=2",
        "--stream",
    ]
    script = (
        f". {shlex.quote(str(activate))}\n"
        "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1\n" + shlex.join(flwr_run)
    )
    # its own ports: a SuperLink already on Flower's default local ports (one a user left
    # running after `flwr run .`) would otherwise be used instead of starting one here
    ports = {
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
    }
    env = bare_env(FLWR_HOME=str(home), **ports)
    try:
        proc = subprocess.run(
            ["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
        )
        assert superlinks_of(home)  # flwr run leaves its local SuperLink running...
        stop = subprocess.run(  # ... and the README's fedws deploy stop-local stops it
            [*FEDWS, "deploy", "stop-local"], env=env, capture_output=True, text=True, timeout=60
        )
        assert stop.returncode == 0 and "stopped flwr run's local SuperLink" in stop.stdout
        assert not superlinks_of(home)
    finally:
        for pid in superlinks_of(home):  # detached: each leads its own process group
            stop_process_group(os.getpgid(pid))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds"] == 2  # the `set` override reached the ServerApp
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (home / "local-superlink").is_dir()  # this test's own SuperLink ran the federation
    assert not superlinks_of(home)
