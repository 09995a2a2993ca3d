"""A secured Flower deployment: certificates and keys, a SuperLink, one SuperNode per GPU.

Everything runs through Flower's own processes (``flower-superlink``, ``flower-supernode``) and
CLI (``flwr supernode register``, ``flwr run``); this module prepares their inputs, starts them
with this environment's ``bin/`` on ``PATH`` and stops them together:

- ``make_certs``: a CA, a SuperLink certificate whose SANs are the given hosts, and one EC
  (NIST P-384) key pair per SuperNode in OpenSSH format, the format Flower 1.42 reads for
  SuperNode authentication; made with the ``cryptography`` library.
- ``superlink_command`` / ``supernode_command``: Flower 1.42's flags (one HTTPS port for the
  Fleet, Control and Runtime APIs; SuperNode auth on; runtime dependency installation off, so
  the nodes use the installed environment; a state database file, so registered nodes and
  their keys survive a SuperLink restart).

Flower 1.42 serves the Control API (``flwr run``, ``flwr supernode register``) on the Fleet
API's address, with no way to bind it apart (``--control-api-address`` is deprecated and
ignored) and, outside Flower Enterprise's OIDC login, no authentication: whoever reaches the
port can submit runs and register node keys. Hence the loopback default and the warning of
``exposure_warning``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from app import rundir
from app.errors import ConfigError, FedwsError
from clients.local_state import STATE_DIR

CA_CERT, SUPERLINK_CERT, SUPERLINK_KEY = "ca.crt", "superlink.crt", "superlink.key"
SUPERLINK_DB = "superlink.db"  # the SuperLink's state, beside the deployment's keys
INSECURE_DB = "fedws-superlink.db"  # ... with --insecure (no certs folder): in the current one
IN_MEMORY = (":memory:", ":flwr-in-memory:")  # Flower's names for "no database file"
PRIVATE_MODE = 0o600


def supernode_key(certs: Path, index: int) -> Path:
    """SuperNode ``index``'s private key; ``.pub`` beside it is what the SuperLink registers."""
    return certs / f"supernode-{index}"


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certs(out: Path, hosts: list[str], num_supernodes: int, days: int = 365) -> list[Path]:
    """Write the CA, the SuperLink's certificate (SANs: ``hosts``) and SuperNode key pairs."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedws deployment CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    written = [out / CA_CERT, out / SUPERLINK_CERT, out / SUPERLINK_KEY]
    written[0].write_bytes(ca.public_bytes(pem))
    written[1].write_bytes(cert.public_bytes(pem))
    _write_private(
        written[2],
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    for i in range(num_supernodes):
        node = ec.generate_private_key(ec.SECP384R1())
        path = supernode_key(out, i)
        _write_private(
            path,
            node.private_bytes(
                pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        public = node.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        path.with_suffix(".pub").write_bytes(public + b"\n")
        written += [path, path.with_suffix(".pub")]
    return written


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key that no one but its owner can read at any moment: created new with
    mode 0600 under a temporary name, written, then renamed over ``path``
    (``rundir.write_whole``): never on disk with a wider mode (chmod after writing would leave
    it readable for a moment), never half written."""
    rundir.write_whole(path, data, permissions=PRIVATE_MODE)


def interpreter_bin() -> str:
    """The folder of this Python's executables (a venv's ``bin/``, unresolved: a venv's
    ``python`` is a symlink to the base interpreter, whose folder has no ``flower-*``)."""
    return os.path.dirname(os.path.abspath(sys.executable))


def flower_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment for a Flower process: ``base`` (default ``os.environ``) with this
    interpreter's ``bin/`` first on ``PATH``. Flower starts its helper processes
    (``flower-superexec``, ``flower-superlink`` for ``flwr run``) by name from ``PATH``; with
    this, a user never has to activate the virtual environment fedws runs from."""
    env = dict(os.environ if base is None else base)
    here = interpreter_bin()
    rest = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p and p != here]
    env["PATH"] = os.pathsep.join([here, *rest])
    env.update(extra)
    return env


def _flower_tool(name: str) -> str:
    """Flower's executable from this environment (beside the running Python) or the PATH."""
    found = shutil.which(name, path=interpreter_bin()) or shutil.which(name)
    if found is None:
        raise FedwsError(
            f"{name} not found beside {sys.executable} or on PATH: install fedws's "
            "dependencies in this environment (bash scripts/setup.sh, or pip install flwr)"
        )
    return found


