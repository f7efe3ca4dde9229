"""Keys from a JWKS URL: rotation, kid sprays, failing fetches, periodic refresh (a fake clock, no sleeping)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiohttp import web

from gateway.auth import AuthFailure
from gateway.auth.jwks import RemoteJwks
from gateway.auth.jwt import JwtVerifier
from gateway.metrics import Metrics
from gateway.stages.authenticate import Authenticate
from tests import harness
from tests.clock import FakeClock
from tests.harness import eventually
from tests.jwt_support import jwk_of, keys, make_ctx, make_token, make_verifier, sample  # noqa: F401  (fixtures)


class JwksServer:
    """A real HTTP identity provider endpoint whose keys and health the test controls."""

    def __init__(self) -> None:
        self.jwks: list[dict[str, Any]] = []
        self.fetches = 0
        self.status = 200

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response({"keys": self.jwks})


@pytest.fixture
async def idp(aiohttp_server, keys):
    server = JwksServer()
    server.jwks = [jwk_of(keys["rsa"], "rsa")]
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    running = await aiohttp_server(app)
    server.url = str(running.make_url("/jwks"))  # type: ignore[attr-defined]
    return server


async def _remote(idp: JwksServer, metrics: Metrics | None = None, *, clock: FakeClock | None = None,
                  **settings: Any) -> JwtVerifier:
    """A verifier fetching from ``idp``; with ``clock``, its refresh intervals run on that clock."""
    verifier = make_verifier(metrics, algorithms=["RS256"], jwks_url=idp.url, **settings)  # type: ignore[attr-defined]
    if clock is not None:
        assert isinstance(verifier.keys, RemoteJwks)
        verifier.keys.clock, verifier.keys.sleep = clock, clock.sleep
    await verifier.start()
    return verifier


async def test_jwks_url_rotation_fetches_a_new_kid_on_demand(idp, keys):
    clock = FakeClock()
    async with harness.closing(await _remote(idp, jwks_min_refresh_s=0.2, clock=clock)) as verifier:
        assert (await verifier.verify(make_token(keys["rsa"]))).subject == "alice"
        assert idp.fetches == 1
        idp.jwks = [jwk_of(keys["rsa"], "rsa"), jwk_of(keys["rsa2"], "rsa2")]  # the IdP rotates in a new key
        clock.advance(0.25)  # the thing under test: past jwks_min_refresh_s, an unknown kid may refetch
        assert (await verifier.verify(make_token(keys["rsa2"], kid="rsa2"))).subject == "alice"
        assert idp.fetches == 2
        assert (await verifier.verify(make_token(keys["rsa"], sub="bob"))).subject == "bob"  # the old one still works
        assert idp.fetches == 2


async def test_random_kid_spray_causes_at_most_one_fetch_per_interval(idp, keys):
    interval = 1.0
    clock = FakeClock()
    async with harness.closing(await _remote(idp, jwks_min_refresh_s=interval, clock=clock)) as verifier:
        assert idp.fetches == 1
        spray = [make_token(keys["rsa"], kid=uuid.uuid4().hex) for _ in range(100)]
        clock.advance(interval + 0.05)  # the thing under test: one refetch allowed per interval

        async def attempt(token: str) -> str:
            try:
                await verifier.verify(token)
            except AuthFailure as failure:
                return failure.reason
            return "accepted"

        started = clock()
        reasons = await asyncio.gather(*(attempt(t) for t in spray[:50]))
        reasons += [await attempt(t) for t in spray[50:]]
        assert clock() == started  # the sprays above all fell in one interval (only advance() moves the clock)
        assert set(reasons) == {"unknown_kid"}
        assert idp.fetches == 2

        idp.jwks.append(jwk_of(keys["rsa2"], "rsa2"))
        rotated = make_token(keys["rsa2"], kid="rsa2")
        assert await attempt(rotated) == "unknown_kid"  # still rate-limited: not fetched yet
        assert idp.fetches == 2
        clock.advance(interval + 0.05)  # the thing under test: the next interval allows one more fetch
        assert await attempt(rotated) == "accepted"
        assert idp.fetches == 3


async def test_failing_jwks_fetch_keeps_the_last_good_keys(idp, keys):
    metrics = Metrics()
    clock = FakeClock()
    async with harness.closing(await _remote(idp, metrics, jwks_min_refresh_s=0.1, clock=clock)) as verifier:
        idp.status = 500
        clock.advance(0.15)  # the thing under test: past jwks_min_refresh_s (0.1 s), a refetch is allowed
        with pytest.raises(AuthFailure):
            await verifier.verify(make_token(keys["rsa"], kid="new"))  # triggers a fetch that fails
        assert idp.fetches == 2
        assert sample(metrics, "maas_jwks_refreshes_total", result="error") == 1
        assert (await verifier.verify(make_token(keys["rsa"]))).subject == "alice"
        assert verifier.ready() is None

        idp.status = 200
        idp.jwks = [{"kty": "garbage"}]  # a reachable IdP serving nothing usable: still keep the old keys
        clock.advance(0.15)  # the thing under test: past jwks_min_refresh_s (0.1 s), a refetch is allowed
        with pytest.raises(AuthFailure):
            await verifier.verify(make_token(keys["rsa"], kid="new2"))
        assert (await verifier.verify(make_token(keys["rsa"], sub="carol"))).subject == "carol"


async def test_jwks_url_down_at_start_is_not_ready_and_refuses_tokens(idp, keys):
    idp.status = 503
    clock = FakeClock()
    async with harness.closing(await _remote(idp, jwks_min_refresh_s=0.1, clock=clock)) as verifier:
        assert verifier.ready() is not None and "JWKS" in verifier.ready()
        with pytest.raises(AuthFailure):
            await verifier.verify(make_token(keys["rsa"]))
        idp.status = 200
        clock.advance(0.15)  # the thing under test: past jwks_min_refresh_s (0.1 s), a refetch is allowed
        assert (await verifier.verify(make_token(keys["rsa"]))).subject == "alice"  # an unknown kid refetches
        assert verifier.ready() is None


async def test_periodic_refresh_drops_a_removed_key_and_its_cached_tokens(idp, keys):
    clock = FakeClock()
    async with harness.closing(await _remote(idp, jwks_cache_s=1.0, jwks_min_refresh_s=0.1, clock=clock)) as verifier:
        token = make_token(keys["rsa"])
        await verifier.verify(token)
        assert verifier.cached(token) is not None
        idp.jwks = [jwk_of(keys["rsa2"], "rsa2")]
        await eventually(lambda: clock.sleepers == 1)  # the refresher waits out jwks_cache_s
        clock.advance(0.9)
        await clock.settle()
        assert idp.fetches == 1 and verifier.cached(token) is not None  # not yet due
        clock.advance(0.2)  # the thing under test: jwks_cache_s (1 s) has passed, the periodic refresh runs
        await eventually(lambda: verifier.cached(token) is None)
        assert idp.fetches == 2
        with pytest.raises(AuthFailure):
            await verifier.verify(token)


async def test_close_closes_the_client_session(idp):
    verifier = await _remote(idp)
    session = verifier.keys._session  # type: ignore[union-attr]
    assert session is not None and not session.closed
    await verifier.close()
    assert session.closed


async def test_stage_lifecycle_with_a_jwks_url(idp, keys):
    stage = Authenticate(Metrics(), jwt=make_verifier(algorithms=["RS256"], jwks_url=idp.url))
    await stage.start()
    try:
        assert stage.ready() is None
        ctx = make_ctx({"Authorization": f"Bearer {make_token(keys['rsa'])}"})
        await stage(ctx)
        assert ctx.identity is not None
    finally:
        await stage.close()
