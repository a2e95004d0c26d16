"""The deployment's keys and certificates (``fedrec certs``), made with ``cryptography``.

A folder holds:
- ``ca.pem`` / ``ca.key``: the federation's certificate authority (EC P-256, self-signed);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid for
  the host names and IP addresses given (subject alternative names);
- ``devices/<name>`` / ``devices/<name>.pub``: one EC P-256 key pair per device, in the
  OpenSSH formats Flower's SuperNode authentication reads (``flower-supernode
  --auth-supernode-private-key``, ``flwr supernode register <name>.pub``).

Private keys are written 0600, atomically. Nothing is overwritten: run it again to add
devices, and the CA and server certificate already there are kept (``renew_server`` makes a
new server certificate from the same CA, e.g. for another host name).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEVICE_DIR = "devices"


@dataclass(frozen=True)
class Credentials:
    """Where ``make_credentials`` put everything (the flags of Flower's commands take these)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    device_keys: dict[str, Path]  # device name -> private key; its public key: <path>.pub
    created: tuple[Path, ...]  # the files this call wrote


def make_credentials(
    folder: Path,
    hosts: list[str],
    devices: list[str],
    days: int = 365,
    renew_server: bool = False,
) -> Credentials:
    """The CA, the server certificate for ``hosts`` (DNS names or IP addresses) and a key pair
    per name in ``devices``, in ``folder``; whatever exists is kept (see the module)."""
    if not hosts:
        raise ValueError("give at least one host name or address the SuperLink is reached by")
    for name in devices:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"device name {name!r}: use letters, digits, '-' or '_'")
    folder.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    ca_key = _key(folder / CA_KEY, created)
    ca_cert = folder / CA_CERT
    if not ca_cert.exists():
        _write(
            ca_cert, _ca_certificate(ca_key, days).public_bytes(serialization.Encoding.PEM), 0o644
        )
        created.append(ca_cert)
    authority = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    server_cert, server_key_path = folder / SERVER_CERT, folder / SERVER_KEY
    if renew_server:
        server_key_path.unlink(missing_ok=True)
        server_cert.unlink(missing_ok=True)
    server_key = _key(server_key_path, created)
    if not server_cert.exists():
        certificate = _server_certificate(server_key, ca_key, authority, hosts, days)
        _write(server_cert, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
        created.append(server_cert)
    keys = {}
    for name in devices:
        private = folder / DEVICE_DIR / name
        if not private.exists():
            _device_key_pair(private)
            created += [private, private.with_name(f"{name}.pub")]
        keys[name] = private
    return Credentials(ca_cert, server_cert, server_key_path, keys, tuple(created))


def server_hosts(certificate: Path) -> list[str]:
    """The host names and addresses a server certificate is valid for."""
    cert = x509.load_pem_x509_certificate(certificate.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in names.get_values_for_type(x509.DNSName)] + [
        str(v) for v in names.get_values_for_type(x509.IPAddress)
    ]


def _key(path: Path, created: list[Path]) -> ec.EllipticCurvePrivateKey:
    """The PEM (PKCS #8) private key at ``path``, made first when missing."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: not an EC private key; move it away to make a new one")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(path, pem, 0o600)
    created.append(path)
    return key


def _device_key_pair(private: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    openssh = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write(private, openssh, 0o600)
    _write(private.with_name(f"{private.name}.pub"), public + b"\n", 0o644)


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrec federation CA")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    authority: x509.Certificate,
    hosts: list[str],
    days: int,
) -> x509.Certificate:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(authority.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Atomically, with ``mode`` from the start (a private key is never readable by others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(tmp, mode)  # the umask may have narrowed it
    os.replace(tmp, path)