def start_flower(command: list[str], **env: str) -> subprocess.Popen:
    """Start a Flower process with ``flower_env`` (and ``env`` on top)."""
    return subprocess.Popen(command, env=flower_env(**env))


CONNECT_FAILED = "Connection attempt failed"  # flower-supernode, each time it cannot connect
HINT_AFTER = 3  # failed attempts before the hint (Flower retries forever, saying only that)


def start_watched(command: list[str], hint: str, **env: str) -> subprocess.Popen:
    """``start_flower`` with the process's output relayed line by line to this one's stdout;
    once it has said ``CONNECT_FAILED`` ``HINT_AFTER`` times, ``hint`` goes to stderr, once. A
    SuperNode that cannot connect (the SuperLink down, or TLS on one side only) retries forever
    with that line alone: the hint says what to check. ``relayed`` waits for the relays."""
    proc = subprocess.Popen(
        command,
        env=flower_env(PYTHONUNBUFFERED="1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    relay = threading.Thread(target=relay_output, args=(proc.stdout, hint), daemon=True)
    relay.start()
    _relays.append(relay)
    return proc


_relays: list[threading.Thread] = []


def relay_output(stream: IO[bytes], hint: str) -> None:
    """Copy ``stream`` to stdout, adding ``hint`` after ``HINT_AFTER`` failed connections."""
    failures = 0
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        sys.stdout.write(line)
        sys.stdout.flush()
        if CONNECT_FAILED in line:
            failures += 1
            if failures == HINT_AFTER:
                print(hint, file=sys.stderr, flush=True)
    stream.close()


def relayed(timeout_s: float = 1.0) -> None:
    """Wait (briefly: a helper process of Flower may hold the pipe open) for the relays of
    ``start_watched`` to copy what the stopped processes said last."""
    deadline = time.monotonic() + timeout_s
    for relay in _relays:
        relay.join(max(0.0, deadline - time.monotonic()))


def connection_hint(index: int, superlink: str, certs: Path | None) -> str:
    """What ``start_watched`` says for SuperNode ``index`` that keeps failing to connect."""
    head = f"fedws: SuperNode {index} keeps failing to connect to {superlink}: is the SuperLink"
    if certs is None:
        return (
            f"{head} running and reachable there? It may require TLS (fedws deploy superlink "
            "does, unless --insecure): start the nodes without --insecure and with --certs, "
            f"which gives them --root-certificates <certs>/{CA_CERT}"
        )
    return (
        f"{head} running and reachable there, with TLS (not --insecure), and its certificate "
        f"signed by {certs / CA_CERT} with that host among its names (fedws deploy certs --host)?"
    )


class _Terminated(Exception):
    """SIGTERM arrived while waiting for the Flower processes."""


def supervise(procs: list[subprocess.Popen], grace_s: float = 10.0) -> int:
    """Wait for Flower processes; return the worst exit code. Ctrl-C (130) or SIGTERM (143)
    stops every one of them: SIGTERM to each, SIGKILL to what still runs after ``grace_s``.

    The SIGTERM handler only raises: the stopping happens after the interrupted ``wait`` has
    returned, since a ``wait`` inside the handler could not take the lock the interrupted one
    still holds and would stall for its whole timeout."""

    def on_sigterm(*_) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        try:
            return max((proc.wait() for proc in procs), default=0)
        except (KeyboardInterrupt, _Terminated) as err:
            code = 130 if isinstance(err, KeyboardInterrupt) else 143
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM: stop anyway
        stop(procs, grace_s)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every process still running; SIGKILL what still runs after ``grace_s``."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


LOCAL_CONTROL_PORT = "39093"  # flwr run's local SuperLink (FLWR_LOCAL_CONTROL_API_PORT)


def local_superlinks(control_port: str | None = None) -> list[int]:
    """PIDs of the local simulation SuperLinks that ``flwr run`` starts and leaves running:
    ``flower-superlink`` processes with ``--simulation`` and the local Control API address.
    A deployed SuperLink (no ``--simulation``) is never one of them."""
    port = control_port or os.environ.get("FLWR_LOCAL_CONTROL_API_PORT", LOCAL_CONTROL_PORT)
    try:
        listing = subprocess.run(
            ["ps", "-axo", "pid=,command="], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        raise FedwsError("ps is not installed: cannot find the local SuperLink") from None
    pids = []
    for line in listing.splitlines():
        pid, _, command = line.strip().partition(" ")
        args = command.split()
        if (
            any(a.endswith("flower-superlink") for a in args[:2])
            and "--simulation" in args
            and f"127.0.0.1:{port}" in args
        ):
            pids.append(int(pid))
    return pids


def stop_pids(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM each process; SIGKILL what still runs after ``grace_s``."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise FedwsError(
                f"process {pid} belongs to another user: stop it as that user"
            ) from None
    deadline = time.monotonic() + grace_s
    for pid in pids:
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a child of this process that exited is a zombie until reaped: not running
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    return True


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reached from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int) -> str | None:
    """The one-line warning for a SuperLink bound beyond this machine; None on loopback."""
    if is_loopback(host):
        return None
    return (
        f"fedws: warning: --host {host}: node registration and run submission (Flower's "
        f"Control API, which shares port {port} with the SuperNodes' Fleet API and has no "
        "login in Flower 1.42) are reachable from that network: allow the port only from the "
        "SuperNodes' addresses and run flwr on this machine"
    )


def superlink_database(database: str | None, certs: Path | None) -> str:
    """The SuperLink's ``--database``: ``database`` as given, else ``superlink.db`` in the
    certs folder (``./fedws-superlink.db`` with ``--insecure``). In a file, the registered
    keys, the nodes and the runs survive a SuperLink restart (in memory, a restarted SuperLink
    answers the old nodes with 401 and they exit); ``:memory:`` asks for that anyway."""
    if database in IN_MEMORY:
        return database
    if database:
        path = Path(database).expanduser()
    else:
        path = certs / SUPERLINK_DB if certs is not None else Path(INSECURE_DB)
    if not path.parent.is_dir():
        raise ConfigError("--database", f"{path.parent} is not a folder: create it first")
    return str(path)


def create_database(database: str) -> None:
    """Create the database file, empty (SQLite's new database), with mode 0600 unless it
    exists: it holds the runs' messages, model weights among them, and SQLite gives its journal
    files the database's mode."""
    if database not in IN_MEMORY and not Path(database).exists():
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))


