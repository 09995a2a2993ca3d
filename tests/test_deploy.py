"""A secured deployment on 127.0.0.1 with real Flower processes: `fedws deploy certs`, a
SuperLink with TLS and SuperNode authentication, two registered SuperNodes, `flwr run`; a
SuperNode whose key was never registered is refused. Every process started here is stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    FEDWS,
    REPO,
    bare_env,
    free_port,
    pids_with,
    start_logged,
    stop_process_group,
    tiny_config_file,
    wait_for_port,
)

from app.tools.cli import main

pytestmark = pytest.mark.slow  # starts Ray or Flower processes

BIN = Path(sys.executable).parent


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
    # FedBN: the clients keep BN layers, which must live on the nodes
    config = tiny_config_file(
        tmp_path / "tiny.yaml", "model.norm=bn", "federation={rounds: 2, strategy: fedbn}"
    )
    # no Flower on PATH: `fedws deploy` must start Flower (and what Flower starts by name,
    # flower-superexec) from its own environment, as for a user who never activated the venv
    env = bare_env(FLWR_HOME=str(home))
    fedws = [*FEDWS, "deploy"]
    procs: list[subprocess.Popen] = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        procs.append(start_logged(command, tmp_path / f"{name}.log", REPO, env))
        return procs[-1]

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
    assert pids_with(str(tmp_path)) == []


def test_sigterm_stops_fedws_deploy_and_its_flower_process_promptly(tmp_path):
    port = free_port()
    command = [*FEDWS, "deploy", "superlink", "--insecure", "--host", "127.0.0.1"]
    env = bare_env(FLWR_HOME=str(tmp_path / "flwr-home"))
    proc = start_logged([*command, "--port", str(port)], tmp_path / "link.log", tmp_path, env)
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


def _flwr_home(tmp_path: Path, certs: Path, port: int) -> Path:
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedws-test"\n\n[superlink.fedws-test]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    return home


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def test_registered_nodes_survive_a_superlink_crash(tmp_path):
    """The SuperLink keeps its state in certs/superlink.db by default: after a kill -9 and a
    restart on the same database, the registered node (still running, never re-registered)
    is back online under its node id, where an in-memory SuperLink would answer it with 401."""
    certs = tmp_path / "certs"
    assert main(["deploy", "certs", str(certs), "--nodes", "1"]) == 0
    port = free_port()
    env = bare_env(FLWR_HOME=str(_flwr_home(tmp_path, certs, port)))
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"  # appended to: the SuperLink's restart keeps its first log
        procs.append(start_logged([*FEDWS, "deploy", *args], log, REPO, env, append=True))
        return procs[-1]

    def online() -> list[str]:
        listing = subprocess.run(
            [str(BIN / "flwr"), "supernode", "list", "--format", "json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if listing.returncode != 0:
            return []
        nodes = json.loads(listing.stdout).get("nodes", [])
        return [str(n["node-id"]) for n in nodes if n.get("status") == "online"]

    link = ["superlink", "--certs", str(certs), "--port", str(port)]
    try:
        start("link", *link)
        wait_for_port(port)
        db = certs / "superlink.db"
        assert db.is_file() and db.stat().st_mode & 0o777 == 0o600
        register = [str(BIN / "flwr"), "supernode", "register", str(certs / "supernode-0.pub")]
        reg = subprocess.run(register, env=env, capture_output=True, text=True, timeout=60)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        node = start(
            "node",
            "supernodes",
            "--certs",
            str(certs),
            "--count",
            "1",
            "--superlink",
            f"127.0.0.1:{port}",
            "--base-port",
            str(free_port()),
            "--state-dir",
            str(tmp_path / "state"),
        )
        _wait_for(lambda: online(), 60, "the node never came online")
        (before,) = online()

        (superlink,) = pids_with("flower-superlink", str(port))
        os.kill(superlink, signal.SIGKILL)  # a crash: nothing is saved on the way out
        assert procs[0].wait(timeout=30) != 0
        start("link", *link)
        wait_for_port(port)
        _wait_for(lambda: online() == [before], 90, "the node did not come back online")
        assert node.poll() is None  # it kept running and reconnected by itself
        node_log = tmp_path / "node.log"  # the SuperLink may list it before its line is written
        _wait_for(lambda: "Connection successful" in node_log.read_text(), 30, "no reconnect line")
        assert "Connection successful" in node_log.read_text()
    finally:
        for proc in procs:
            stop_process_group(proc.pid)
            proc.wait(timeout=20)
    assert pids_with(str(tmp_path)) == []


def test_a_node_without_tls_against_a_tls_superlink_is_told_why_it_cannot_connect(tmp_path):
    certs = tmp_path / "certs"
    assert main(["deploy", "certs", str(certs), "--nodes", "1"]) == 0
    port = free_port()
    env = bare_env(FLWR_HOME=str(tmp_path / "flwr-home"))
    procs: list[subprocess.Popen] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("link", "node")}
    try:
        for name, args in (
            ("link", ["superlink", "--certs", str(certs), "--port", str(port)]),
            (
                "node",
                [
                    "supernodes",
                    "--insecure",  # the mistake: this SuperLink has TLS
                    "--count",
                    "1",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--base-port",
                    str(free_port()),
                    "--state-dir",
                    str(tmp_path / "state"),
                ],
            ),
        ):
            procs.append(start_logged([*FEDWS, "deploy", *args], logs[name], REPO, env))
            if name == "link":
                wait_for_port(port)
        _wait_for(lambda: "keeps failing to connect" in logs["node"].read_text(), 60, "no hint")
        (hint,) = [line for line in logs["node"].read_text().splitlines() if "keeps fail" in line]
        assert hint.startswith(f"fedws: SuperNode 0 keeps failing to connect to 127.0.0.1:{port}")
        assert "It may require TLS" in hint and "--root-certificates <certs>/ca.crt" in hint
        assert "Connection attempt failed" in logs["node"].read_text()  # Flower's lines relayed
    finally:
        for proc in procs:
            stop_process_group(proc.pid)
            proc.wait(timeout=20)
    assert pids_with(str(tmp_path)) == []
