"""`fedrec certs`: a CA, a server certificate a TLS client accepts for its host names only, and
device keys in the formats Flower's SuperNode authentication reads."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from fedrec.cli import app
from server.certs import make_credentials, server_hosts


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_server_certificate_is_signed_by_the_ca_for_the_given_hosts(tmp_path):
    made = make_credentials(tmp_path, ["127.0.0.1", "localhost"], ["phone"])
    authority = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(authority)  # raises if the signature or issuer is wrong
    assert authority.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert sorted(server_hosts(made.server_cert)) == ["127.0.0.1", "localhost"]
    for private in (tmp_path / "ca.key", made.server_key, made.device_keys["phone"]):
        assert _mode(private) == 0o600
    assert _mode(made.ca_cert) == 0o644


def test_device_keys_are_what_flowers_supernode_auth_reads(tmp_path):
    made = make_credentials(tmp_path, ["127.0.0.1"], ["phone", "tv"])
    for name, private in made.device_keys.items():
        key = load_ssh_private_key(private.read_bytes(), None)
        public = load_ssh_public_key(private.with_name(f"{name}.pub").read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp256r1"  # a NIST curve, as `flwr supernode register` wants
        assert key.public_key().public_numbers() == public.public_numbers()
    phone, tv = (load_ssh_private_key(p.read_bytes(), None) for p in made.device_keys.values())
    assert phone.public_key().public_numbers() != tv.public_key().public_numbers()


def test_running_again_keeps_everything_and_adds_new_devices(tmp_path):
    first = make_credentials(tmp_path, ["127.0.0.1"], ["phone"])
    before = {p: p.read_bytes() for p in first.created}
    second = make_credentials(tmp_path, ["127.0.0.1"], ["phone", "tv"])
    assert {p: p.read_bytes() for p in before} == before  # nothing overwritten
    assert set(second.created) == {tmp_path / "devices" / "tv", tmp_path / "devices" / "tv.pub"}
    renewed = make_credentials(tmp_path, ["10.0.0.5"], [], renew_server=True)
    assert server_hosts(renewed.server_cert) == ["10.0.0.5"]
    assert renewed.ca_cert.read_bytes() == before[first.ca_cert]  # the same CA signs it


def _serve_once(cert: Path, key: Path) -> tuple[int, threading.Thread]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def accept() -> None:
        with listener:
            connection, _ = listener.accept()
            try:
                with context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client refused the handshake

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


@pytest.mark.parametrize(
    ("trusted", "host", "accepted"),
    [(True, "127.0.0.1", True), (False, "127.0.0.1", False), (True, "10.9.9.9", False)],
)
def test_a_tls_client_accepts_the_server_only_with_the_ca_and_for_its_hosts(
    tmp_path, trusted, host, accepted
):
    """The handshake a SuperNode makes: with the CA and the address in the certificate it
    succeeds; without the CA, or for an address the certificate does not name, it fails."""
    made = make_credentials(tmp_path, ["127.0.0.1", "localhost"], [])
    port, server = _serve_once(made.server_cert, made.server_key)
    client = ssl.create_default_context(cafile=str(made.ca_cert) if trusted else None)
    if not trusted:
        client.load_verify_locations(cadata=_other_ca(tmp_path))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        if accepted:
            with client.wrap_socket(raw, server_hostname=host) as tls:
                assert tls.recv(2) == b"ok"
        else:
            with pytest.raises(ssl.SSLCertVerificationError):
                client.wrap_socket(raw, server_hostname=host)
    server.join(timeout=10)


def _other_ca(tmp_path: Path) -> str:
    """Some other federation's CA: trusting it must not make ours trusted."""
    return make_credentials(tmp_path / "other", ["127.0.0.1"], []).ca_cert.read_text()


def test_the_command_writes_and_then_keeps(tmp_path):
    runner = CliRunner()
    args = ["certs", "--out", str(tmp_path), "--host", "127.0.0.1", "--devices", "2"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "wrote" in first.output and (tmp_path / "devices" / "device-1.pub").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "wrote" not in again.output and "kept" in again.output
    bad = runner.invoke(app, ["certs", "--out", str(tmp_path), "--host", "x", "--device", "../e"])
    assert bad.exit_code != 0 and "device name" in bad.output
