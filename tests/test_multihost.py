"""A secured deployment across hosts: network namespaces made by the test stand for machines,
the SuperLink on one, a SuperNode on each of three others, joined by veth pairs to a bridge on
the SuperLink's host, with addresses of TEST-NET-1 (192.0.2.0/24, RFC 5737: documentation
only, never routed). The certificate names the SuperLink's address alone; every host has its
own folders (keys, data, node state, Flower home) and its own copy of the data. One SuperNode is
killed mid-run: the run finishes with that client counted failed in the rounds after, its
reason in run.log. Every process, namespace and link made here is removed again.

Nothing is sent outside the test's namespaces: they have no route but 192.0.2.0/24 (and
their own loopback), no IPv6, and no link to the machine's own network."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import REPO, bare_env, pids_with, start_logged, stop_process_group

from app.rundir import read_csv
from app.tools.cli import main

pytestmark = pytest.mark.slow  # starts Flower processes

BIN = Path(sys.executable).parent
IP = shutil.which("ip") or "ip"
SUBNET = "192.0.2.0/24"
LINK_IP = "192.0.2.1"  # the SuperLink's host (the bridge's address)
NODE_IPS = ("192.0.2.11", "192.0.2.12", "192.0.2.13")  # SuperNode i: partition i
PORT = 9093  # the SuperLink's one port (Fleet and Control APIs), on a host of its own
ROUNDS = 3
LOST = 2  # the partition whose SuperNode is killed after round 1
TRAIN_SIZES = (150, 210, 270)  # each node's own copy of the data; an IID third is its shard
SERVER_TRAIN, TEST_SIZE = 120, 60  # the server's copy: only its test split is used
REASONS = ("Node Unavailable", "no longer connected", "no reply")  # sampling.py, Flower


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=30, check=False)


def must(*args: str) -> str:
    done = ip(*args)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


def capable(what: str, *args: str) -> None:
    """``ip *args``, which creates ``what``; the test is skipped where this machine cannot."""
    done = ip(*args)
    if done.returncode != 0:
        pytest.skip(f"cannot create {what} (ip {' '.join(args)}): {done.stderr.strip()}")


def in_ns(ns: str, *command: str | Path) -> list[str]:
    return [IP, "netns", "exec", ns, *map(str, command)]


class Hosts:
    """The namespaces: ``link`` holds a bridge with ``LINK_IP``; node namespace i holds
    ``NODE_IPS[i]`` on one end of a veth pair whose other end is a port of the bridge. Both
    ends are created inside the namespaces: the machine's own namespace gets no link and no
    address. ``remove`` deletes every namespace made (and so the links in them), after killing
    what still runs in one (``leftover`` names it: the deployment should have stopped it)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.link = f"{prefix}-link"
        self.nodes = [f"{prefix}-node{i}" for i in range(len(NODE_IPS))]
        self.made: list[str] = []
        self.leftover: dict[str, list[str]] = {}

    def _namespace(self, name: str) -> None:
        if self.made:
            must("netns", "add", name)
        else:
            capable("a network namespace", "netns", "add", name)
        self.made.append(name)
        ipv6 = "/proc/sys/net/ipv6/conf"
        if Path(ipv6).is_dir():  # no IPv6 link-local chatter: only the addresses below
            off = f"for f in all default; do echo 1 > {ipv6}/$f/disable_ipv6; done"
            subprocess.run(in_ns(name, "sh", "-c", off), check=True, timeout=30)
        must("-n", name, "link", "set", "lo", "up")

    def create(self) -> None:
        bridge = f"{self.prefix}br"
        self._namespace(self.link)
        capable("a bridge", "-n", self.link, "link", "add", bridge, "type", "bridge")
        must("-n", self.link, "addr", "add", f"{LINK_IP}/24", "dev", bridge)
        must("-n", self.link, "link", "set", bridge, "up")
        for i, (ns, address) in enumerate(zip(self.nodes, NODE_IPS, strict=True)):
            self._namespace(ns)
            port, end = f"{self.prefix}p{i}", f"{self.prefix}n{i}"
            pair = ("link", "add", port, "type", "veth", "peer", end, "netns", ns)
            capable("a veth pair between namespaces", "-n", self.link, *pair)
            must("-n", self.link, "link", "set", port, "master", bridge, "up")
            must("-n", ns, "addr", "add", f"{address}/24", "dev", end)
            must("-n", ns, "link", "set", end, "up")

    def routes(self, ns: str) -> list[str]:
        """Where ``ns`` can send: its IPv4 routes' destinations, then any IPv6 route."""
        lines = must("-n", ns, "-4", "route", "show").splitlines()
        lines += must("-n", ns, "-6", "route", "show").splitlines()
        return [line.split()[0] for line in lines if line.strip()]

    def remove(self) -> None:
        for ns in reversed(self.made):
            pids = ip("netns", "pids", ns).stdout.split()
            if pids:
                self.leftover[ns] = pids
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", ns)


