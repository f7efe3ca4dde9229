"""TLS and mTLS on the public port, with real certificates: the client certificate is the identity
(or a policy attribute), and a client without one never gets a connection."""

from __future__ import annotations

import ssl
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest

from tests import harness
from tests.certs import build_pki
from tests.harness import Keys, v2_model
from tests.harness import error_fields


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_pki(tmp_path_factory.mktemp("pki"))


V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}


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


@asynccontextmanager
async def mtls_gateway(tmp_path: Path, pki: dict[str, Path], keys: Keys) -> AsyncIterator[tuple[Any, Any, str]]:
    """An upstream, and a gateway that requires client certificates (role `batch`) or a JWT; the infer URL."""
    tls = {"cert_file": str(pki["server_crt"]), "key_file": str(pki["server_key"]), "client_ca_file": str(pki["ca"])}
    async with (harness.upstream() as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=POLICY,
                                server={"tls": tls}, auth={"jwt": keys.jwt_config(), "mtls": {"roles": ["batch"]}}) as gw):
        yield up, gw, gw.url.replace("http://127.0.0.1", "https://localhost") + "/v2/models/digits/infer"


async def test_mtls_certificate_is_the_identity(tmp_path: Path, pki: dict[str, Path], keys: Keys) -> None:
    async with mtls_gateway(tmp_path, pki, keys) as (up, gw, url):
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


async def test_tls_without_client_ca_has_mtls_false(tmp_path: Path, pki: dict[str, Path], keys: Keys) -> None:
    tls = {"cert_file": str(pki["server_crt"]), "key_file": str(pki["server_key"])}
    async with (harness.upstream() as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=POLICY,
                                server={"tls": tls}) as gw):
        url = gw.url.replace("http://127.0.0.1", "https://localhost") + "/v2/models/digits/infer"
        async with aiohttp.ClientSession() as s:
            r = await s.post(url, json=V2_BODY, ssl=client_ssl(pki, None), headers=keys.auth("alice", ["analyst"]))
            assert r.status == 403  # analysts need request.mtls
            r = await s.post(url, json=V2_BODY, ssl=client_ssl(pki, None), headers=keys.auth("bob", ["batch"]))
            assert r.status == 200


@pytest.mark.parametrize("cert", ["dn_in_cn", "two_cns"])
async def test_certificate_without_a_single_plain_common_name_is_refused(tmp_path: Path, pki: dict[str, Path],
                                                                          keys: Keys, cert: str) -> None:
    """The subject is read from the certificate once: a CN ``O=x,CN=svc-batch`` is not ``svc-batch``, and a
    certificate naming two CNs names no one. Both connect (the CA issued them) and are refused as credentials."""
    async with mtls_gateway(tmp_path, pki, keys) as (up, gw, url):
        async with aiohttp.ClientSession() as s:
            r = await s.post(url, json=V2_BODY, ssl=client_ssl(pki, cert))
            assert r.status == 401, await r.text()
            assert error_fields(await r.json())["type"] == "unauthenticated"
            # the same connection with a token: the certificate only made it TLS, the token says who
            r = await s.post(url, json=V2_BODY, ssl=client_ssl(pki, cert), headers=keys.auth("bob", ["batch"]))
            assert r.status == 200
        assert [seen.headers["X-Maas-Subject"] for seen in up.seen] == ["bob"]
        failures = gw.gateway.metrics.registry.get_sample_value("maas_auth_failures_total",
                                                                 {"reason": "bad_certificate"})
        assert failures == 1
