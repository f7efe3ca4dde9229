"""TLS and mTLS on the public port, with real certificates: the client certificate is the identity
(or a policy attribute), and a client without one never gets a connection."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import Keys, start_gateway, start_upstream, v2_model

V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str | x509.Name, key, issuer_name: x509.Name, issuer_key, *, ca: bool = False,
          san: str | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = _name(subject) if isinstance(subject, str) else subject
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert, key) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, _name("test-ca"), ca_key, ca=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _cert("rogue-ca", rogue_key, _name("rogue-ca"), rogue_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    rogue_client_key = ec.generate_private_key(ec.SECP256R1())
    paths = {}
    paths["ca"], _ = _write(d, "ca", ca, ca_key)
    paths["server_crt"], paths["server_key"] = _write(d, "server", _cert("localhost", server_key, ca.subject, ca_key,
                                                                         san="localhost"), server_key)
    paths["client_crt"], paths["client_key"] = _write(d, "client", _cert("svc-batch", client_key, ca.subject, ca_key),
                                                      client_key)
    paths["rogue_crt"], paths["rogue_key"] = _write(d, "rogue", _cert("svc-batch", rogue_client_key, rogue_ca.subject,
                                                                      rogue_key), rogue_client_key)
    # issued by the trusted CA, but naming no one: a CN that reads like a distinguished name, and two CNs
    for label, subject in (("dn_in_cn", _name("O=x,CN=svc-batch")),
                           ("two_cns", x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "svc-batch"),
                                                  x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))):
        key = ec.generate_private_key(ec.SECP256R1())
        paths[f"{label}_crt"], paths[f"{label}_key"] = _write(d, label, _cert(subject, key, ca.subject, ca_key), key)
    return paths


def client_ssl(pki: dict[str, Path], cert: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if cert:
        context.load_cert_chain(str(pki[f"{cert}_crt"]), str(pki[f"{cert}_key"]))
    return context


POLICY = {
    "roles": {"batch": [], "analyst": []},
    "rules": [
        {"id": "batch-digits", "roles": ["batch"], "models": ["digits"], "actions": ["infer"], "effect": "allow"},
        {"id": "analysts-over-mtls", "roles": ["analyst"], "models": ["digits"], "actions": ["infer"],
         "effect": "allow", "when": "request.mtls"},
    ],
}


async def mtls_gateway(tmp_path: Path, pki: dict[str, Path], keys: Keys) -> tuple[Any, Any, str]:
    """An upstream, and a gateway that requires client certificates (role `batch`) or a JWT; the infer URL."""
    up = await start_upstream()
    tls = {"cert_file": str(pki["server_crt"]), "key_file": str(pki["server_key"]), "client_ca_file": str(pki["ca"])}
    gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=POLICY,
                             server={"tls": tls}, auth={"jwt": keys.jwt_config(), "mtls": {"roles": ["batch"]}})
    return up, gw, gw.url.replace("http://127.0.0.1", "https://localhost") + "/v2/models/digits/infer"


async def test_mtls_certificate_is_the_identity(tmp_path: Path, pki: dict[str, Path], keys: Keys) -> None:
    up, gw, url = await mtls_gateway(tmp_path, pki, keys)
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.post(url, json=V2_BODY, ssl=client_ssl(pki, "client"))
            assert r.status == 200, await r.text()
            assert up.seen[-1].headers["X-Maas-Subject"] == "svc-batch"
            assert up.seen[-1].headers["X-Forwarded-Proto"] == "https"
            # a token still wins, and request.mtls is true for the policy
            r = await s.post(url, json=V2_BODY, ssl=client_ssl(pki, "client"), headers=keys.auth("alice", ["analyst"]))
            assert r.status == 200
            assert up.seen[-1].headers["X-Maas-Subject"] == "alice"
            # a bad token is never rescued by the certificate
            r = await s.post(url, json=V2_BODY, ssl=client_ssl(pki, "client"), headers={"Authorization": "Bearer junk"})
            assert r.status == 401
        seen = len(up.seen)
        for cert in (None, "rogue"):  # no certificate, or one from another CA: no connection at all
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.ClientError):
                    await s.post(url, json=V2_BODY, ssl=client_ssl(pki, cert))
        assert len(up.seen) == seen
    finally:
        await gw.stop()
        await up.stop()


async def test_tls_without_client_ca_has_mtls_false(tmp_path: Path, pki: dict[str, Path], keys: Keys) -> None:
    up = await start_upstream()
    tls = {"cert_file": str(pki["server_crt"]), "key_file": str(pki["server_key"])}
    gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=POLICY, server={"tls": tls})
    url = gw.url.replace("http://127.0.0.1", "https://localhost") + "/v2/models/digits/infer"
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.post(url, json=V2_BODY, ssl=client_ssl(pki, None), headers=keys.auth("alice", ["analyst"]))
            assert r.status == 403  # analysts need request.mtls
            r = await s.post(url, json=V2_BODY, ssl=client_ssl(pki, None), headers=keys.auth("bob", ["batch"]))
            assert r.status == 200
    finally:
        await gw.stop()
        await up.stop()


@pytest.mark.parametrize("cert", ["dn_in_cn", "two_cns"])
async def test_certificate_without_a_single_plain_common_name_is_refused(tmp_path: Path, pki: dict[str, Path],
                                                                          keys: Keys, cert: str) -> None:
    """The subject is read from the certificate once: a CN ``O=x,CN=svc-batch`` is not ``svc-batch``, and a
    certificate naming two CNs names no one. Both connect (the CA issued them) and are refused as credentials."""
    up, gw, url = await mtls_gateway(tmp_path, pki, keys)
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.post(url, json=V2_BODY, ssl=client_ssl(pki, cert))
            assert r.status == 401, await r.text()
            assert (await r.json())["error"]["type"] == "unauthenticated"
            # the same connection with a token: the certificate only made it TLS, the token says who
            r = await s.post(url, json=V2_BODY, ssl=client_ssl(pki, cert), headers=keys.auth("bob", ["batch"]))
            assert r.status == 200
        assert [seen.headers["X-Maas-Subject"] for seen in up.seen] == ["bob"]
        failures = gw.gateway.metrics.registry.get_sample_value("maas_auth_failures_total",
                                                                 {"reason": "bad_certificate"})
        assert failures == 1
    finally:
        await gw.stop()
        await up.stop()