@contextlib.contextmanager
def hosts(prefix: str):
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip command is not installed")
    net = Hosts(prefix)
    try:
        net.create()
        yield net
    finally:
        net.remove()


class Deployment:
    """The deployment's processes, each started in a host's namespace and a session of its own
    (process group = pid), its output in ``logs/<name>.log``."""

    def __init__(self, tmp_path: Path) -> None:
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, ns: str, command: list, cwd: Path, env: dict) -> subprocess.Popen:
        proc = start_logged(in_ns(ns, *command), self.logs / f"{name}.log", cwd, env)
        self.procs[name] = proc
        return proc

    def tails(self, lines: int = 30) -> str:
        """The last ``lines`` of each log, for a failure's message."""
        return "".join(
            f"\n--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            for log in sorted(self.logs.glob("*.log"))
        )

    def stop(self) -> None:
        """Last started, first stopped: the nodes before their SuperLink."""
        for proc in reversed(self.procs.values()):
            stop_process_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte IDX file (Fashion-MNIST's format)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + array.tobytes())


def write_data(folder: Path, train: int, seed: int) -> Path:
    """A Fashion-MNIST-shaped dataset of random 28x28 images and labels: ``train`` training
    and ``TEST_SIZE`` test images, in the four files of the original."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for split, n in (("train", train), ("t10k", TEST_SIZE)):
        write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), "u1"))
        write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n, "u1"))
    return folder


def prepare(tmp_path: Path) -> tuple[Path, list[Path]]:
    """The hosts' folders: the SuperLink's (every key, its Flower home pointing flwr at
    ``LINK_IP``, the server's data and config) and each SuperNode's (the CA certificate and
    its own key alone, its own data, state and Flower home)."""
    link = tmp_path / "link"
    certs = link / "certs"
    assert main(["deploy", "certs", str(certs), "--host", LINK_IP, "--nodes", "3"]) == 0
    (link / "flwr-home").mkdir()
    (link / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "hosts"\n\n[superlink.hosts]\n'
        f'address = "{LINK_IP}:{PORT}"\nroot-certificates = "{certs / "ca.crt"}"\n'
    )
    config = {
        "data": {
            "dataset": "fashion_mnist",
            "root": str(write_data(link / "data", SERVER_TRAIN, seed=9)),
            "val_fraction": 0.0,  # no evaluation messages: the rounds are train rounds only
            "partition": {"kind": "iid", "num_clients": len(NODE_IPS)},
        },
        # FedBN: each client's BN layers stay on its node, in that node's state folder
        "model": {"arch": "cnn", "norm": "bn", "width": 8},
        "federation": {"strategy": "fedbn", "rounds": ROUNDS},
    }
    (link / "config.yaml").write_text(yaml.safe_dump(config))
    nodes = []
    for i, train in enumerate(TRAIN_SIZES):
        node = tmp_path / f"node{i}"
        (node / "certs").mkdir(parents=True)
        for name in ("ca.crt", f"supernode-{i}", f"supernode-{i}.pub"):
            shutil.copy2(certs / name, node / "certs" / name)
        write_data(node / "data", train, seed=i)
        (node / "flwr-home").mkdir()
        nodes.append(node)
    return link, nodes


def san_addresses(cert: Path) -> list:
    from cryptography import x509

    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*names.get_values_for_type(x509.IPAddress), *names.get_values_for_type(x509.DNSName)]


PROBE = """import socket, sys, time
deadline = time.monotonic() + float(sys.argv[3])
while True:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.3)
"""


def reachable(ns: str, host: str, port: int, timeout: float = 90) -> bool:
    """Whether ``host:port`` accepts a connection from namespace ``ns`` within ``timeout``."""
    probe = in_ns(ns, sys.executable, "-c", PROBE, host, str(port), str(timeout))
    return subprocess.run(probe, capture_output=True, timeout=timeout + 30).returncode == 0


def rounds_done(out: Path) -> int:
    try:
        return max((int(r["round"]) for r in read_csv(out / "metrics.csv")), default=0)
    except (ValueError, KeyError):  # a row being written
        return 0


def start_deployment(dep: Deployment, net: Hosts, link: Path, nodes: list[Path]) -> None:
    """The SuperLink on its host, the three keys registered from there, a SuperNode on each
    node host, connecting to ``LINK_IP``."""
    certs, env = link / "certs", bare_env(FLWR_HOME=str(link / "flwr-home"))
    superlink = ["superlink", "--certs", certs, "--host", LINK_IP, "--port", str(PORT)]
    dep.start("superlink", net.link, [BIN / "fedws", "deploy", *superlink], link, env)
    assert reachable(net.nodes[0], LINK_IP, PORT), "SuperLink not reachable:" + dep.tails()
    for i in range(len(nodes)):
        register = [BIN / "flwr", "supernode", "register", certs / f"supernode-{i}.pub"]
        reg = subprocess.run(
            in_ns(net.link, *register), env=env, capture_output=True, text=True, timeout=120
        )
        assert reg.returncode == 0 and "registered" in reg.stdout, reg.stdout + reg.stderr
    for i, (ns, node) in enumerate(zip(net.nodes, nodes, strict=True)):
        command = [
            BIN / "fedws",
            "deploy",
            "supernodes",
            "--certs",
            node / "certs",
            "--count",
            "1",
            "--first-partition",
            str(i),
            "--num-partitions",
            str(len(nodes)),
            "--superlink",
            f"{LINK_IP}:{PORT}",
            "--data-path",
            node / "data",
            "--state-dir",
            node / "state",
        ]
        node_env = bare_env(FLWR_HOME=str(node / "flwr-home"), FEDWS_CACHE=str(node / "cache"))
        dep.start(f"node{i}", ns, command, node, node_env)


def run_and_lose_a_node(dep: Deployment, net: Hosts, link: Path, out: Path) -> int:
    """``flwr run`` from the SuperLink's host; once round 1 is in metrics.csv, SuperNode
    ``LOST`` is killed (SIGKILL to its whole process group). The rounds done at the kill."""
    run_config = f'config="{link / "config.yaml"}" out="{out}"'
    flwr = [BIN / "flwr", "run", ".", "hosts", "--stream", "--run-config", run_config]
    env = bare_env(FLWR_HOME=str(link / "flwr-home"))
    run = dep.start("flwr-run", net.link, flwr, REPO, env)
    deadline = time.monotonic() + 420
    while rounds_done(out) < 1:
        assert run.poll() is None, "flwr run ended before round 1:" + dep.tails()
        assert time.monotonic() < deadline, "round 1 never finished:" + dep.tails()
        time.sleep(0.5)
    done = rounds_done(out)
    os.killpg(dep.procs[f"node{LOST}"].pid, signal.SIGKILL)
    assert dep.procs[f"node{LOST}"].wait(timeout=30) == -signal.SIGKILL
    assert run.wait(timeout=480) == 0, dep.tails()
    return done


def check_rounds(out: Path, killed_after: int) -> None:
    """Every round ran; all three clients trained before the kill, the two others after it
    (each on a third of its own node's copy of the data), and the lost one is counted failed
    in the last round, with its reason in run.log."""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == ROUNDS, summary
    metrics = {int(r["round"]): r for r in read_csv(out / "metrics.csv")}
    assert sorted(metrics) == list(range(ROUNDS + 1))
    counts = {r: (int(m["clients_ok"]), int(m["clients_failed"])) for r, m in metrics.items()}
    assert all(counts[r] == (3, 0) for r in range(1, killed_after + 1)), counts
    assert all(counts[r][0] >= 2 for r in range(killed_after + 1, ROUNDS + 1)), counts
    assert counts[ROUNDS] == (2, 1), counts
    assert sum(f for r, (_, f) in counts.items() if r > killed_after) >= 1, counts
    trained: dict[int, dict[int, int]] = {}
    for row in read_csv(out / "clients.csv"):
        if row["num_examples"]:
            trained.setdefault(int(row["round"]), {})[int(row["client"])] = int(row["num_examples"])
    shards = {c: n // len(NODE_IPS) for c, n in enumerate(TRAIN_SIZES)}
    assert trained[1] == shards, trained  # each node read its own data folder
    assert trained[ROUNDS] == {c: n for c, n in shards.items() if c != LOST}, trained
    log = (out / "run.log").read_text()
    reasons = re.findall(rf"train: client {LOST} \(node \d+\) failed: (.+)", log)
    assert reasons and all(any(r in why for r in REASONS) for why in reasons), reasons
    assert not re.search(rf"train: client (?!{LOST} )\d+ \(node \d+\) failed", log)


def check_node_state(out: Path, nodes: list[Path], killed_after: int) -> None:
    """Each node kept its own client's BN layers in its own state folder: the two newest
    rounds on the nodes that lasted, none after its last round on the lost one; none on the
    server."""
    for i, node in enumerate(nodes):
        (run_folder,) = (node / "state").iterdir()
        kept = {p.name for p in run_folder.iterdir()}
        if i != LOST:
            assert kept == {f"client-{i}.round-{r}.pt" for r in (ROUNDS - 1, ROUNDS)}, kept
        else:
            rounds = {int(re.fullmatch(rf"client-{i}\.round-(\d+)\.pt", k)[1]) for k in kept}
            assert killed_after in rounds and max(rounds) < ROUNDS, kept
    assert not [p for p in out.rglob("*") if "client-" in p.name]


def test_a_deployment_across_hosts_loses_a_node_and_finishes(tmp_path, no_fedws_data):
    link, nodes = prepare(tmp_path)
    assert san_addresses(link / "certs" / "superlink.crt") == [ipaddress.ip_address(LINK_IP)]
    out = link / "run"
    # a name of its own: never one a killed earlier run may have left behind
    with hosts(f"fw{secrets.token_hex(2)}") as net:
        for ns in (net.link, *net.nodes):  # nothing to send anywhere but TEST-NET-1
            assert net.routes(ns) == [SUBNET], (ns, net.routes(ns))
        dep = Deployment(tmp_path)
        try:
            start_deployment(dep, net, link, nodes)
            killed_after = run_and_lose_a_node(dep, net, link, out)
        finally:
            dep.stop()
    assert killed_after < ROUNDS, "the run ended before the node was killed"
    check_rounds(out, killed_after)
    check_node_state(out, nodes, killed_after)
    assert net.leftover == {}  # the deployment's processes all stopped with their groups
    listed = {line.split()[0] for line in must("netns", "list").splitlines() if line.strip()}
    assert not listed & set(net.made)
    assert net.prefix not in must("-br", "link", "show")  # no link in this namespace either
    assert pids_with(str(tmp_path)) == []
