from __future__ import annotations

import ipaddress

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
    assert main(["deploy", "superlink", "--insecure"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedws: error: flower-superlink not found")
