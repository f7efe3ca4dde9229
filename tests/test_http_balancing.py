"""Several upstreams: round-robin, passive ejection, return (trial or probe), and safe retries."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from aiohttp import web
from tests.clock import FakeClock
from tests.harness import eventually, free_port, start_upstream
from tests.http_helpers import RawServer, make_backend, make_ctx, read_request_head
from tests.upstreams import running

from gateway.errors import BackendError, BackendTimeout
from gateway.metrics import Metrics
from gateway.pipeline import RouteKind

INFER = "/v2/models/digits/infer"


def infer_ctx():
    return make_ctx(RouteKind.V2_INFER, INFER, json={"inputs": []})


async def wait_until(condition, timeout_s: float = 3.0) -> None:
    await eventually(condition, timeout_s, interval=0.02, message="condition not reached in time")


async def test_round_robin_spreads_requests_evenly() -> None:
    a, b = await start_upstream(), await start_upstream()
    async with running([a.url, b.url], a, b) as (backend, _):
        for _ in range(10):
            assert (await backend.handle(infer_ctx())).status == 200
    assert (len(a.seen), len(b.seen)) == (5, 5)


async def test_dead_upstream_is_ejected_then_trialled_back_in() -> None:
    live = await start_upstream()
    dead_port = free_port()
    dead_url = f"http://127.0.0.1:{dead_port}"
    metrics = Metrics()
    clock = FakeClock()
    async with running([live.url, dead_url], live, retries=0, eject_after_failures=2, eject_for_s=0.4,
                       metrics=metrics, clock=clock) as (backend, started):
        outcomes = Counter()
        for _ in range(8):
            try:
                await backend.handle(infer_ctx())
                outcomes["ok"] += 1
            except BackendError:
                outcomes["502"] += 1
        # two failures eject the dead one; everything after goes to the live one
        assert outcomes == Counter({"ok": 6, "502": 2})
        dead = backend.upstreams[1]
        assert not dead.in_rotation
        healthy = {"model": "digits", "upstream": dead_url}
        assert metrics.registry.get_sample_value("maas_upstream_healthy", healthy) == 0
        assert metrics.registry.get_sample_value("maas_upstream_ejections_total", healthy) == 1
        assert backend.ready()

        revived = await start_upstream(port=dead_port)
        started.append(revived)
        for _ in range(4):  # still ejected: the revived server gets nothing yet
            await backend.handle(infer_ctx())
        assert revived.seen == []
        clock.advance(0.39)
        await backend.handle(infer_ctx())
        assert revived.seen == []  # not yet: 10 ms of the ejection left
        clock.advance(0.02)  # the thing under test: eject_for_s (0.4 s) runs out
        for _ in range(4):
            await backend.handle(infer_ctx())
        assert len(revived.seen) >= 2  # the trial request, then its share of the rotation
        assert dead.in_rotation
        assert metrics.registry.get_sample_value("maas_upstream_healthy", healthy) == 1


async def test_failed_trial_ejects_again() -> None:
    live = await start_upstream()
    dead_url = f"http://127.0.0.1:{free_port()}"
    clock = FakeClock()
    async with running([dead_url, live.url], live, retries=0, eject_after_failures=1, eject_for_s=0.2,
                       clock=clock) as (backend, _):
        with pytest.raises(BackendError):
            await backend.handle(infer_ctx())
        dead = backend.upstreams[0]
        assert not dead.in_rotation
        clock.advance(0.25)  # the thing under test: eject_for_s (0.2 s) runs out
        with pytest.raises(BackendError):  # the trial request goes to the dead one and fails
            await backend.handle(infer_ctx())
        for _ in range(3):  # ejected again at once: no second trial
            assert (await backend.handle(infer_ctx())).status == 200
        assert not dead.in_rotation


async def test_503_answers_count_towards_ejection() -> None:
    async def sick(request: web.Request) -> web.Response:
        return web.Response(status=503, text="overloaded")

    bad, good = await start_upstream(sick), await start_upstream()
    async with running([bad.url, good.url], bad, good, eject_after_failures=2, eject_for_s=30) as (backend, _):
        statuses = [(await backend.handle(infer_ctx())).status for _ in range(8)]
    assert statuses.count(503) == 2 and len(bad.seen) == 2
    assert not backend.upstreams[0].in_rotation


async def test_success_resets_the_failure_count() -> None:
    flaky_calls = 0

    async def flaky(request: web.Request) -> web.Response:
        nonlocal flaky_calls
        flaky_calls += 1
        return web.Response(status=502 if flaky_calls % 2 else 200)

    up = await start_upstream(flaky)
    async with running([up.url], up, eject_after_failures=2) as (backend, _):
        for _ in range(6):  # fail, ok, fail, ok...: never two in a row
            await backend.handle(infer_ctx())
    assert backend.upstreams[0].in_rotation


async def test_all_ejected_is_panic_routed_never_503() -> None:
    port = free_port()
    async with running([f"http://127.0.0.1:{port}"], retries=0, eject_after_failures=1, eject_for_s=30,
                       max_ejection_percent=100) as (backend, started):
        with pytest.raises(BackendError):
            await backend.handle(infer_ctx())
        assert not backend.upstreams[0].in_rotation and not backend.ready()
        with pytest.raises(BackendError):  # tried anyway (panic routing): still down, so 502, not 503
            await backend.handle(infer_ctx())
        revived = await start_upstream(port=port)
        started.append(revived)
        # long before eject_for_s runs out, the very next request reaches the recovered upstream
        assert (await backend.handle(infer_ctx())).status == 200
        assert backend.upstreams[0].in_rotation and backend.ready()


async def test_connect_refused_is_retried_on_the_other_upstream() -> None:
    live = await start_upstream()
    dead_url = f"http://127.0.0.1:{free_port()}"
    async with running([dead_url, live.url], live, retries=1, eject_after_failures=100) as (backend, _):
        for _ in range(6):  # POSTs too: a refused connection never received a byte
            assert (await backend.handle(infer_ctx())).status == 200
    assert len(live.seen) == 6


async def test_retries_zero_means_no_retry() -> None:
    live = await start_upstream()
    async with running([f"http://127.0.0.1:{free_port()}", live.url], live, retries=0) as (backend, _):
        with pytest.raises(BackendError):
            await backend.handle(infer_ctx())
    assert live.seen == []


async def test_post_timeout_is_never_retried() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 5)
        return web.Response(text="late")

    slow_up, fast_up = await start_upstream(slow), await start_upstream()
    backend = make_backend([slow_up.url, fast_up.url], retries=3, timeout_s=0.3)
    await backend.start()
    try:
        with pytest.raises(BackendTimeout):
            await backend.handle(infer_ctx())
    finally:
        release.set()
        await backend.close()
        await slow_up.stop()
        await fast_up.stop()
    assert len(slow_up.seen) == 1 and fast_up.seen == []


def _hang_up_after_request():
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)  # the request reached us; then we drop the connection
    return script


async def test_post_is_not_retried_after_the_upstream_hung_up() -> None:
    rude = RawServer(_hang_up_after_request())
    good = await start_upstream()
    async with running([await rude.start(), good.url], rude, good, retries=1) as (backend, _):
        with pytest.raises(BackendError):
            await backend.handle(infer_ctx())
    assert rude.connections >= 1 and good.seen == []


async def test_get_is_retried_after_the_upstream_hung_up() -> None:
    rude = RawServer(_hang_up_after_request())
    good = await start_upstream()
    async with running([await rude.start(), good.url], rude, good, retries=1) as (backend, _):
        response = await backend.handle(make_ctx(RouteKind.V2_METADATA, "/v2/models/digits"))
    assert response.status == 200 and len(good.seen) == 1


async def test_active_probe_brings_an_upstream_back_without_traffic() -> None:
    healthy = False

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/health":
            return web.Response(status=200 if healthy else 503)
        return web.Response(status=503)

    def probed() -> int:
        return sum(s.path == "/health" for s in up.seen)

    up = await start_upstream(handler)
    clock = FakeClock()
    async with running([up.url], up, eject_after_failures=1, eject_for_s=0.1, health_path="/health",
                       headers={"Authorization": "Bearer upstream-secret"}, max_ejection_percent=100,
                       clock=clock) as (backend, _):
        await backend.handle(infer_ctx())  # 503: ejected
        assert not backend.upstreams[0].in_rotation
        assert not backend.ready()
        # every upstream out: panic routing still lets a request through (the upstream's own 503), never ours
        assert (await backend.handle(infer_ctx())).status == 503
        assert not backend.upstreams[0].in_rotation
        await wait_until(lambda: clock.sleepers == 1)  # the prober waits out eject_for_s before its first probe
        assert probed() == 0
        for probes in (1, 2):  # each eject_for_s (0.1 s) one probe, answered 503: waiting again, still out
            clock.advance(0.1)
            await wait_until(lambda: probed() == probes and clock.sleepers == 1)
            assert not backend.upstreams[0].in_rotation
        healthy = True
        clock.advance(0.1)
        await wait_until(lambda: backend.upstreams[0].in_rotation)
        assert backend.ready()
    probes = [s for s in up.seen if s.path == "/health"]
    assert len(probes) >= 2 and all(s.method == "GET" for s in probes)
    assert probes[0].headers["Authorization"] == "Bearer upstream-secret"


async def test_each_retry_goes_to_an_upstream_not_yet_tried() -> None:
    live = await start_upstream()
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    async with running([*dead, live.url], live, retries=2, eject_after_failures=100) as (backend, _):
        assert (await backend.handle(infer_ctx())).status == 200  # dead, dead, live
        with pytest.raises(BackendError):  # one retry only: dead, dead
            backend._retries = 1
            backend._pool._next = 0
            await backend.handle(infer_ctx())
    assert len(live.seen) == 1
    assert [u.failures for u in backend.upstreams[:2]] == [2, 2]
