"""Streaming answers: relayed chunk by chunk as they arrive, with openai token usage picked up on the way."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from tests import harness
from tests.harness import start_upstream
from tests.http_helpers import RawServer, make_backend, make_ctx, read_all, read_request_head
from tests.upstreams import running

from backends.http.relay import STREAM_BROKEN
from gateway.errors import BackendError
from gateway.pipeline import RouteKind

CHAT = "/v1/chat/completions"


def sse(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def chunk(content: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]}


USAGE = {"id": "c1", "object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}}


def sse_upstream(parts: list[bytes], *, gap_s: float = 0.0, sent_at: list[float] | None = None):
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for i, part in enumerate(parts):
            if i and gap_s:
                await asyncio.sleep(gap_s)  # the thing under test: a slow stream
            if sent_at is not None:
                sent_at.append(time.monotonic())
            await response.write(part)
        await response.write_eof()
        return response

    return handler


async def test_sse_chunks_arrive_as_they_are_sent() -> None:
    sent_at: list[float] = []
    parts = [sse(chunk(f"t{i}")) for i in range(5)] + [b"data: [DONE]\n\n"]
    received: list[tuple[float, bytes]] = []
    async with (harness.upstream(sse_upstream(parts, gap_s=0.1, sent_at=sent_at)) as up,
                running([up.url], protocol="openai", name="chat") as (backend, _)):
        ctx = make_ctx(RouteKind.OPENAI, CHAT, model="chat", json={"model": "chat", "stream": True, "messages": []})
        response = await backend.handle(ctx)
        assert response.body is None and response.stream is not None
        assert response.content_type.startswith("text/event-stream")
        async for piece in response.stream:
            received.append((time.monotonic(), piece))
        response.release()
    assert b"".join(p for _, p in received) == b"".join(parts)
    assert len(sent_at) == len(parts)
    first_arrival = received[0][0]
    # the first chunk is in the client's hands long before the upstream sends its last one (~0.5 s later)
    assert first_arrival < sent_at[-1] - 0.2
    assert first_arrival - sent_at[0] < 0.3
    assert len(received) >= 3  # not coalesced into one buffered body


async def test_openai_stream_asks_for_usage_and_reads_it() -> None:
    body = b"".join([sse(chunk("Hello")), sse(chunk(", world")), sse(USAGE), b"data: [DONE]\n\n"])
    # split at awkward places, mid-line and mid-JSON, to exercise the line reassembly
    parts = [body[:7], body[7:40], body[40:41], body[41:120], body[120:]]
    up = await start_upstream(sse_upstream(parts, gap_s=0.01))
    async with running([up.url], up, protocol="openai", name="chat") as (backend, _):
        ctx = make_ctx(RouteKind.OPENAI, CHAT, model="chat",
                       json={"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        response = await backend.handle(ctx)
        relayed = await read_all(response)
    forwarded = orjson.loads(up.seen[-1].body)
    assert forwarded["stream_options"] == {"include_usage": True}
    assert forwarded["messages"] == [{"role": "user", "content": "hi"}]
    assert relayed == body.replace(sse(USAGE), b"")  # asked for by the gateway, not the client: not passed on
    assert response.usage is not None and (response.usage.total_tokens, response.usage.answered) == (9, True)


async def test_client_stream_options_are_kept_and_usage_always_asked() -> None:
    up = await start_upstream(sse_upstream([sse(chunk("x")), b"data: [DONE]\n\n"]))
    async with running([up.url], up, protocol="openai", name="chat") as (backend, _):
        for options in ({"include_usage": False}, {"include_usage": True, "extra": 1}, {"other": 2}):
            ctx = make_ctx(RouteKind.OPENAI, CHAT, model="chat",
                           json={"model": "chat", "stream": True, "stream_options": options, "messages": []})
            await read_all(await backend.handle(ctx))
    sent = [orjson.loads(s.body)["stream_options"] for s in up.seen]
    assert sent == [{"include_usage": True}, {"include_usage": True, "extra": 1},
                    {"other": 2, "include_usage": True}]


async def test_completions_stream_counts_text() -> None:
    parts = [sse({"choices": [{"index": 0, "text": "abc"}]}), sse({"choices": [{"index": 0, "text": "de"}]}),
             b"data: [DONE]\n\n"]
    up = await start_upstream(sse_upstream(parts))
    async with running([up.url], up, protocol="openai") as (backend, _):
        ctx = make_ctx(RouteKind.OPENAI, "/v1/completions", json={"model": "m", "prompt": "p", "stream": True})
        response = await backend.handle(ctx)
        await read_all(response)
    assert response.usage is not None and response.usage.answered and response.usage.total_tokens is None  # no usage: charged its whole reservation


async def test_garbage_in_the_stream_never_breaks_the_relay() -> None:
    parts = [b"data: {not json\n\n", b"data: [1, 2]\n\n", b": a comment\n\n", b"data: {\"choices\": 5}\n\n",
             b"data: {\"choices\": [{\"delta\": {\"content\": 7}}], \"usage\": {\"total_tokens\": \"many\"}}\n\n",
             b"x" * 2_000_000, b"\n\n", sse(chunk("ok")), b"data: {\"usage\": {\"total_tokens\": 3}}"]
    up = await start_upstream(sse_upstream(parts))
    async with running([up.url], up, protocol="openai") as (backend, _):
        ctx = make_ctx(RouteKind.OPENAI, CHAT, json={"model": "m", "stream": True, "messages": [],
                                                     "stream_options": {"include_usage": True}})
        response = await backend.handle(ctx)
        relayed = await read_all(response)
    assert relayed == b"".join(parts)
    assert response.usage is not None and response.usage.total_tokens == 3  # the last line had no newline: read at end of stream


async def test_event_stream_answer_to_a_raw_request_is_streamed() -> None:
    sent_at: list[float] = []
    parts = [b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"]
    up = await start_upstream(sse_upstream(parts, gap_s=0.15, sent_at=sent_at))
    async with running([up.url], up, protocol="raw", paths=["/generate_stream"]) as (backend, _):
        ctx = make_ctx(RouteKind.RAW, "/generate_stream", body=b'{"inputs": "x"}')
        response = await backend.handle(ctx)
        assert response.stream is not None
        first = await response.stream.__anext__()
        first_at = time.monotonic()
        rest = await read_all(response)
    assert first + rest == b"".join(parts)
    assert first_at < sent_at[-1] - 0.1
    assert response.usage is None  # raw streams are relayed, not scanned


async def _relay_until_error(response) -> tuple[bytes, Exception | None]:
    got = []
    try:
        async for piece in response.stream:
            got.append(piece)
    except BackendError as exc:
        return b"".join(got), exc
    return b"".join(got), None


async def test_upstream_dying_mid_stream_cuts_the_relay() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        payload = sse(chunk("partial"))
        writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        await writer.drain()
        await asyncio.sleep(0.05)  # the thing under test: the stream breaks a moment after the first event
        writer.transport.abort()

    server = RawServer(script)
    async with running([await server.start()], server, protocol="openai", eject_after_failures=5) as (backend, _):
        ctx = make_ctx(RouteKind.OPENAI, CHAT, json={"model": "m", "stream": True, "messages": []})
        response = await backend.handle(ctx)
        relayed, error = await _relay_until_error(response)
    assert relayed == sse(chunk("partial"))
    # an error, not a clean end: the writer cuts the client connection so truncation is visible
    assert isinstance(error, BackendError) and "127.0.0.1" not in str(error)
    assert response.stream.error == STREAM_BROKEN == "upstream connection failed mid-stream"
    assert backend.upstreams[0].failures == 1  # counted for passive health
    assert response.usage is not None and response.usage.answered and response.usage.total_tokens is None  # charged its whole reservation


async def test_a_stream_that_goes_silent_ends_after_the_timeout() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse(chunk("a")))
        await asyncio.wait_for(release.wait(), 5)
        return response

    up = await start_upstream(handler)
    backend = make_backend([up.url], protocol="openai", timeout_s=0.3)
    await backend.start()
    started = time.monotonic()
    try:
        ctx = make_ctx(RouteKind.OPENAI, CHAT, json={"model": "m", "stream": True, "messages": []})
        response = await backend.handle(ctx)
        relayed, error = await _relay_until_error(response)
    finally:
        release.set()
        await backend.close()
        await up.stop()
    assert relayed == sse(chunk("a")) and isinstance(error, BackendError)
    assert 0.25 <= time.monotonic() - started < 3
    assert response.stream.error == STREAM_BROKEN


async def test_releasing_early_frees_the_upstream() -> None:
    cancelled = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(sse(chunk("x")))
                await asyncio.sleep(0.02)  # the thing under test: an endless, paced stream
        except (ConnectionResetError, asyncio.CancelledError):
            cancelled.set()
            raise

    up = await start_upstream(endless)
    async with running([up.url], up, protocol="openai") as (backend, _):
        ctx = make_ctx(RouteKind.OPENAI, CHAT, json={"model": "m", "stream": True, "messages": []})
        response = await backend.handle(ctx)
        await response.stream.__anext__()
        response.release()  # the client went away
        response.release()  # idempotent
        await asyncio.wait_for(cancelled.wait(), 3)
        for callback in ctx._cleanups:  # the on_finish hook is safe after release
            callback(ctx)
        with pytest.raises(StopAsyncIteration):
            await response.stream.__anext__()


# -- end to end: the official openai client through the real gateway ----------------


async def fake_openai(request: web.Request) -> web.StreamResponse:
    """A minimal OpenAI-compatible chat server, streaming or not, as vLLM would answer."""
    doc = orjson.loads(await request.read())
    if request.path != CHAT:
        return web.json_response({"error": {"message": "not found"}}, status=404)
    text = ["Hel", "lo ", "from ", "upstream"]
    if not doc.get("stream"):
        return web.json_response({
            "id": "chatcmpl-e2e", "object": "chat.completion", "created": 1, "model": doc["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        })
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    base = {"id": "chatcmpl-e2e", "object": "chat.completion.chunk", "created": 1, "model": doc["model"]}
    for i, piece in enumerate(text):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        await response.write(sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
        await asyncio.sleep(0.02)  # a model that streams at a pace (events arrive separately)
    await response.write(sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if (doc.get("stream_options") or {}).get("include_usage"):
        await response.write(sse({**base, "choices": [],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def test_official_openai_client_through_the_gateway(tmp_path, keys) -> None:
    openai = pytest.importorskip("openai")
    from tests.harness import ALLOW_ANALYSTS, openai_model

    async with (harness.upstream(fake_openai) as up,
                harness.gateway(tmp_path, keys, models={"chat": openai_model(up.url)}, policy=ALLOW_ANALYSTS) as gw,
                openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=keys.token("alice"), max_retries=0,
                                   timeout=10) as client):
        answer = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "Hello from upstream"
        assert answer.usage is not None and answer.usage.total_tokens == 7

        stream = await client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], stream=True)
        pieces = []
        async for part in stream:
            if part.choices and part.choices[0].delta.content:
                pieces.append(part.choices[0].delta.content)
        assert "".join(pieces) == "Hello from upstream"
        assert len(pieces) == 4  # chunk by chunk, not one buffered blob
    assert len(up.seen) == 2
    for seen in up.seen:
        assert "Authorization" not in seen.headers  # the client's JWT stays at the gateway
        assert seen.headers["X-Maas-Subject"] == "alice"
    assert orjson.loads(up.seen[1].body)["stream_options"] == {"include_usage": True}


async def test_json_error_to_a_stream_request_is_read_whole() -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "context too long"}}, status=400)

    up = await start_upstream(refuse)
    async with running([up.url], up, protocol="openai") as (backend, _):
        ctx = make_ctx(RouteKind.OPENAI, CHAT, json={"model": "m", "stream": True, "messages": []})
        response = await backend.handle(ctx)
    assert response.status == 400 and response.stream is None
    assert orjson.loads(response.body) == {"error": {"message": "context too long"}}


async def test_the_head_does_not_wait_for_a_slow_first_token(tmp_path, keys) -> None:
    """The head leaves with the first chunk only when that chunk is already there: an upstream that sends its
    head and then thinks (a model's prefill) has its head relayed at once, before any token exists."""
    from tests.harness import ALLOW_ANALYSTS, openai_model

    first_token = asyncio.Event()

    async def thinking(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await first_token.wait()  # released by the client only once it holds the head
        await response.write(sse(chunk("t")) + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    body = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with (harness.upstream(thinking) as up,
                harness.gateway(tmp_path, keys, models={"chat": openai_model(up.url)}, policy=ALLOW_ANALYSTS) as gw):
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(10):  # a held head would wait for a token that never comes
                async with session.post(gw.url + CHAT, json=body, headers=keys.auth()) as r:
                    assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
                    first_token.set()
                    assert b'"content":"t"' in await r.read()
