"""Certificates for tests that need TLS on a local port.

``self_signed``: one server certificate (client limits over TLS, Redis over TLS).
``build_pki``: a small CA with server and client certificates (mTLS to the gateway, TLS to upstreams).
One builder per shape keeps the validity window, key type and SAN handling alike.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(directory: Path, stem: str, *, host: str, ca: bool = False) -> tuple[Path, Path]:
    """``(cert, key)`` PEM files ``stem.crt`` / ``stem.key`` in ``directory`` for ``host`` (a name or an IP).

    ``ca``: mark it a CA too, for clients (redis-py) that verify a self-signed
    server certificate as its own trust anchor.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.SubjectAlternativeName([san]), critical=False))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = builder.sign(key, hashes.SHA256())
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _cn(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str | x509.Name, key: Any, issuer_name: x509.Name, issuer_key: Any, *, ca: bool = False,
           san: str | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    subject_name = _cn(subject) if isinstance(subject, str) else subject
    builder = (x509.CertificateBuilder().subject_name(subject_name).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(directory: Path, stem: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def build_pki(d: Path) -> dict[str, Path]:
    """A test CA, a server and a client certificate it issued, a rogue CA's client, and two certificates that
    name no one (a CN that reads like a DN, two CNs): PEM files in ``d``, by label (``ca``, ``server_crt``...)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("test-ca", ca_key, _cn("test-ca"), ca_key, ca=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _issue("rogue-ca", rogue_key, _cn("rogue-ca"), rogue_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    rogue_client_key = ec.generate_private_key(ec.SECP256R1())
    paths = {}
    paths["ca"], _ = _write_pair(d, "ca", ca, ca_key)
    paths["server_crt"], paths["server_key"] = _write_pair(
        d, "server", _issue("localhost", server_key, ca.subject, ca_key, san="localhost"), server_key)
    paths["client_crt"], paths["client_key"] = _write_pair(
        d, "client", _issue("svc-batch", client_key, ca.subject, ca_key), client_key)
    paths["rogue_crt"], paths["rogue_key"] = _write_pair(
        d, "rogue", _issue("svc-batch", rogue_client_key, rogue_ca.subject, rogue_key), rogue_client_key)
    # issued by the trusted CA, but naming no one: a CN that reads like a distinguished name, and two CNs
    for label, subject in (("dn_in_cn", _cn("O=x,CN=svc-batch")),
                           ("two_cns", x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc-batch"),
                                                  x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))):
        key = ec.generate_private_key(ec.SECP256R1())
        paths[f"{label}_crt"], paths[f"{label}_key"] = _write_pair(d, label, _issue(subject, key, ca.subject, ca_key),
                                                                   key)
    return paths
