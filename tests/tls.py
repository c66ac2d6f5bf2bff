"""Certificates made in the test: a CA, a server certificate for localhost/127.0.0.1, a client certificate."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class Pem:
    key: str
    cert: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def make_pki() -> tuple[Pem, Pem, Pem]:
    """(ca, server, client)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("remote-predict test CA")).issuer_name(_name(
        "remote-predict test CA")).public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))

    def leaf(common_name: str, usage, san=None) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        return Pem(_pem_key(key), cert.public_bytes(serialization.Encoding.PEM).decode())

    server = leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                  [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = leaf("remote-predict client", ExtendedKeyUsageOID.CLIENT_AUTH)
    ca = Pem(_pem_key(ca_key), ca_cert.public_bytes(serialization.Encoding.PEM).decode())
    return ca, server, client


def ssl_config(path: Path, key: str = "", cert: str = "", ca: str = "", client_verify: bool = False) -> Path:
    """A TF Serving SSLConfig text file (the PEM contents themselves, as TF Serving expects)."""

    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    path.write_text(f"server_key: {quoted(key)}\nserver_cert: {quoted(cert)}\ncustom_ca: {quoted(ca)}\n"
                    f"client_verify: {'true' if client_verify else 'false'}\n")
    return path
