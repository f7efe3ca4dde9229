"""Both quota stores, same tests: token-bucket arithmetic, isolation, concurrency slots, token budgets.

The Redis store runs against real Redis (a unique key prefix per test); the
memory store must admit exactly the same requests.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from gateway.config import QuotaConfig
from gateway.quota.memory_store import MemoryStore
from gateway.quota.redis_store import RedisStore
from gateway.quota.store import Limits, bucket_id, key_part
from tests.clock import FakeClock
from tests.quota_support import delete_prefix, unique_prefix


@pytest.fixture
def clock() -> FakeClock:
    """The memory store's clock (Redis keeps its own time, which only real time moves)."""
    return FakeClock()


@pytest.fixture(params=["memory", "redis"])
async def store(request, redis_url, clock):
    if request.param == "memory":
        s = MemoryStore(clock=clock)
        await s.start()
        yield s
        await s.close()
        return
    prefix = unique_prefix()
    s = RedisStore(QuotaConfig(store=redis_url, key_prefix=prefix, timeout_ms=500))
    await s.start()
    yield s
    await s.close()
    delete_prefix(redis_url, prefix)


RATE = Limits(rate_per_s=2.0, burst=3)


async def test_burst_then_refused_with_retry_after(store):
    verdicts = [await store.acquire("e:alice:digits", RATE, "", 0) for _ in range(4)]
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert [v.remaining for v in verdicts[:3]] == [2, 1, 0]
    refused = verdicts[3]
    assert refused.reason == "rate"
    assert refused.retry_after_s >= 1
    assert refused.remaining == 0
    # 3 tokens short at 2/s: the bucket is full again in 1.5 s -> 2 whole seconds
    assert refused.reset_s == 2


async def test_refills_after_waiting(store, clock):
    limits = Limits(rate_per_s=20.0, burst=2)
    assert (await store.acquire("e:a:m", limits, "", 0)).allowed
    assert (await store.acquire("e:a:m", limits, "", 0)).allowed
    assert not (await store.acquire("e:a:m", limits, "", 0)).allowed
    if isinstance(store, MemoryStore):
        clock.advance(0.04)
        assert not (await store.acquire("e:a:m", limits, "", 0)).allowed  # 0.8 of a token: not yet
        clock.advance(0.08)  # the thing under test: refill at 20/s, one token every 50 ms
    else:
        await asyncio.sleep(0.12)  # Redis refills by its own TIME, which only real time moves (20/s: 2 tokens)
    assert (await store.acquire("e:a:m", limits, "", 0)).allowed
    assert (await store.acquire("e:a:m", limits, "", 0)).allowed
    assert not (await store.acquire("e:a:m", limits, "", 0)).allowed


async def test_subjects_and_models_are_isolated(store):
    limits = Limits(rate_per_s=0.001, burst=1)
    assert (await store.acquire(bucket_id("e", "alice", "digits"), limits, "", 0)).allowed
    assert not (await store.acquire(bucket_id("e", "alice", "digits"), limits, "", 0)).allowed
    assert (await store.acquire(bucket_id("e", "bob", "digits"), limits, "", 0)).allowed
    assert (await store.acquire(bucket_id("e", "alice", "chat"), limits, "", 0)).allowed
    assert (await store.acquire(bucket_id("other", "alice", "digits"), limits, "", 0)).allowed


async def test_exact_count_under_concurrency(store):
    """N concurrent requests against burst B with no refill: exactly B are admitted."""
    limits = Limits(rate_per_s=0.0001, burst=25)
    results = await asyncio.gather(*(store.acquire("e:crowd:m", limits, "", 0) for _ in range(200)))
    assert sum(v.allowed for v in results) == 25
    assert all(v.retry_after_s >= 1 for v in results if not v.allowed)


async def test_concurrency_slots_exact_and_released(store):
    limits = Limits(max_concurrent=3)
    slots = [f"s{i}" for i in range(10)]
    results = await asyncio.gather(*(store.acquire("e:c:m", limits, s, 0) for s in slots))
    held = [s for s, v in zip(slots, results) if v.allowed]
    assert len(held) == 3
    refused = [v for v in results if not v.allowed]
    assert all(v.reason == "concurrency" and v.retry_after_s == 1 for v in refused)
    assert results[0].remaining == 2  # headline for a concurrency-only entry: slots left
    for s in held:
        await store.release("e:c:m", limits, s, 0)
    again = await asyncio.gather(*(store.acquire("e:c:m", limits, f"t{i}", 0) for i in range(4)))
    assert sum(v.allowed for v in again) == 3


