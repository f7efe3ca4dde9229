"""The quota stage: entry selection from the live policy, headers, 429s, slots and token budgets.

Runs against both stores; Redis is the real local one with a unique key prefix.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gateway.config import QuotaConfig
from gateway.errors import RateLimited, Unavailable
from gateway.metrics import Metrics
from gateway.pipeline import RouteKind, Usage
from gateway.policy.document import QuotaRule
from gateway.quota.store import bucket_id
from gateway.quota.stores import open_store
from gateway.stages.quota import Quota
from tests.harness import eventually, redis_server
from tests.quota_support import Policy, context, delete_prefix, document, finish, free_port, unique_prefix


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return value or 0.0


@pytest.fixture(params=["memory", "redis"])
async def make_stage(request, redis_url):
    made: list[tuple[Quota, str | None]] = []

    async def make(*rules: QuotaRule, on_store_error: str = "deny", store: str | None = None, **config) -> Quota:
        url = store or ("memory" if request.param == "memory" else redis_url)
        prefix = unique_prefix()
        cfg = QuotaConfig(store=url, key_prefix=prefix, on_store_error=on_store_error, **config)
        metrics = Metrics()
        stage = Quota(cfg, metrics, Policy(document(*rules)), open_store(cfg, metrics))
        await stage.start()
        made.append((stage, None if url == "memory" else prefix))
        return stage

    make.kind = request.param  # type: ignore[attr-defined]
    yield make
    for stage, prefix in made:
        await stage.close()
        if prefix is not None:
            delete_prefix(redis_url, prefix)


async def inflight(stage: Quota, bucket: str) -> int:
    store = stage.store
    if hasattr(store, "inflight"):
        return store.inflight(bucket)
    client = aioredis.from_url(stage.config.store)
    try:
        return int(await client.zcard(store.keys(bucket)[1]))
    finally:
        await client.aclose()


async def test_burst_then_429_with_headers(make_stage):
    stage = await make_stage(QuotaRule(id="analysts", roles=["analyst"], models=["*"], rate_per_s=1.0, burst=3))
    remaining = []
    for _ in range(3):
        ctx = context()
        await stage(ctx)
        assert ctx.quota == "ok"
        assert ctx.response_headers["RateLimit-Limit"] == "3"
        remaining.append(int(ctx.response_headers["RateLimit-Remaining"]))
        assert int(ctx.response_headers["RateLimit-Reset"]) >= 1
    assert remaining == [2, 1, 0]
    ctx = context()
    with pytest.raises(RateLimited) as info:
        await stage(ctx)
    assert ctx.quota == "limited"
    assert int(info.value.headers["Retry-After"]) >= 1
    assert info.value.headers["RateLimit-Limit"] == "3"
    assert info.value.headers["RateLimit-Remaining"] == "0"
    assert sample(stage.metrics, "maas_quota_rejections_total", model="digits", reason="rate") == 1


async def test_no_matching_entry_is_not_limited(make_stage):
    stage = await make_stage(QuotaRule(subjects=["svc-batch"], models=["digits"], rate_per_s=0.001, burst=1))
    for _ in range(5):
        ctx = context("alice")
        await stage(ctx)
        assert ctx.quota == "none" and "RateLimit-Limit" not in ctx.response_headers


async def test_most_specific_entry_applies(make_stage):
    stage = await make_stage(
        QuotaRule(roles=["analyst"], models=["*"], rate_per_s=0.001, burst=1),
        QuotaRule(subjects=["svc-batch"], models=["digits"], rate_per_s=0.001, burst=4),
    )
    for _ in range(4):
        await stage(context("svc-batch", ("analyst",)))
    with pytest.raises(RateLimited):
        await stage(context("svc-batch", ("analyst",)))
    await stage(context("alice", ("analyst",)))
    with pytest.raises(RateLimited):
        await stage(context("alice", ("analyst",)))


async def test_effective_roles_from_the_decision_are_used(make_stage):
    stage = await make_stage(QuotaRule(roles=["analyst"], models=["*"], rate_per_s=0.001, burst=1))
    ctx = context("alice", ("data-scientist",))
    ctx.decision = type(ctx.decision)(True, "r", ("data-scientist", "analyst"))  # inherited analyst
    await stage(ctx)
    assert ctx.quota == "ok"


async def test_policy_reload_swaps_quotas(make_stage):
    stage = await make_stage(QuotaRule(id="q", roles=["analyst"], rate_per_s=0.001, burst=1))
    await stage(context())
    with pytest.raises(RateLimited):
        await stage(context())
    stage.policy.document = document(QuotaRule(id="q", roles=["analyst"], rate_per_s=1000.0, burst=5))
    await asyncio.sleep(0.01)  # real time (Redis TIME for the redis store): 10 ms at the new rate refills the bucket
    ctx = context()
    await stage(ctx)  # same entry id, same bucket: refilled at the new rate, up to the new burst
    assert ctx.response_headers["RateLimit-Limit"] == "5"
    stage.policy.document = document()
    ctx = context()
    await stage(ctx)
    assert ctx.quota == "none"


async def test_concurrency_limit_leaks_nothing_after_1000_aborted_requests(make_stage):
    """Cancelled, failed and timed-out requests all give their slot back (and so may the next ones)."""
    stage = await make_stage(QuotaRule(id="c", roles=["analyst"], models=["*"], max_concurrent=40))
    bucket = bucket_id("c", "alice", "digits")
    admitted = refused = 0

    async def request(i: int) -> None:
        nonlocal admitted, refused
        ctx = context(request_id="same-id-every-time")
        try:
            await stage(ctx)
            admitted += 1
            if i % 3 == 0:
                raise RuntimeError("backend failed")
            if i % 3 == 1:
                async with asyncio.timeout(0.01):  # upstream timeout
                    await asyncio.sleep(10)  # the thing under test: an upstream that never answers
            await asyncio.sleep(10)  # the thing under test: the client goes away (cancelled below)
        except RateLimited:
            refused += 1
        finally:
            await finish(ctx)

    for round_ in range(5):
        before = admitted + refused
        tasks = [asyncio.create_task(request(round_ * 200 + i)) for i in range(200)]
        if round_ % 2:
            await asyncio.sleep(0)  # one loop turn, not a clock: some cancelled while their store call is in flight
        else:
            for _ in range(20):  # until the store has answered: a GC pause can outlast one 50 ms nap
                await asyncio.sleep(0.05)  # the poll interval of this wait on a condition (it may also give up)
                if admitted + refused > before:
                    break
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert admitted >= 40 and refused > 0
    async def repaired() -> bool:  # slots of requests cancelled mid-call are repaired by the health loop (1 s)
        return await inflight(stage, bucket) == 0

    await eventually(repaired, timeout=4, interval=0.1)
    # and the full limit is available again
    ctxs = [context() for _ in range(40)]
    for ctx in ctxs:
        await stage(ctx)
    with pytest.raises(RateLimited) as info:
        await stage(context())
    assert info.value.headers["Retry-After"] == "1"
    for ctx in ctxs:
        await finish(ctx)
    assert await inflight(stage, bucket) == 0


async def test_a_finished_request_does_not_wait_for_its_slot_to_be_given_back(make_stage):
    """The release runs on its own: a store slow to answer delays neither the end of the request nor the
    next request on its connection, and the slot still comes back (shutdown waits for it)."""
    stage = await make_stage(QuotaRule(id="c", roles=["analyst"], models=["*"], max_concurrent=1))
    bucket = bucket_id("c", "alice", "digits")
    store = stage.store
    answer = asyncio.Event()
    release = store.release

    async def slow_release(*args, **kwargs):
        await answer.wait()  # a store that takes its time
        await release(*args, **kwargs)

    store.release = slow_release
    ctx = context()
    await stage(ctx)
    for callback in ctx._cleanups:  # what Gateway.finish does: returns at once, the release is in flight
        assert callback(ctx) is None
    assert await inflight(stage, bucket) == 1
    answer.set()
    await finish(ctx)  # (the test's helper also waits for the releases it started)
    assert await inflight(stage, bucket) == 0
    again = context()
    await stage(again)  # the one slot is free again
    assert again.quota == "ok"
    await finish(again)


async def test_token_budget_charged_from_usage_and_enforced(make_stage):
    stage = await make_stage(QuotaRule(roles=["analyst"], models=["chat"], tokens_per_minute=1000),
                             default_tokens_per_request=100)
    body = {"model": "chat", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 200}
    ctx = context(model="chat", kind=RouteKind.OPENAI, body=body)
    await stage(ctx)  # reserves 100 + 200
    assert ctx.quota == "ok" and ctx.response_headers["RateLimit-Remaining"] == "700"
    ctx.status, ctx.usage = 200, Usage(answered=True, total_tokens=650)  # the upstream reported more than estimated
    await finish(ctx)
    assert sample(stage.metrics, "maas_quota_llm_tokens_total", model="chat") == 650
    over = context(model="chat", kind=RouteKind.OPENAI, body=body)
    with pytest.raises(RateLimited) as info:  # 350 left, 300 needed... minus refill; ask for more
        over.json = {**body, "max_tokens": 400}
        await stage(over)
    assert info.value.message == "token budget exceeded"
    small = context(model="chat", kind=RouteKind.OPENAI, body={**body, "max_tokens": 10})
    await stage(small)
    small.status, small.usage = 200, Usage(answered=True)  # answered, but its usage never arrived: all 100 + 10 reserved
    await finish(small)
    assert sample(stage.metrics, "maas_quota_llm_tokens_total", model="chat") == 650 + 110
    failed = context(model="chat", kind=RouteKind.OPENAI, body={**body, "max_tokens": 10})
    await stage(failed)
    failed.status = 502  # the upstream never answered: nothing charged, the reservation comes back
    await finish(failed)
    assert sample(stage.metrics, "maas_quota_llm_tokens_total", model="chat") == 650 + 110


async def test_token_budget_ignored_off_openai_routes(make_stage):
    stage = await make_stage(QuotaRule(roles=["analyst"], models=["*"], tokens_per_minute=1))
    ctx = context()
    await stage(ctx)
    assert ctx.quota == "none"


async def test_unreachable_store_deny_is_503_allow_passes(make_stage):
    if make_stage.kind == "memory":
        pytest.skip("the memory store cannot fail")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    rule = QuotaRule(roles=["analyst"], rate_per_s=1.0, burst=1)
    deny = await make_stage(rule, store=dead, on_store_error="deny", timeout_ms=100)
    with pytest.raises(Unavailable):
        await deny(context())
    assert deny.ready() is not None and "unreachable" in deny.ready()
    allow = await make_stage(rule, store=dead, on_store_error="allow", timeout_ms=100)
    for _ in range(3):
        ctx = context()
        await allow(ctx)
        assert ctx.quota == "store_error"
    assert sample(allow.metrics, "maas_quota_store_errors_total") == 3
    assert sample(allow.metrics, "maas_quota_store_up") == 0
    assert allow.ready() is None  # allow: the store is not required


async def test_noscript_after_script_flush_recovers(tmp_path):
    async with redis_server(tmp_path / "redis") as server:
        cfg = QuotaConfig(store=server.url, key_prefix="t:", timeout_ms=500)
        metrics = Metrics()
        stage = Quota(cfg, metrics, Policy(document(QuotaRule(roles=["analyst"], rate_per_s=0.001, burst=3))),
                      open_store(cfg, metrics))
        await stage.start()
        await stage(context())
        client = aioredis.from_url(server.url)
        await client.script_flush()
        await stage(context())  # NOSCRIPT -> SCRIPT LOAD -> EVALSHA, transparently
        await client.script_flush()
        results = await asyncio.gather(*(stage(context()) for _ in range(5)), return_exceptions=True)
        assert sum(r is None for r in results) == 1  # a batch after a flush: still exactly the burst
        assert all(isinstance(r, RateLimited) for r in results if r is not None)
        await client.aclose()
        await stage.close()

