"""Hostile requests against the quota stage: each test is an attempt to get more than the quota allows."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from gateway.config import QuotaConfig
from gateway.errors import RateLimited
from gateway.metrics import Metrics
from gateway.pipeline import RouteKind
from gateway.policy.document import QuotaRule
from gateway.quota.stores import open_store
from gateway.stages.quota import Quota
from tests import harness
from tests.harness import ALLOW_ANALYSTS, Keys, eventually, openai_model, v2_model
from tests.quota_support import Policy, context, delete_prefix, document, finish, unique_prefix

V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1], "data": [1.0]}]}


@pytest.fixture(params=["memory", "redis"])
async def stage_for(request, redis_url):
    made = []

    async def make(*rules: QuotaRule) -> Quota:
        prefix = unique_prefix()
        store = "memory" if request.param == "memory" else redis_url
        cfg = QuotaConfig(store=store, key_prefix=prefix, default_tokens_per_request=100)
        stage = Quota(cfg, Metrics(), Policy(document(*rules)), open_store(cfg))
        await stage.start()
        made.append((stage, prefix))
        return stage

    yield make
    for stage, prefix in made:
        await stage.close()
        delete_prefix(redis_url, prefix)


@pytest.mark.parametrize("crafted", ["alice:digits", "alice%3Adigits", "{alice}", "alice}:{digits", "q:alice"])
async def test_crafted_subject_cannot_drain_or_share_anothers_bucket(stage_for, crafted):
    stage = await stage_for(QuotaRule(id="q", roles=["analyst"], models=["*"], rate_per_s=0.001, burst=2))
    for model in ("digits", "chat"):
        for _ in range(2):
            await stage(context(crafted, model=model))
        with pytest.raises(RateLimited):
            await stage(context(crafted, model=model))
    for _ in range(2):  # alice still has her whole burst
        await stage(context("alice", model="digits"))


async def test_huge_subject_does_not_make_huge_keys(redis_url):
    prefix = unique_prefix()
    cfg = QuotaConfig(store=redis_url, key_prefix=prefix)
    stage = Quota(cfg, Metrics(), Policy(document(QuotaRule(roles=["analyst"], rate_per_s=1.0, burst=1))),
                  open_store(cfg))
    await stage.start()
    try:
        await stage(context("s" * 100_000))
        client = aioredis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        await client.aclose()
        assert keys and all(len(k) < 200 for k in keys)
    finally:
        await stage.close()
        delete_prefix(redis_url, prefix)


@pytest.mark.parametrize("max_tokens", [-1, 0.5, "99999", None, True, [1], {"a": 1}, float("nan")])
async def test_bogus_max_tokens_cannot_shrink_the_reservation(stage_for, max_tokens):
    stage = await stage_for(QuotaRule(roles=["analyst"], models=["chat"], tokens_per_minute=150))
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
    if max_tokens != max_tokens:  # NaN is not JSON; the parser would have refused it, but be sure anyway
        body["max_tokens"] = float("nan")
    first = context(model="chat", kind=RouteKind.OPENAI, body=body)
    await stage(first)  # reserves at least the default (100) unless max_tokens is a valid small number
    second = context(model="chat", kind=RouteKind.OPENAI, body=body)
    if isinstance(max_tokens, (int, float)) and not isinstance(max_tokens, bool) and 0 <= max_tokens < 10:
        await stage(second)  # an honest small max_tokens is honoured
        await finish(second)
    else:
        with pytest.raises(RateLimited):
            await stage(second)
    await finish(first)


async def test_many_choices_are_reserved_for(stage_for):
    stage = await stage_for(QuotaRule(roles=["analyst"], models=["chat"], tokens_per_minute=1000))
    body = {"model": "chat", "prompt": "x", "max_tokens": 100, "n": 20}  # may produce 2,000 tokens
    with pytest.raises(RateLimited):
        await stage(context(model="chat", kind=RouteKind.OPENAI, body=body, path="/v1/completions"))


async def test_retry_after_is_never_zero(stage_for):
    stage = await stage_for(QuotaRule(roles=["analyst"], rate_per_s=100.0, burst=1))
    await stage(context())
    with pytest.raises(RateLimited) as info:
        await stage(context())
    assert info.value.headers["Retry-After"] == "1"  # 10 ms to go, still a whole second >= 1


async def test_reused_request_id_does_not_share_a_concurrency_slot(tmp_path: Path, keys: Keys) -> None:
    """Slots are minted by the gateway: one X-Request-ID sent many times still takes one slot per request."""
    release = asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        await request.read()
        await release.wait()
        return web.json_response({"outputs": []})

    async with (harness.upstream(held) as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)},
                                policy={**ALLOW_ANALYSTS, "quotas": [{"roles": ["analyst"], "max_concurrent": 2}]},
                                quota={"store": "memory"}) as gw):
        try:
            async with aiohttp.ClientSession() as s:
                headers = {**keys.auth(), "X-Request-ID": "same-id"}

                async def send() -> int:
                    async with s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers=headers) as r:
                        await r.read()
                        return r.status

                tasks = [asyncio.create_task(send()) for _ in range(6)]
                await eventually(lambda: sum(t.done() for t in tasks) >= 4)  # two held at the upstream, four refused
                release.set()
                statuses = sorted(await asyncio.gather(*tasks))
            assert statuses == [200, 200, 429, 429, 429, 429]
        finally:
            release.set()


async def test_refusing_usage_reporting_does_not_make_a_stream_free(tmp_path: Path, keys: Keys) -> None:
    """A client that sets stream_options.include_usage=false is still charged the usage the upstream reports
    (the gateway asks for it anyway), and does not get the usage chunk it turned off."""

    async def upstream(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(25):
            chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "abcdefgh"}}]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"object": "chat.completion.chunk", "choices": [], "usage": {"total_tokens": 80}}
            await response.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async with (harness.upstream(upstream) as up,
                harness.gateway(tmp_path, keys, models={"chat": openai_model(up.url)},
                                policy={**ALLOW_ANALYSTS, "quotas": [{"roles": ["analyst"], "models": ["chat"],
                                                                      "tokens_per_minute": 10_000}]},
                                quota={"store": "memory", "default_tokens_per_request": 10}) as gw):
        async with aiohttp.ClientSession() as s:
            body = {"model": "chat", "messages": [{"role": "user", "content": "abcd"}], "stream": True,
                    "stream_options": {"include_usage": False}, "max_tokens": 1}
            async with s.post(gw.url + "/v1/chat/completions", json=body, headers=keys.auth()) as r:
                assert r.status == 200
                relayed = await r.read()
        charged = gw.gateway.metrics.registry.get_sample_value("maas_quota_llm_tokens_total", {"model": "chat"})
        assert charged == 80  # the usage the upstream reported, not the 1 + 1 reserved
        assert b'"usage"' not in relayed and relayed.count(b"abcdefgh") == 25