async def test_refusal_takes_nothing_from_other_limits(store):
    """A request refused for concurrency does not spend a rate token."""
    limits = Limits(rate_per_s=0.0001, burst=5, max_concurrent=1)
    assert (await store.acquire("e:x:m", limits, "a", 0)).allowed
    for i in range(5):
        assert (await store.acquire("e:x:m", limits, f"b{i}", 0)).reason == "concurrency"
    await store.release("e:x:m", limits, "a", 0)
    v = await store.acquire("e:x:m", limits, "c", 0)
    assert v.allowed and v.remaining == 3


async def test_token_budget_reserve_and_reconcile(store):
    limits = Limits(tokens_per_minute=1000)
    first = await store.acquire("e:t:m", limits, "", 600)
    assert first.allowed and first.remaining == 400
    refused = await store.acquire("e:t:m", limits, "", 500)  # would overshoot: refused up front
    assert not refused.allowed and refused.reason == "tokens" and refused.retry_after_s >= 1
    await store.release("e:t:m", limits, "", 600 - 100)  # used only 100 of the 600 reserved
    second = await store.acquire("e:t:m", limits, "", 500)
    assert second.allowed and 395 <= second.remaining <= 410
    # used far more than reserved: the overshoot is charged and becomes a debt
    await store.release("e:t:m", limits, "", 500 - 1500)
    assert not (await store.acquire("e:t:m", limits, "", 1)).allowed


async def test_request_larger_than_budget_is_refused(store):
    v = await store.acquire("e:big:m", Limits(tokens_per_minute=100), "", 101)
    assert not v.allowed and v.reason == "tokens" and v.retry_after_s == 60


async def test_limit_lowered_on_reload_caps_tokens(store):
    await store.acquire("e:r:m", Limits(rate_per_s=0.001, burst=100), "", 0)
    v = await store.acquire("e:r:m", Limits(rate_per_s=0.001, burst=2), "", 0)
    assert v.allowed and v.remaining == 1


async def test_extreme_limits_stay_exact(store):
    """A bucket that refills once in decades, or holds a billion tokens, still counts exactly."""
    slow = Limits(rate_per_s=1e-9, burst=2)
    assert [(await store.acquire("e:slow:m", slow, "", 0)).allowed for _ in range(3)] == [True, True, False]
    refused = await store.acquire("e:slow:m", slow, "", 0)
    assert refused.retry_after_s >= 10**9
    huge = Limits(rate_per_s=1e-6, burst=10**9)
    v = await store.acquire("e:huge:m", huge, "", 0)
    assert v.allowed and v.remaining == 10**9 - 1


def test_key_parts_cannot_collide():
    assert bucket_id("e", "a:b", "c") != bucket_id("e", "a", "b:c")
    assert bucket_id("e", "a%3Ab", "c") != bucket_id("e", "a:b", "c")
    assert "{" not in key_part("x{y}z") and "}" not in key_part("x{y}z")
    long = "s" * 1000
    assert len(key_part(long)) < 80 and key_part(long) != key_part(long + "t")
    assert key_part("~" + "0" * 64) != key_part("x" * 200)


async def test_redis_keys_expire_when_idle(redis_url):
    prefix = unique_prefix()
    s = RedisStore(QuotaConfig(store=redis_url, key_prefix=prefix))
    await s.start()
    try:
        await s.acquire("e:idle:m", Limits(rate_per_s=10.0, burst=5), "", 0)
        client = aioredis.from_url(redis_url)
        ttl = await client.pttl(s.keys("e:idle:m")[0])
        await client.aclose()
        # one token short at 10/s: full again in 100 ms, plus a 1 s margin
        assert 0 < ttl <= 1100
    finally:
        await s.close()
        delete_prefix(redis_url, prefix)


async def test_redis_uses_server_time_not_gateway_clock(redis_url, monkeypatch):
    """A gateway whose clock jumps ahead must not refill anybody's bucket."""
    prefix = unique_prefix()
    s = RedisStore(QuotaConfig(store=redis_url, key_prefix=prefix))
    await s.start()
    try:
        limits = Limits(rate_per_s=0.01, burst=1)
        assert (await s.acquire("e:clock:m", limits, "", 0)).allowed
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600)
        assert not (await s.acquire("e:clock:m", limits, "", 0)).allowed
    finally:
        monkeypatch.undo()
        await s.close()
        delete_prefix(redis_url, prefix)


