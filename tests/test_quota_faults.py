"""Redis faults: a frozen (SIGSTOP), killed and restarted redis-server never hangs a request.

Each test starts its own redis-server on a free port and freezes, kills or
restarts it by PID. Under ``deny`` every call answers 503 (``Unavailable``)
within the timeout plus a margin; under ``allow`` it passes (``store_error``).
When Redis is back, quotas are enforced again without a restart.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.config import QuotaConfig
from gateway.errors import RateLimited, Unavailable
from gateway.metrics import Metrics
from gateway.policy.document import QuotaRule
from gateway.quota.store import bucket_id
from gateway.quota.stores import open_store
from gateway.stages.quota import Quota
from tests import harness
from tests.harness import eventually, redis_server
from tests.quota_support import Policy, context, document, finish

TIMEOUT_MS = 100
MARGIN_S = 0.4  # scheduling slack on a busy 2-core CI machine


@pytest.fixture
async def server(tmp_path):
    async with redis_server(tmp_path / "redis") as s:
        yield s


async def make(url: str, on_store_error: str, *rules: QuotaRule) -> Quota:
    cfg = QuotaConfig(store=url, key_prefix="f:", on_store_error=on_store_error, timeout_ms=TIMEOUT_MS)
    metrics = Metrics()
    rules = rules or (QuotaRule(roles=["analyst"], rate_per_s=0.001, burst=1000),)
    stage = Quota(cfg, metrics, Policy(document(*rules)), open_store(cfg, metrics))
    await stage.start()
    return stage


async def timed(stage: Quota, subject: str = "alice") -> tuple[str, float]:
    ctx = context(subject)
    t0 = time.monotonic()
    try:
        await stage(ctx)
        outcome = ctx.quota
    except Unavailable:
        outcome = "503"
    except RateLimited:
        outcome = "429"
    finally:
        await finish(ctx)
    return outcome, time.monotonic() - t0


async def wait_for_outcome(stage: Quota, want: str, within_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        outcome, _ = await timed(stage)
        if outcome == want:
            return time.monotonic() - t0
        await asyncio.sleep(0.02)  # the poll interval of this timed wait on a condition, not a clock
    raise AssertionError(f"still not {want!r} after {within_s} s")


@pytest.mark.parametrize("mode,expect", [("deny", "503"), ("allow", "store_error")])
async def test_frozen_redis_never_hangs_a_request(server, mode, expect):
    stage = await make(server.url, mode)
    try:
        assert (await timed(stage))[0] == "ok"
        server.freeze()
        # a burst of concurrent requests mid-traffic, then a steady trickle
        burst = await asyncio.gather(*(timed(stage, f"user{i}") for i in range(32)))
        trickle = [await timed(stage) for _ in range(10)]
        for outcome, elapsed in burst + trickle:
            assert outcome == expect
            assert elapsed < TIMEOUT_MS / 1000 + MARGIN_S
        if mode == "deny":
            assert stage.ready() is not None
        assert stage.metrics.registry.get_sample_value("maas_quota_store_up") == 0
        assert stage.metrics.registry.get_sample_value("maas_quota_store_errors_total") >= 42
        server.thaw()
        await wait_for_outcome(stage, "ok", within_s=2.0)
        await eventually(lambda: stage.ready() is None  # the health check runs every second
                         and stage.metrics.registry.get_sample_value("maas_quota_store_up") == 1, timeout=3)
    finally:
        server.thaw()
        await stage.close()


@pytest.mark.parametrize("mode,expect", [("deny", "503"), ("allow", "store_error")])
async def test_killed_then_restarted_redis(server, tmp_path, mode, expect):
    async with harness.closing(await make(server.url, mode, QuotaRule(roles=["analyst"], rate_per_s=0.001, burst=2))) as stage:
        assert (await timed(stage))[0] == "ok"
        server.kill()
        results = await asyncio.gather(*(timed(stage) for _ in range(20)))
        for outcome, elapsed in results:
            assert outcome == expect
            assert elapsed < TIMEOUT_MS / 1000 + MARGIN_S
        async with redis_server(tmp_path / "redis2", port=server.port):  # the same port, restarted
            # enforced again within 2 s: a fresh Redis has a fresh bucket (burst 2), then 429
            took = await wait_for_outcome(stage, "ok", within_s=2.0)
            assert took < 2.0
            outcomes = [(await timed(stage))[0] for _ in range(3)]
            assert outcomes[-1] == "429"


async def test_slot_of_a_request_that_vanished_mid_call_is_repaired(server):
    """Redis admits a request whose client already left: the slot is given back, not held for ever."""
    import redis.asyncio as aioredis

    cfg = QuotaConfig(store=server.url, key_prefix="f:", on_store_error="deny", timeout_ms=2000)
    metrics = Metrics()
    stage = Quota(cfg, metrics, Policy(document(QuotaRule(id="c", roles=["analyst"], max_concurrent=5))),
                  open_store(cfg, metrics))
    await stage.start()
    admin = aioredis.from_url(server.url)
    slots_key = stage.store.keys(bucket_id("c", "alice", "digits"))[1]
    try:
        await admin.client_pause(400, all=False)  # writes wait 400 ms: our script is held in Redis
        ctx = context()
        task = asyncio.create_task(stage(ctx))
        await asyncio.sleep(0.1)  # the acquire reaches Redis and is held there by the pause (not observable here)
        task.cancel()  # the client goes away while its acquire is in flight
        with pytest.raises(asyncio.CancelledError):
            await task
        async def slots(n: int) -> bool:
            return await admin.zcard(slots_key) == n

        await eventually(lambda: slots(1), timeout=3)  # the pause ends; Redis runs the script, admits the vanished one
        assert await admin.zcard(slots_key) == 1
        assert stage.store.pending_repairs() == 1
        await eventually(lambda: slots(0), timeout=3, interval=0.1)  # the health loop (every second) frees it
        assert stage.store.pending_repairs() == 0
    finally:
        await admin.aclose()
        await stage.close()


async def test_readiness_never_blocks_and_names_the_store(server):
    stage = await make(server.url, "deny")
    try:
        await timed(stage)
        assert stage.ready() is None
        server.freeze()
        await timed(stage)
        t0 = time.monotonic()
        reason = stage.ready()
        assert time.monotonic() - t0 < 0.01
        assert reason is not None and f"127.0.0.1:{server.port}" in reason
    finally:
        server.thaw()
        await stage.close()