def superlink_command(
    certs: Path | None, host: str, port: int, database: str | None = None
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (``certs=None``: insecure),
    its state in ``database`` (``superlink_database``; None: Flower's default, in memory)."""
    command = [_flower_tool("flower-superlink"), "--host", host, "--port", str(port)]
    if certs is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(certs / CA_CERT),
            "--ssl-certfile",
            str(certs / SUPERLINK_CERT),
            "--ssl-keyfile",
            str(certs / SUPERLINK_KEY),
            "--enable-supernode-auth",
        ]
    command.append("--disable-runtime-dependency-installation")
    if database is not None:
        command += ["--database", database]
    return command


def supernode_command(
    superlink: str,
    certs: Path | None,
    index: int,
    partition: int,
    num_partitions: int,
    port: int,
    data_path: str | None = None,
    state_dir: Path | None = None,
) -> list[str]:
    """``flower-supernode`` for one node: its shard (``partition-id``/``num-partitions`` or
    its own ``data-path``), where it keeps its clients' local state (``state-dir``, on this
    machine), its auth key, TLS with the deployment's CA."""
    node_config = f"partition-id={partition} num-partitions={num_partitions}"
    if data_path:
        node_config += f' data-path="{data_path}"'
    if state_dir is not None:
        node_config += f' {STATE_DIR}="{state_dir}"'
    command = [
        _flower_tool("flower-supernode"),
        "--superlink",
        superlink,
        "--node-config",
        node_config,
        "--port",
        str(port),
    ]
    if certs is None:
        command.append("--insecure")
    else:
        command += [
            "--root-certificates",
            str(certs / CA_CERT),
            "--auth-supernode-private-key",
            str(supernode_key(certs, index)),
        ]
    return command


def connection_toml(name: str, address: str, certs: Path | None) -> str:
    """The ``~/.flwr/config.toml`` block that lets ``flwr`` reach this SuperLink."""
    lines = [f"[superlink.{name}]", f'address = "{address}"']
    if certs is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{(certs / CA_CERT).resolve()}"')
    return "\n".join(lines) + "\n"
