"""Test certificates made with ``cryptography``: ``make_cert(dir, hosts) -> (cert.pem, key.pem)``.

Each call makes a new self-signed, CA-capable EC P-256 certificate (so it is its own trust root)
with a SubjectAltName per host (IP addresses as IP, names as DNS), valid from a day ago to a
week from now. Two calls give two unrelated certificates (for wrong-CA tests).
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_cert(dir: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost"), name: str = "server") -> tuple[Path, Path]:
    """Write ``dir/NAME.pem`` and ``dir/NAME.key`` (unencrypted PKCS#8); returns their paths."""
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hpcserve test {name}")])
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = dir / f"{name}.pem", dir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def make_other_cert(dir: Path, hosts: Iterable[str] = ("127.0.0.1", "localhost")) -> tuple[Path, Path]:
    """An unrelated certificate for the same hosts (``other.pem`` / ``other.key``)."""
    return make_cert(dir, hosts, name="other")
