from __future__ import annotations

import io
import ipaddress
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from app.errors import FedwsError
from app.tools import deploy
from app.tools.cli import main
from app.tools.deploy import make_certs, superlink_command, supernode_command, supernode_key


def test_certs_have_the_hosts_as_sans_and_node_keys_flower_can_read(tmp_path):
    make_certs(tmp_path, ["10.1.2.3", "link.example"], num_supernodes=2)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3")]
    assert sans.get_values_for_type(x509.DNSName) == ["link.example"]
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    for i in range(2):
        private = load_ssh_private_key(supernode_key(tmp_path, i).read_bytes(), None)
        public = load_ssh_public_key(supernode_key(tmp_path, i).with_suffix(".pub").read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert oct(supernode_key(tmp_path, i).stat().st_mode & 0o777) == "0o600"


def test_commands_turn_tls_and_node_auth_on_unless_insecure(tmp_path):
    secure = superlink_command(tmp_path, "0.0.0.0", 9093)
    assert "--enable-supernode-auth" in secure and "--insecure" not in secure
    assert "--disable-runtime-dependency-installation" in secure
    assert "--insecure" in superlink_command(None, "127.0.0.1", 9093)
    node = supernode_command("h:9093", tmp_path, 3, 3, 8, 9103, data_path="/data/site3")
    assert node[node.index("--node-config") + 1] == (
        'partition-id=3 num-partitions=8 data-path="/data/site3"'
    )
    assert node[node.index("--auth-supernode-private-key") + 1] == str(tmp_path / "supernode-3")


def test_flower_processes_get_this_interpreters_bin_first_on_path(monkeypatch):
    monkeypatch.setattr(deploy, "interpreter_bin", lambda: "/venv/bin")
    env = deploy.flower_env({"PATH": "/usr/bin:/venv/bin:/bin", "KEEP": "1"}, EXTRA="x")
    assert env["PATH"] == "/venv/bin:/usr/bin:/bin"  # first, and only once
    assert env["KEEP"] == "1" and env["EXTRA"] == "x"
    assert deploy.flower_env({})["PATH"].split(":")[0] == "/venv/bin"  # no PATH at all


def test_a_missing_flower_binary_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(deploy, "interpreter_bin", lambda: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FedwsError, match="flower-superlink not found"):
        deploy.superlink_command(None, "127.0.0.1", 9093)
    monkeypatch.chdir(tmp_path)
    assert main(["deploy", "superlink", "--insecure"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedws: error: flower-superlink not found")
    assert not (tmp_path / "fedws-superlink.db").exists()  # nothing left behind


def test_private_keys_are_created_owner_only_from_the_first_byte(tmp_path, monkeypatch):
    """Each private key file is born with mode 0600 (os.open with O_CREAT | O_EXCL and mode
    0600, then renamed into place), so no moment exists at which another user could read
    it: chmod is never called (it fails here) and the file has mode 0600 before its rename."""
    opened: list[tuple[str, int, int]] = []
    real_open, real_replace = os.open, os.replace
    before_rename: dict[str, int] = {}

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
        opened.append((os.fspath(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    def spy_replace(src, dst):
        before_rename[os.path.basename(os.fspath(dst))] = os.stat(src).st_mode & 0o777
        return real_replace(src, dst)

    def no_chmod(*args, **kwargs):
        raise AssertionError("chmod called: the key had another mode before")

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    monkeypatch.setattr(os, "umask", no_chmod)  # nor a umask trick
    make_certs(tmp_path, ["127.0.0.1"], num_supernodes=2)

    private = ["superlink.key", "supernode-0", "supernode-1"]
    for name in private:
        (flags, mode) = next(
            (f, m) for p, f, m in opened if os.path.basename(p).startswith(f".{name}.")
        )
        assert flags & os.O_CREAT and flags & os.O_EXCL and mode == 0o600, name
        assert before_rename[name] == 0o600
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_certs_again_replace_the_keys_still_owner_only(tmp_path):
    make_certs(tmp_path, ["127.0.0.1"], num_supernodes=1)
    first = supernode_key(tmp_path, 0).read_bytes()
    make_certs(tmp_path, ["127.0.0.1"], num_supernodes=1)
    assert supernode_key(tmp_path, 0).read_bytes() != first
    assert supernode_key(tmp_path, 0).stat().st_mode & 0o777 == 0o600


@pytest.fixture
def no_flower(monkeypatch):
    """`fedws deploy superlink` up to the process it would start: the command it prints."""
    started: list[list[str]] = []
    monkeypatch.setattr(deploy, "_flower_tool", lambda name: name)
    monkeypatch.setattr(deploy, "start_flower", lambda command, **env: started.append(command))
    monkeypatch.setattr(deploy, "supervise", lambda procs: 0)
    return started


def test_the_superlink_listens_on_loopback_unless_told_and_warns_when_told(
    tmp_path, no_flower, capsys
):
    make_certs(tmp_path, ["127.0.0.1"], num_supernodes=1)
    assert main(["deploy", "superlink", "--certs", str(tmp_path)]) == 0
    (command,) = no_flower
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert capsys.readouterr().err == ""  # no warning on loopback

    assert main(["deploy", "superlink", "--certs", str(tmp_path), "--host", "0.0.0.0"]) == 0
    assert no_flower[-1][no_flower[-1].index("--host") + 1] == "0.0.0.0"
    (warning,) = capsys.readouterr().err.splitlines()  # one line
    assert warning.startswith("fedws: warning: --host 0.0.0.0: node registration and run ")
    assert "allow the port only from the SuperNodes' addresses" in warning
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert deploy.exposure_warning(host, 9093) is None, host
    for host in ("0.0.0.0", "::", "10.0.0.5", "link.example"):
        assert "reachable from that network" in deploy.exposure_warning(host, 9093), host


def test_the_superlink_keeps_its_state_in_a_file_by_default(
    tmp_path, no_flower, monkeypatch, capsys
):
    certs = tmp_path / "certs"
    make_certs(certs, ["127.0.0.1"], num_supernodes=1)
    assert main(["deploy", "superlink", "--certs", str(certs)]) == 0
    command = no_flower[-1]
    assert command[command.index("--database") + 1] == str(certs / "superlink.db")
    # created empty (SQLite's new database) and owner-only: it holds the runs' messages
    db = certs / "superlink.db"
    assert db.stat().st_size == 0 and db.stat().st_mode & 0o777 == 0o600

    assert main(["deploy", "superlink", "--certs", str(certs), "--database", ":memory:"]) == 0
    command = no_flower[-1]
    assert command[command.index("--database") + 1] == ":memory:"  # today's behaviour on ask

    monkeypatch.chdir(tmp_path)
    assert main(["deploy", "superlink", "--insecure"]) == 0
    command = no_flower[-1]
    assert command[command.index("--database") + 1] == "fedws-superlink.db"
    assert (tmp_path / "fedws-superlink.db").is_file()

    capsys.readouterr()
    missing = tmp_path / "nowhere" / "link.db"
    assert main(["deploy", "superlink", "--insecure", "--database", str(missing)]) == 2
    (line,) = capsys.readouterr().err.splitlines()[-1:]
    assert line == (
        f"fedws: config error: --database: {missing.parent} is not a folder: create it first"
    )


def test_a_node_that_keeps_failing_to_connect_gets_a_hint_once(capsys):
    said = b"".join(
        [b"INFO: Starting Flower SuperNode\n"]
        + [b"WARNING: Connection attempt failed, retrying in 1.2 seconds\n"] * 5
    )
    hint = deploy.connection_hint(3, "10.0.0.1:9093", None)
    deploy.relay_output(io.BytesIO(said), hint)
    out, err = capsys.readouterr()
    assert out == said.decode()  # relayed as said
    assert err.splitlines() == [hint]  # once, after HINT_AFTER failures
    assert "may require TLS" in hint and "--root-certificates <certs>/ca.crt" in hint
    tls_hint = deploy.connection_hint(0, "h:9093", Path("certs"))
    assert "with TLS (not --insecure)" in tls_hint and "certs/ca.crt" in tls_hint
