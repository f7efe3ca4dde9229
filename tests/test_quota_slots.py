"""``max_concurrent`` holds for the whole life of a request, however long it streams.

A slot in Redis is a sorted-set member scored with its expiry, so that a
crashed replica's slots free themselves. The slots of live requests are
refreshed by one task per store; these tests shrink the TTL to 1 s (the
internal ``SLOT_TTL_S``) and prove, over real HTTP, real SSE upstreams and
real Redis, that a stream several TTLs long keeps its slot, that the slot is
freed when the stream ends, and that a slot nobody refreshes still expires.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.config import QuotaConfig
from gateway.quota import store as store_module
from gateway.quota.live_slots import LiveSlots
from gateway.quota.redis_store import RedisStore
from gateway.quota.store import Limits, StoreError, bucket_id
from tests import harness
from tests.clock import FakeClock
from tests.harness import ALLOW_ANALYSTS, Keys, eventually, openai_model, start_gateway, start_upstream
from tests.quota_support import delete_prefix, unique_prefix
from tests.upstreams import fake_openai

TTL_S = 1.0
STREAM_S = 3.6  # several TTLs
CHUNKS = 12


# streams for STREAM_S when asked to stream; answers a short JSON otherwise
_slow_stream = fake_openai(content="tok", chunks=CHUNKS, answer_usage=(1, 1), gap_s=lambda body: STREAM_S / CHUNKS)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["redis", "memory"])
async def test_a_stream_longer_than_the_slot_ttl_keeps_its_slot(tmp_path: Path, keys: Keys, redis_url: str,
                                                              monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    monkeypatch.setattr(store_module, "SLOT_TTL_S", TTL_S)
    prefix = unique_prefix()
    up = await start_upstream(_slow_stream)
    gw = await start_gateway(tmp_path, keys, models={"chat": openai_model(up.url)},
                             policy={**ALLOW_ANALYSTS, "quotas": [{"id": "one", "roles": ["analyst"],
                                                                   "models": ["chat"], "max_concurrent": 1}]},
                             server={"upstream_timeout_s": 30},
                             quota={"store": "memory" if kind == "memory" else redis_url, "key_prefix": prefix})
    url = gw.url + "/v1/chat/completions"
    admin = aioredis.from_url(redis_url)
    slots_key = gw.gateway.quota.store.keys(bucket_id("one", "alice", "chat"))[1] if kind == "redis" else ""
    try:
        async with aiohttp.ClientSession() as s:
            short = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}

            async def second() -> int:
                async with s.post(url, json=short, headers=keys.auth()) as r:
                    await r.read()
                    return r.status

            async with s.post(url, json={**short, "stream": True}, headers=keys.auth()) as stream:
                assert stream.status == 200
                started = time.monotonic()
                await stream.content.readuntil(b"\n\n")
                refused = []
                for at in (1.5 * TTL_S, 2.5 * TTL_S, 3.2 * TTL_S):  # each past the TTL of the slot's last write
                    await asyncio.sleep(max(0.0, started + at - time.monotonic()))  # Redis expires slots on its own clock: real time past the TTL
                    refused.append(await second())
                    if kind == "redis":
                        assert await admin.zcard(slots_key) == 1
                assert refused == [429, 429, 429]
                rest = await stream.read()
                assert rest.endswith(b"data: [DONE]\n\n")
                assert time.monotonic() - started > 3 * TTL_S  # the stream really outlived the TTL
            async def admitted() -> bool:  # the slot is given back when the stream ends (released after the body)
                return await second() == 200

            await eventually(admitted, timeout=2.5, interval=0.05)
        if kind == "redis":
            assert await admin.zcard(slots_key) == 0
    finally:
        await admin.aclose()
        await gw.stop()
        await up.stop()
        delete_prefix(redis_url, prefix)


async def test_a_crashed_replicas_slot_still_expires(redis_url: str) -> None:
    """A replica that dies holding a slot never refreshes it: the slot frees itself after the TTL,
    while the slots of a live replica sharing the bucket are kept."""
    prefix = unique_prefix()
    config = QuotaConfig(store=redis_url, key_prefix=prefix, timeout_ms=1000)
    crashed, live = RedisStore(config, slot_ttl_s=TTL_S), RedisStore(config, slot_ttl_s=TTL_S)
    limits = Limits(max_concurrent=2)
    bucket = bucket_id("e", "alice", "chat")
    await crashed.start()
    await live.start()
    try:
        assert (await crashed.acquire(bucket, limits, "dead.1", 0)).allowed
        await crashed.close()  # gone without releasing: its refresher stops with it
        assert (await live.acquire(bucket, limits, "live.1", 0)).allowed
        assert not (await live.acquire(bucket, limits, "live.2", 0)).allowed  # both slots held
        await asyncio.sleep(2.5 * TTL_S)  # Redis expires the dead replica's slot on its own clock (TTL)
        assert (await live.acquire(bucket, limits, "live.2", 0)).allowed  # the dead replica's slot expired
        assert not (await live.acquire(bucket, limits, "live.3", 0)).allowed  # live.1 was kept all along
        await live.release(bucket, limits, "live.1", 0)
        await live.release(bucket, limits, "live.2", 0)
        assert live.live_slots() == 0
        admin = aioredis.from_url(redis_url)
        assert await admin.zcard(live.keys(bucket)[1]) == 0
        await admin.aclose()
    finally:
        await live.close()
        delete_prefix(redis_url, prefix)


async def test_released_slots_are_never_brought_back_by_a_refresh(redis_url: str) -> None:
    """A refresh only pushes existing slots forward (ZADD XX): a slot released while the refresh was
    on its way stays released; the key of the live slots does not expire either."""
    prefix = unique_prefix()
    store = RedisStore(QuotaConfig(store=redis_url, key_prefix=prefix, timeout_ms=1000), slot_ttl_s=TTL_S)
    await store.start()
    admin = aioredis.from_url(redis_url)
    try:
        limits = Limits(max_concurrent=5)
        bucket = bucket_id("e", "bob", "chat")
        for slot in ("a", "b"):
            assert (await store.acquire(bucket, limits, slot, 0)).allowed
        key = store.keys(bucket)[1]
        await store.release(bucket, limits, "a", 0)
        await store.refresh_slots({key: ["a", "b"]})  # a stale snapshot still naming "a"
        assert [m.decode() for m in await admin.zrange(key, 0, -1)] == ["b"]
        await asyncio.sleep(2 * TTL_S)  # Redis TTLs run on Redis's clock: two real TTLs of refreshes never bring "a" back
        assert [m.decode() for m in await admin.zrange(key, 0, -1)] == ["b"]
        assert 0 < await admin.pttl(key) <= TTL_S * 1000
        await store.release(bucket, limits, "b", 0)
    finally:
        await admin.aclose()
        await store.close()
        delete_prefix(redis_url, prefix)


async def test_one_refresh_call_carries_every_live_slot() -> None:
    """The refresher makes one store call per interval for all live slots, not one per request,
    and retries soon after a failed call."""
    calls: list[dict[str, list[str]]] = []
    fail = [True]

    async def refresh(snapshot: dict[str, list[str]]) -> None:
        calls.append(snapshot)
        if fail[0]:
            fail[0] = False
            raise StoreError("down")

    clock = FakeClock()
    live = LiveSlots(0.6, refresh, retry_s=0.02, sleep=clock.sleep)
    for i in range(300):
        live.add(f"k{i % 100}", f"s{i}")
    live.discard("k0", "s0")
    live.discard("k0", "nope")
    live.start()
    async with harness.closing(live):
        await eventually(lambda: clock.sleepers == 1)  # waiting for the first interval (TTL/3 = 0.2 s)
        clock.advance(0.19)
        await clock.settle()
        assert calls == []
        clock.advance(0.02)  # the thing under test: the first refresh, at 0.2 s (it fails)
        await eventually(lambda: len(calls) == 1 and clock.sleepers == 1)
        clock.advance(0.02)  # retried soon (retry_s), not a whole interval later
        await eventually(lambda: len(calls) == 2 and clock.sleepers == 1)
        clock.advance(0.19)  # the next one is due a whole interval after the retry
        await clock.settle()
        assert len(calls) == 2
        clock.advance(0.02)
        await eventually(lambda: len(calls) == 3)
    assert len(calls[1]) == 100 and sum(len(v) for v in calls[1].values()) == 299
    assert len(live) == 299
