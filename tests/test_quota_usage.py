"""LLM token budgets charge what the model really did, whatever the client asks for.

The bypass these tests close: a client that streams with
``stream_options: {include_usage: false}`` and gets an answer made only of tool
calls (no content text) used to be charged its prompt estimate alone, so a
3,000 tokens/min budget let 24,000 tokens through. Now the gateway always asks
an OpenAI-compatible upstream for usage, charges it, and hides the usage chunk
from a client that did not ask for it; an answer whose usage never arrives is
charged its whole reservation. The caller is the real ``openai`` client, the
upstream a real aiohttp server that streams tool-call chunks and honours
``include_usage`` the way OpenAI does (``"usage": null`` on every chunk, then
one chunk with the usage and no choices).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from tests.http_helpers import make_ctx, read_all

from gateway.pipeline import RouteKind
from tests import harness
from tests.harness import ALLOW_ANALYSTS, Keys, openai_model, start_gateway
from tests.quota_support import delete_prefix, unique_prefix
from tests.upstreams import running

USAGE = {"prompt_tokens": 900, "completion_tokens": 600, "total_tokens": 1500}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
ARGUMENTS = ['{"city": ', '"Paris", ', '"unit": "celsius"}']
MESSAGES = [{"role": "user", "content": "weather in Paris?"}]  # 17 characters: a prompt estimate of 5
MAX_TOKENS = 600  # reserved: 5 + 600 = 605


def sse(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


async def tool_upstream(request: web.Request) -> web.StreamResponse:
    """An OpenAI-compatible server answering with a tool call. ``user: "silent"`` plays an upstream
    that never reports usage, even when asked."""
    body = await request.json()
    honest = body.get("user") != "silent"
    base = {"id": "chatcmpl-t", "object": "chat.completion.chunk", "created": 1, "model": "chat"}
    if not body.get("stream"):
        call = {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "".join(ARGUMENTS)}}
        answer: dict[str, Any] = {**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
             "finish_reason": "tool_calls"}]}
        if honest:
            answer["usage"] = USAGE
        return web.json_response(answer)
    asked = (body.get("stream_options") or {}).get("include_usage") is True and honest
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)

    async def send(delta: dict[str, Any], finish: str | None = None) -> None:
        doc = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if asked:
            doc["usage"] = None  # what OpenAI puts on every chunk once usage is asked for
        await response.write(sse(doc))

    await send({"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})
    for part in ARGUMENTS:
        await send({"tool_calls": [{"index": 0, "function": {"arguments": part}}]})
    await send({}, "tool_calls")
    if asked:
        await response.write(sse({**base, "choices": [], "usage": USAGE}))
    await response.write(b"data: [DONE]\n\n")
    return response


def charged(gw: Any) -> float:
    return gw.gateway.metrics.registry.get_sample_value("maas_quota_llm_tokens_total", {"model": "chat"}) or 0.0


async def gateway_for(tmp_path: Path, keys: Keys, up_url: str, store: str = "memory", tokens_per_minute: int = 3000,
                      **quota: Any) -> Any:
    return await start_gateway(tmp_path, keys, models={"chat": openai_model(up_url)},
                               policy={**ALLOW_ANALYSTS, "quotas": [{"roles": ["analyst"], "models": ["chat"],
                                                                     "tokens_per_minute": tokens_per_minute}]},
                               quota={"store": store, "default_tokens_per_request": 100, **quota})


async def tool_stream(client: openai.AsyncOpenAI, **options: Any) -> list[Any]:
    stream = await client.chat.completions.create(model="chat", messages=MESSAGES, tools=TOOLS,  # type: ignore[arg-type]
                                                  max_tokens=MAX_TOKENS, stream=True, **options)
    return [chunk async for chunk in stream]


def arguments(chunks: list[Any]) -> str:
    return "".join(call.function.arguments or "" for c in chunks for choice in c.choices
                   for call in (choice.delta.tool_calls or ()))


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_tool_call_streams_without_usage_are_charged_and_refused(tmp_path: Path, keys: Keys,
                                                                      redis_url: str, store: str) -> None:
    prefix = unique_prefix()
    try:
        async with (harness.upstream(tool_upstream) as up,
                    harness.stopping(await gateway_for(tmp_path, keys, up.url, redis_url if store == "redis" else "memory",
                                                       key_prefix=prefix)) as gw,
                    openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=keys.token("alice"), max_retries=0,
                                       timeout=10) as client):
            for _ in range(2):  # 1,500 tokens each: the 3,000 budget is spent
                chunks = await tool_stream(client, stream_options={"include_usage": False})
                assert arguments(chunks) == "".join(ARGUMENTS)
                assert chunks[-1].choices[0].finish_reason == "tool_calls"
                assert all(c.usage is None and c.choices for c in chunks)  # no usage chunk reached the client
            with pytest.raises(openai.RateLimitError) as refused:  # 605 more cannot be reserved
                await tool_stream(client, stream_options={"include_usage": False})
            assert refused.value.status_code == 429
            assert refused.value.response.headers["RateLimit-Limit"] == "3000"
            assert int(refused.value.response.headers["Retry-After"]) >= 1
            assert charged(gw) == 3000
            assert len(up.seen) == 2  # the refused request never reached the model
            for seen in up.seen:  # the gateway asked for usage although the client said no
                assert orjson.loads(seen.body)["stream_options"] == {"include_usage": True}
    finally:
        delete_prefix(redis_url, prefix)


async def test_only_the_client_that_asked_sees_the_usage_chunk(tmp_path: Path, keys: Keys) -> None:
    async with (harness.upstream(tool_upstream) as up,
                harness.stopping(await gateway_for(tmp_path, keys, up.url, tokens_per_minute=100_000)) as gw,
                openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=keys.token("alice"), max_retries=0,
                                   timeout=10) as client):
        asked = await tool_stream(client, stream_options={"include_usage": True})
        assert asked[-1].choices == [] and asked[-1].usage is not None
        assert asked[-1].usage.total_tokens == 1500
        assert arguments(asked) == "".join(ARGUMENTS)
        assert all(c.usage is None for c in asked[:-1])

        not_asked = await tool_stream(client)  # no stream_options at all: the openai client's default
        assert arguments(not_asked) == "".join(ARGUMENTS)
        assert all(c.usage is None and c.choices for c in not_asked)
        assert len(not_asked) == len(asked) - 1

        async with aiohttp.ClientSession() as s:  # on the wire: not even "usage": null is left
            body = {"model": "chat", "messages": MESSAGES, "tools": TOOLS, "max_tokens": 10, "stream": True,
                    "stream_options": {"include_usage": False}}
            async with s.post(gw.url + "/v1/chat/completions", json=body, headers=keys.auth()) as r:
                assert r.status == 200
                raw = await r.read()
        assert b'"usage"' not in raw
        events = [e for e in raw.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]" and len(events) == 6
        assert all(json.loads(e[len(b"data: "):])["choices"] for e in events[:-1])
        assert charged(gw) == 3 * 1500


async def test_answers_whose_usage_never_arrives_are_charged_their_whole_reservation(tmp_path: Path,
                                                                                     keys: Keys) -> None:
    async with (harness.upstream(tool_upstream) as up,
                harness.stopping(await gateway_for(tmp_path, keys, up.url)) as gw,
                openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=keys.token("alice"), max_retries=0,
                                   timeout=10) as client):
        chunks = await tool_stream(client, user="silent")  # a stream that never reports usage
        assert arguments(chunks) == "".join(ARGUMENTS)
        assert charged(gw) == 605
        answer = await client.chat.completions.create(model="chat", messages=MESSAGES, tools=TOOLS,  # type: ignore[arg-type]
                                                      max_tokens=MAX_TOKENS, user="silent")
        assert answer.choices[0].message.tool_calls and answer.usage is None
        assert charged(gw) == 605 + 605  # a JSON answer without usage
        answer = await client.chat.completions.create(model="chat", messages=MESSAGES, tools=TOOLS,  # type: ignore[arg-type]
                                                      max_tokens=MAX_TOKENS)
        assert answer.usage is not None and answer.usage.total_tokens == 1500
        assert charged(gw) == 605 + 605 + 1500  # a JSON answer with usage: that


# --------------------------------------------------------------------------- the relay itself

OPENAI_CHUNK = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],"usage":null}'
VLLM_CHUNK = (b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"yo"}}],'
              b'"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}')  # continuous_usage_stats
USAGE_ONLY = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2,"total_tokens":4}}'


def _stream_upstream(parts: list[bytes]):
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in parts:
            await response.write(part)
            await asyncio.sleep(0.005)  # the thing under test: separate reads, so the splits below are seen as such
        return response

    return handler


def _splits(body: bytes) -> list[bytes]:
    """``body`` cut at awkward places: inside ``"usage"``, inside CRLF, between the two newlines of an event."""
    cuts = sorted({body.index(b'"usa') + 3, body.index(b"\r\n") + 1, body.index(b"\n\n") + 1, 7, len(body) - 3})
    return [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]


@pytest.mark.parametrize("options,hidden", [(None, True), ({"include_usage": False}, True),
                                            ({"include_usage": True}, False)])
async def test_relay_hides_usage_only_from_clients_that_did_not_ask(options: Any, hidden: bool) -> None:
    body = (OPENAI_CHUNK + b"\r\n\r\n" + VLLM_CHUNK + b"\n\n" + b": keep-alive\n\n" + USAGE_ONLY + b"\n\n"
            + b"data: [DONE]\n\n")
    async with (harness.upstream(_stream_upstream(_splits(body))) as up,
                running([up.url], protocol="openai", name="chat") as (backend, _)):
        doc: dict[str, Any] = {"model": "chat", "stream": True, "messages": []}
        if options is not None:
            doc["stream_options"] = options
        ctx = make_ctx(RouteKind.OPENAI, "/v1/chat/completions", model="chat", json=doc)
        response = await backend.handle(ctx)
        relayed = await read_all(response)
    assert response.usage is not None and (response.usage.total_tokens, response.usage.answered) == (4, True)
    if not hidden:
        assert relayed == body  # byte for byte
        return
    assert relayed == (b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\r\n\r\n'
                       b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"yo"}}]}\n\n'
                       b": keep-alive\n\n"
                       b"data: [DONE]\n\n")


async def test_relay_hides_a_last_usage_line_without_newline() -> None:
    async with (harness.upstream(_stream_upstream([b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n", USAGE_ONLY])) as up,
                running([up.url], protocol="openai", name="chat") as (backend, _)):
        ctx = make_ctx(RouteKind.OPENAI, "/v1/completions", model="chat",
                       json={"model": "chat", "prompt": "p", "stream": True})
        response = await backend.handle(ctx)
        relayed = await read_all(response)
    assert relayed == b"data: {\"choices\":[{\"text\":\"a\"}]}\n\n"
    assert response.usage is not None and response.usage.total_tokens == 4
    assert orjson.loads(up.seen[0].body)["stream_options"] == {"include_usage": True}


async def test_relay_hiding_usage_survives_garbage() -> None:
    """Junk, comments, a 2 MB line and odd usage values pass (or are hidden) without breaking the stream."""
    ok = sse({"choices": [{"index": 0, "delta": {"content": "ok"}}]})
    parts = [b"data: {not json\n\n", b"data: [1, 2]\n\n", b": a comment\n\n",
             b'data: {"choices": 5, "usage": {"total_tokens": "many"}}\n\n', b"x" * 2_000_000, b"\n\n",
             b'data: {"usage": 7}\n\n', ok, b'data: {"usage": {"total_tokens": 3}}']
    async with (harness.upstream(_stream_upstream(parts)) as up,
                running([up.url], protocol="openai", name="chat") as (backend, _)):
        ctx = make_ctx(RouteKind.OPENAI, "/v1/chat/completions", model="chat",
                       json={"model": "chat", "stream": True, "messages": []})
        response = await backend.handle(ctx)
        relayed = await read_all(response)
    assert relayed == (b"".join(parts[:3]) + b'data: {"choices":5}\n\n' + b"x" * 2_000_000 + b"\n\n" + ok)
    assert response.usage is not None and response.usage.total_tokens == 3
