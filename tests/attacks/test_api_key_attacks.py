"""Hostile API-key requests against the authenticate stage: guessed, stolen-hash, expired,
revoked, smuggled and doubled keys must all be refused, never a 500.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from multidict import CIMultiDict

from gateway.auth.api_keys import generate_key, hash_key
from gateway.config import ApiKeysConfig, AuthConfig, GatewayConfig
from gateway.errors import InvalidRequest, Unauthenticated
from gateway.metrics import Metrics
from gateway.pipeline import RequestContext
from gateway.request import BufferedRequest
from gateway.services import Services
from gateway.stages import authenticate
from gateway.stages.framing import Framing
from tests import harness
from tests.harness import error_fields

KEY = generate_key()
EXPIRED = generate_key()


@pytest.fixture
def stage(tmp_path: Path) -> tuple[authenticate.Authenticate, Metrics, Path]:
    file = tmp_path / "keys.yaml"
    file.write_text(yaml.safe_dump([
        {"id": "live", "hash": hash_key(KEY), "subject": "svc-a", "roles": ["analyst"]},
        {"id": "old", "hash": hash_key(EXPIRED), "subject": "svc-b", "roles": ["analyst"],
         "expires": "2020-01-01T00:00:00Z"},
    ]))
    metrics = Metrics()
    config = GatewayConfig(auth=AuthConfig(api_keys=ApiKeysConfig(file=file)))
    return authenticate.build(Services(config=config, metrics=metrics, policy=None)), metrics, file


def _ctx(headers: Any = None, path: str = "/v1/models") -> RequestContext:
    path, _, query = path.partition("?")
    return RequestContext(BufferedRequest("GET", path, query=query, headers=headers or {}), "t", 0.0)


async def _refused(auth: authenticate.Authenticate, headers: Any) -> Unauthenticated:
    ctx = _ctx(headers)
    with pytest.raises(Unauthenticated) as info:
        await auth(ctx)
    assert ctx.identity is None
    assert info.value.status == 401
    return info.value


async def test_the_real_key_passes(stage):
    auth, _, _ = stage
    ctx = _ctx({"X-API-Key": KEY})
    await auth(ctx)
    assert ctx.identity is not None and ctx.identity.subject == "svc-a"


@pytest.mark.parametrize("header", ["X-API-Key", "Authorization"])
async def test_guessed_key_is_refused(stage, header):
    auth, metrics, _ = stage
    guess = generate_key()
    error = await _refused(auth, {header: guess if header == "X-API-Key" else f"Bearer {guess}"})
    assert error.message == "unknown API key"
    assert error.headers["WWW-Authenticate"].endswith('error="invalid_token"')
    assert metrics.registry.get_sample_value("maas_auth_failures_total", {"reason": "unknown_api_key"}) == 1


async def test_key_with_one_character_changed_is_refused(stage):
    auth, _, _ = stage
    await _refused(auth, {"X-API-Key": KEY[:-1] + ("A" if KEY[-1] != "A" else "B")})


@pytest.mark.parametrize("stolen", [hash_key(KEY), hash_key(KEY).removeprefix("sha256:"),
                                    "mk_" + hashlib.sha256(KEY.encode()).hexdigest()])
async def test_the_stored_hash_is_not_a_key(stage, stolen):
    """Someone who read the keys file has hashes only; presenting one must not work."""
    auth, _, _ = stage
    await _refused(auth, {"X-API-Key": stolen})


async def test_key_without_the_prefix_is_refused(stage):
    auth, _, _ = stage
    await _refused(auth, {"X-API-Key": KEY[3:]})


async def test_expired_key_is_refused(stage):
    auth, metrics, _ = stage
    error = await _refused(auth, {"X-API-Key": EXPIRED})
    assert error.message == "API key expired"
    assert metrics.registry.get_sample_value("maas_auth_failures_total", {"reason": "api_key_expired"}) == 1


async def test_revoked_key_is_refused_after_reload(stage):
    auth, _, file = stage
    entries = [e for e in yaml.safe_load(file.read_text()) if e["id"] != "live"]
    file.write_text(yaml.safe_dump(entries))
    await auth.reload()
    await _refused(auth, {"X-API-Key": KEY})


@pytest.mark.parametrize("value", ["mk_" + "a" * 5000, "mk_ünïcode", "mk_\x00\x01", "", "   ", "mk_"])
async def test_odd_key_values_are_401_not_500(stage, value):
    auth, _, _ = stage
    await _refused(auth, {"X-API-Key": value})


async def test_key_in_the_query_string_is_never_read(stage):
    auth, _, _ = stage
    for name in ("api_key", "key", "x-api-key", "access_token"):
        ctx = _ctx(path=f"/v1/models?{name}={KEY}")
        with pytest.raises(Unauthenticated) as info:
            await auth(ctx)
        assert info.value.headers["WWW-Authenticate"] == 'Bearer realm="maas-gateway"'


async def test_two_api_key_headers_are_refused_not_resolved(stage):
    auth, _, _ = stage
    for pair in ((KEY, generate_key()), (generate_key(), KEY), (KEY, KEY)):
        ctx = _ctx(CIMultiDict([("X-API-Key", pair[0]), ("x-api-key", pair[1])]))
        with pytest.raises(InvalidRequest):  # by framing, which runs before authentication
            await Framing(1_000_000)(ctx)
            await auth(ctx)
        assert ctx.identity is None


async def test_api_key_and_authorization_together_are_refused(stage):
    auth, _, _ = stage
    ctx = _ctx({"X-API-Key": KEY, "Authorization": f"Bearer {generate_key()}"})
    with pytest.raises(InvalidRequest):
        await auth(ctx)
    assert ctx.identity is None


async def test_a_jwt_is_refused_where_only_api_keys_are_configured(stage):
    auth, _, _ = stage
    error = await _refused(auth, {"Authorization": "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."})
    assert error.message == "bearer tokens (JWT) are not accepted here"


async def test_api_keys_through_the_gateway(tmp_path, keys):
    """End to end: a key works, never reaches the upstream, and stops working after revoke + reload."""
    import aiohttp
    from tests.harness import ALLOW_ANALYSTS, v2_model

    from gateway.auth.key_file import revoke_key

    file = tmp_path / "api_keys.yaml"
    file.write_text(yaml.safe_dump([{"id": "live", "hash": hash_key(KEY), "subject": "svc-a", "roles": ["analyst"]}]))
    async with (harness.upstream() as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                                auth={"api_keys": {"file": str(file)}}) as gw):
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}]}
        url = gw.url + "/v2/models/digits/infer"
        async with aiohttp.ClientSession() as session:
            for headers in ({"X-API-Key": KEY}, {"Authorization": f"Bearer {KEY}"}):
                r = await session.post(url, json=body, headers=headers)
                assert r.status == 200
            assert all(s.headers.get("X-Maas-Subject") == "svc-a" for s in up.seen)
            assert all("X-API-Key" not in s.headers and "Authorization" not in s.headers for s in up.seen)
            r = await session.post(url, json=body, headers={"X-API-Key": generate_key()})
            assert r.status == 401
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="maas-gateway", error="invalid_token"'
            revoke_key(file, "live")
            await gw.gateway.reload()
            r = await session.post(url, json=body, headers={"X-API-Key": KEY})
            assert r.status == 401
            assert error_fields(await r.json())["message"] == "unknown API key"