async def test_memory_store_is_bounded():
    s = MemoryStore(max_buckets=100)
    for i in range(1000):
        await s.acquire(f"e:{i}:m", Limits(rate_per_s=1.0, burst=5), "", 0)
    assert s.bucket_count() <= 100


async def test_leased_allowances_never_exceed_the_global_bucket(redis_url):
    """Two replicas leasing small allowances from one busy bucket: never above the limit, barely below."""
    from gateway.quota.redis_store import lease_size

    prefix = unique_prefix()
    limits = Limits(rate_per_s=100.0, burst=400)
    assert lease_size(limits) == 10
    replicas = [RedisStore(QuotaConfig(store=redis_url, key_prefix=prefix, timeout_ms=1000)) for _ in range(2)]
    for r in replicas:
        await r.start()
    try:
        started = time.monotonic()
        results = await asyncio.gather(*(replicas[i % 2].acquire("e:busy:m", limits, "", 0) for i in range(1000)))
        elapsed = time.monotonic() - started
        allowed = sum(v.allowed for v in results)
        assert allowed <= 400 + 100 * elapsed + 1
        assert allowed >= 400 - 2 * 10
        assert all(v.retry_after_s >= 1 for v in results if not v.allowed)
    finally:
        for r in replicas:
            await r.close()
        delete_prefix(redis_url, prefix)


async def test_a_lease_is_taken_from_redis_spent_locally_and_expires(redis_url):
    from gateway.quota import redis_store

    prefix = unique_prefix()
    clock = FakeClock()  # the lease window's clock (the bucket in Redis refills on Redis's own)
    s = RedisStore(QuotaConfig(store=redis_url, key_prefix=prefix), clock=clock)
    await s.start()
    try:
        limits = Limits(rate_per_s=0.5 * 100 / redis_store.LEASE_WINDOW_S, burst=1000)  # lease of 50
        read_at = time.monotonic()
        first = await s.acquire("e:lease:m", limits, "", 0)
        assert first.allowed and first.remaining == 1000 - 50 + 49
        client = aioredis.from_url(redis_url)
        stored = float((await client.get(s.keys("e:lease:m")[0])).split()[0])
        assert 950 <= stored < 951  # the whole allowance left the global bucket at once
        for _ in range(49):  # spent locally: no round trip, the global bucket is untouched
            assert (await s.acquire("e:lease:m", limits, "", 0)).allowed
        assert float((await client.get(s.keys("e:lease:m")[0])).split()[0]) == stored
        assert (await s.acquire("e:lease:m", limits, "", 0)).allowed  # spent: the next one takes a new lease
        stored2 = float((await client.get(s.keys("e:lease:m")[0])).split()[0])
        refilled = limits.rate_per_s * (time.monotonic() - read_at)  # the bucket refills meanwhile (slow machines)
        assert stored2 <= stored - 50 + refilled + 1e-6
        assert (await s.acquire("e:lease:m", limits, "", 0)).allowed  # from the new lease: Redis untouched
        assert float((await client.get(s.keys("e:lease:m")[0])).split()[0]) == stored2
        clock.advance(redis_store.LEASE_WINDOW_S)  # the thing under test: an old lease's unspent tokens drop
        assert (await s.acquire("e:lease:m", limits, "", 0)).allowed
        assert float((await client.get(s.keys("e:lease:m")[0])).split()[0]) != stored2
        await client.aclose()
    finally:
        await s.close()
        delete_prefix(redis_url, prefix)


async def test_requests_arriving_while_an_allowance_is_asked_for_wait_for_it(redis_url):
    """A busy bucket's requests that arrive while this replica asks Redis for an allowance share it: a burst
    of them is a few round trips, not one each (which is what made Redis a tenth of a request's cost)."""
    prefix = unique_prefix()
    limits = Limits(rate_per_s=500.0, burst=10_000)  # a lease of 50 tokens
    s = RedisStore(QuotaConfig(store=redis_url, key_prefix=prefix, timeout_ms=1000))
    await s.start()
    client = aioredis.from_url(redis_url)
    try:
        async def script_calls() -> int:
            stats = await client.info("commandstats")
            return sum(int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))

        before = await script_calls()
        results = await asyncio.gather(*(s.acquire("e:burst:m", limits, "", 0) for _ in range(200)))
        calls = await script_calls() - before
        assert all(v.allowed for v in results)
        assert calls <= 200 // 50 + 4, calls  # (other tests' scripts may run meanwhile: a little slack)
    finally:
        await client.aclose()
        await s.close()
        delete_prefix(redis_url, prefix)
