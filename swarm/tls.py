"""TLS for the coordinator's gRPC port: a self-signed certificate the operator hands out, pinned by peers.

The coordinator makes an ECDSA P-256 certificate on first start (or uses the operator's own). Peers
trust exactly that certificate (it is their only root), so a network attacker can neither read the
credentials nor impersonate the coordinator. Generated certificates always name
:data:`PINNED_NAME`; a client that pins such a certificate checks the server against that name,
so the address peers dial (IP, DNS or a compose service name) does not have to be in it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PINNED_NAME = "loraswarm-coordinator"

__all__ = ["PINNED_NAME", "channel", "ensure_certificate", "server_credentials"]


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def ensure_certificate(cert_path: Path, key_path: Path, hostnames: tuple[str, ...] = ()) -> None:
    """Create a self-signed certificate + key (key mode 0600) unless both files exist."""
    if cert_path.exists() and key_path.exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PINNED_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [PINNED_NAME, "localhost", "127.0.0.1", "::1", *[h for h in hostnames if h and h != "0.0.0.0"]]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))  # fmt: skip
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def server_credentials(cert_path: Path, key_path: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key_path.read_bytes(), cert_path.read_bytes())])


def _names_pinned(pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return PINNED_NAME in san.get_values_for_type(x509.DNSName)


def channel(address: str, cert_path: str | Path | None, options: Sequence[tuple[str, object]]) -> grpc.Channel:
    """A channel to the coordinator: TLS pinned to ``cert_path``, or plaintext when it is None/''."""
    if not cert_path:
        return grpc.insecure_channel(address, options=options)
    pem = Path(cert_path).read_bytes()
    opts = list(options)
    if _names_pinned(pem):
        opts.append(("grpc.ssl_target_name_override", PINNED_NAME))
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=pem), options=opts)
