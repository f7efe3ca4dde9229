"""Token budgets on every LLM surface: admitted on the estimate, settled with the usage the answer reports.

Usage comes from where each server puts it: Responses ``usage`` / ``response.completed``, Anthropic
``message_start`` + ``message_delta``, Ollama's final ``"done": true`` object. An answer that never
reports usage keeps its whole reservation. The bucket is read back from ``RateLimit-Remaining`` of
the next request: remaining = budget - used by the first - reserved for the second.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.harness import ALLOW_ANALYSTS, gateway, openai_model, upstream
from tests.llm_fakes import MESSAGES_INPUT, MESSAGES_OUTPUT, OLLAMA_EVAL, OLLAMA_PROMPT, RESPONSE_USAGE, Fake
from tests.llm_fakes import ollama as fake_ollama
from tests.llm_fakes import vllm

BUDGET = 60  # tokens per minute: refills one token a second, little enough to read back exactly
DEFAULT = 20  # quota.default_tokens_per_request
POLICY = {**ALLOW_ANALYSTS, "quotas": [{"roles": ["analyst"], "models": ["*"], "tokens_per_minute": BUDGET}]}

CHAT = [{"role": "user", "content": "hi"}]  # 2 characters: 1 prompt token in every estimate
CASES = {
    # name: (path, body, reserved, used when the upstream reports usage)
    "ollama-chat-stream": ("/api/chat", {"model": "m", "messages": CHAT}, 1 + DEFAULT, OLLAMA_PROMPT + OLLAMA_EVAL),
    "ollama-generate-json": ("/api/generate", {"model": "m", "prompt": "hi", "stream": False,
                                               "options": {"num_predict": 9}}, 1 + 9, OLLAMA_PROMPT + OLLAMA_EVAL),
    "responses-stream": ("/v1/responses", {"model": "m", "input": "hi", "stream": True, "max_output_tokens": 20},
                         21, RESPONSE_USAGE["total_tokens"]),
    "responses-json": ("/v1/responses", {"model": "m", "input": "hi"}, 1 + DEFAULT, RESPONSE_USAGE["total_tokens"]),
    "messages-stream": ("/v1/messages", {"model": "m", "messages": CHAT, "max_tokens": 20, "stream": True},
                        21, MESSAGES_INPUT + MESSAGES_OUTPUT),
    "messages-json": ("/v1/messages", {"model": "m", "messages": CHAT, "max_tokens": 20}, 21,
                      MESSAGES_INPUT + MESSAGES_OUTPUT),
}


def model_for(path: str, url: str) -> dict[str, Any]:
    protocol = "ollama" if path.startswith("/api/") else "openai"
    return {"backend": {"type": "http", "protocol": protocol, "upstreams": [url]}}


async def call(s: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str]) -> int:
    async with s.post(url, json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return int(r.headers["RateLimit-Remaining"])


@pytest.mark.parametrize("reports_usage", [True, False], ids=["usage", "no-usage"])
@pytest.mark.parametrize("case", sorted(CASES))
async def test_each_surface_is_charged_its_reported_usage_or_its_whole_reservation(tmp_path, keys, case,
                                                                                 reports_usage):
    path, body, reserved, used = CASES[case]
    fake = Fake(usage=reports_usage)
    handler = fake_ollama(fake) if path.startswith("/api/") else vllm(fake)
    if not reports_usage and case == "messages-stream":
        pytest.skip("an Anthropic stream always opens with message_start, which carries usage")
    async with upstream(handler) as up, gateway(tmp_path, keys, models={"m": model_for(path, up.url)},
                                                policy=POLICY,
                                                quota={"store": "memory", "default_tokens_per_request": DEFAULT}) as gw:
        async with aiohttp.ClientSession() as s:
            first = await call(s, gw.url + path, body, keys.auth("alice"))
            assert first == BUDGET - reserved
            await asyncio.sleep(0.1)  # the first request settles as it ends, just after its last byte
            second = await call(s, gw.url + path, body, keys.auth("alice"))
        charged = used if reports_usage else reserved
        assert BUDGET - charged - reserved <= second <= BUDGET - charged - reserved + 2, (second, charged)


async def test_a_stream_cut_before_its_usage_keeps_the_whole_reservation(tmp_path, keys):
    async def cut(request: Any) -> Any:
        from aiohttp import web
        out = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await out.prepare(request)
        await out.write(b'{"model":"m","message":{"role":"assistant","content":"Hel"},"done":false}\n')
        return out  # ends without the final "done" object

    async with upstream(cut) as up, gateway(tmp_path, keys, models={"m": model_for("/api/chat", up.url)},
                                            policy=POLICY,
                                            quota={"store": "memory", "default_tokens_per_request": DEFAULT}) as gw:
        body = {"model": "m", "messages": CHAT}
        async with aiohttp.ClientSession() as s:
            await call(s, gw.url + "/api/chat", body, keys.auth("alice"))
            await asyncio.sleep(0.1)
            second = await call(s, gw.url + "/api/chat", body, keys.auth("alice"))
        assert BUDGET - 2 * (1 + DEFAULT) <= second <= BUDGET - 2 * (1 + DEFAULT) + 2


async def test_an_estimate_over_the_budget_is_refused_before_the_upstream(tmp_path, keys):
    async with upstream(vllm()) as up, gateway(tmp_path, keys, models={"m": openai_model(up.url)}, policy=POLICY,
                                               quota={"store": "memory"}) as gw:
        async with aiohttp.ClientSession() as s:
            body = {"model": "m", "messages": CHAT, "max_tokens": BUDGET + 1}
            async with s.post(gw.url + "/v1/messages", json=body, headers=keys.auth("alice")) as r:
                assert r.status == 429
                assert int(r.headers["Retry-After"]) >= 1
        assert up.seen == []
