"""A self-signed CA and a server certificate it signs, for NATS over TLS on one machine.

Why our own CA: `lego up --nats-tls` needs a certificate nobody has to buy or install; the
clients (every child of the mesh) verify the server with this CA (LEGO_NATS_TLS_CA), so a
process that only reaches the port cannot pretend to be the bus. Made once under
`state_dir/tls/` (keys 0600) and reused; the tests make their own with the same function.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from lego.nats_secrets import write_private

VALID_DAYS = 825


@dataclass(frozen=True)
class CertFiles:
    ca: Path  # the CA certificate: what clients verify with
    cert: Path  # the server's certificate
    key: Path  # the server's private key (0600)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _builder(subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def make_certificates(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> CertFiles:
    """A new CA and a server certificate for `hosts` (IP addresses or DNS names) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("LegoDiffusion local CA")
    ca = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        _builder(_name(hosts[0]), ca_name, key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = CertFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    for old in (directory / "ca.key", files.key):  # a new pair replaces an old one whole
        old.unlink(missing_ok=True)
    write_private(directory / "ca.key", _pem_key(ca_key))
    write_private(files.key, _pem_key(key))
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def ensure_certificates(state_dir: str | Path) -> CertFiles:
    """The machine's CA and NATS server certificate under `state_dir/tls/`, made at first use."""
    directory = Path(state_dir) / "tls"
    files = CertFiles(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    if files.ca.exists() and files.cert.exists() and files.key.exists():
        return files
    return make_certificates(directory)
