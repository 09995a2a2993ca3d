"""A secured deployment on 127.0.0.1 with real Flower processes: `fedws deploy certs`, a
SuperLink with TLS and SuperNode authentication, two registered SuperNodes, `flwr run`; a
SuperNode whose key was never registered is refused. Every process started here is stopped."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import FEDWS, REPO, bare_env, free_port, pids_with, stop_process_group

from app.tools.cli import main

pytestmark = pytest.mark.slow  # starts Ray or Flower processes

BIN = Path(sys.executable).parent


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def test_secured_deployment_runs_and_refuses_an_unregistered_node(tmp_path):
    certs, home, out = tmp_path / "certs", tmp_path / "flwr-home", tmp_path / "run"
    node_state = tmp_path / "node-state"  # the nodes' own storage, not the server's
    assert main(["deploy", "certs", str(certs), "--nodes", "3"]) == 0
    port = free_port()
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedws-test"\n\n[superlink.fedws-test]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "dataset": "synthetic",
                    "synthetic": {"train_size": 400, "test_size": 100, "image_size": 16},
                    "partition": {"kind": "iid", "num_clients": 2},
                },
                # FedBN: the clients keep BN layers, which must live on the nodes
                "model": {"arch": "cnn", "norm": "bn", "width": 8},
                "federation": {"rounds": 2, "strategy": "fedbn"},
            }
        )
    )
    # no Flower on PATH: `fedws deploy` must start Flower (and what Flower starts by name,
    # flower-superexec) from its own environment, as for a user who never activated the venv
    env = bare_env(FLWR_HOME=str(home))
    fedws = [*FEDWS, "deploy"]
    files = contextlib.ExitStack()
    logs = {
        name: files.enter_context((tmp_path / f"{name}.log").open("w"))
        for name in ("link", "nodes", "intruder")
    }
    procs: list[subprocess.Popen] = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=logs[name],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    try:
        start(
            "link",
            [
                *fedws,
                "superlink",
                "--certs",
                str(certs),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
        )
        wait_for_port(port)
        for i in (0, 1):
            reg = subprocess.run(
                [str(BIN / "flwr"), "supernode", "register", str(certs / f"supernode-{i}.pub")],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert reg.returncode == 0 and "registered" in reg.stdout, reg.stdout + reg.stderr
        start(
            "nodes",
            [
                *fedws,
                "supernodes",
                "--certs",
                str(certs),
                "--count",
                "2",
                "--superlink",
                f"127.0.0.1:{port}",
                "--base-port",
                str(free_port(2)),
                "--state-dir",
                str(node_state),
            ],
        )
        intruder = start(
            "intruder",
            [
                *fedws,
                "supernodes",
                "--certs",
                str(certs),
                "--count",
                "1",
                "--first-partition",
                "2",
                "--num-partitions",
                "3",
                "--superlink",
                f"127.0.0.1:{port}",
                "--base-port",
                str(free_port()),
            ],
        )
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                ".",
                "fedws-test",
                "--stream",
                "--run-config",
                f'config="{config}" out="{out}"',
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["rounds"] == 2
        assert (out / "checkpoints" / "last.ckpt").is_file()
        # each client's BN layers were kept on its node, under the node's state-dir
        (run_folder,) = node_state.iterdir()
        kept = sorted(p.name for p in run_folder.iterdir())
        assert kept == [f"client-{c}.round-{r}.pt" for c in (0, 1) for r in (1, 2)]
        assert not [p for p in out.rglob("*") if "client-" in p.name]  # none on the server

        assert intruder.wait(timeout=120) != 0  # its key is not registered: refused
        assert "Failed to activate SuperNode" in (tmp_path / "intruder.log").read_text()
    finally:
        for proc in procs:  # each started in its own session: pgid == pid
            stop_process_group(proc.pid)
            proc.wait(timeout=20)
        files.close()
    assert pids_with(str(tmp_path)) == []


def test_sigterm_stops_fedws_deploy_and_its_flower_process_promptly(tmp_path):
    port = free_port()
    command = [*FEDWS, "deploy", "superlink", "--insecure", "--host", "127.0.0.1"]
    with (tmp_path / "link.log").open("w") as log:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=tmp_path,
            env=bare_env(FLWR_HOME=str(tmp_path / "flwr-home")),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_port(port)
            children = pids_with("flower-superlink", str(port))
            assert children, (tmp_path / "link.log").read_text()
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)  # to fedws alone, as a service manager would
            code = proc.wait(timeout=60)
            stopped_s = time.monotonic() - start
        finally:
            stop_process_group(proc.pid)
    assert code == 143
    assert stopped_s < 5, f"took {stopped_s:.1f} s"
    assert not pids_with("flower-superlink", str(port))
