"""Shared pieces of the http backend and upstream client tests.

Each test file used to carry its own copy of these: the one-line config error
check, a backend started and closed around upstreams that come and go, a pool
closed after use, and an upstream that trickles a body. One copy here keeps a
change to, say, how a backend is closed from being made in one file only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Protocol

import pytest
from aiohttp import web
from tests.http_helpers import RawServer, make_backend, make_ctx

from backends.http import HttpBackend, HttpBackendConfig
from backends.http.client import Pool
from gateway.errors import ConfigError, GatewayError
from gateway.pipeline import RouteKind
from gateway.typedyaml import build, loads

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[Any]]


class Stoppable(Protocol):
    async def stop(self) -> None: ...


def http_config(text: str) -> HttpBackendConfig:
    """An http backend's config from YAML text, as ``models.m.backend`` of ``gw.yaml``."""
    data, source = loads(text, file="gw.yaml")
    return build(HttpBackendConfig, data, "models.m.backend", source)


def config_error_line(text: str) -> str:
    """The error a bad http backend config gives, checked to be one line (a person reads it in a log)."""
    with pytest.raises(ConfigError) as info:
        http_config(text)
    line = str(info.value)
    assert "\n" not in line, line
    return line


@contextlib.asynccontextmanager
async def running(upstreams: list[str], *stop_after: Stoppable, **options: Any) -> AsyncIterator[
        tuple[HttpBackend, list[Stoppable]]]:
    """A started http backend over ``upstreams``; closed at exit, then every upstream stopped.

    Yields ``(backend, started)``: an upstream a test starts later (a dead port
    that comes back) is appended to ``started`` and stopped at exit too.
    """
    backend = make_backend(upstreams, **options)
    await backend.start()
    started: list[Stoppable] = list(stop_after)
    try:
        yield backend, started
    finally:
        await backend.close()
        for up in started:
            await up.stop()


@contextlib.contextmanager
def closing_pool(pool: Pool) -> Iterator[Pool]:
    """``pool``, closed at exit."""
    try:
        yield pool
    finally:
        pool.close()


def trickle(read_head: Callable[[asyncio.StreamReader], Awaitable[Any]], length: int,
            *, count: int = 100, every_s: float = 0.05) -> Script:
    """An upstream that answers ``Content-Length: length`` and then one byte every ``every_s``.

    Never silent long enough to trip a silence timeout, never finished: only a
    whole-body deadline ends it.
    """
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
        for _ in range(count):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(every_s)  # the thing under test: a trickling answer
    return script


def sse(doc: Any) -> bytes:
    """One server-sent event carrying ``doc`` as JSON."""
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def fake_openai(*, content: str, chunks: int, answer_usage: tuple[int, int],
                stream_usage: tuple[int, int] | None = None,
                gap_s: Callable[[dict[str, Any]], float] = lambda body: 0.0) -> Callable[
                    [web.Request], Awaitable[web.StreamResponse]]:
    """A fake OpenAI chat server for the quota tests.

    Not streaming: one answer reporting ``answer_usage`` (prompt, completion
    tokens). Streaming: ``chunks`` chunks of ``content``, ``gap_s(body)``
    seconds after each; then, when the client asked for usage (and its
    ``user`` is not ``"no-usage"``), a usage chunk of ``stream_usage``.
    """
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"id": "c1", "object": "chat.completion", "model": "chat",
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                                   "finish_reason": "stop"}],
                                      "usage": _usage(*answer_usage)})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        gap = gap_s(body)
        for _ in range(chunks):
            await response.write(sse({"id": "c1", "object": "chat.completion.chunk",
                                      "choices": [{"index": 0, "delta": {"content": content}}]}))
            if gap:
                await asyncio.sleep(gap)  # the thing under test: a paced stream
        asked = (body.get("stream_options") or {}).get("include_usage") and body.get("user") != "no-usage"
        if stream_usage is not None and asked:
            await response.write(sse({"id": "c1", "object": "chat.completion.chunk", "choices": [],
                                      "usage": _usage(*stream_usage)}))
        await response.write(b"data: [DONE]\n\n")
        return response
    return handler


def writes_then_hangs_up(data: bytes, *, linger_s: float = 0.0) -> Script:
    """An upstream that reads one request head, writes ``data``, waits ``linger_s`` and closes."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(data)
        await writer.drain()
        if linger_s:
            await asyncio.sleep(linger_s)  # the thing under test: an upstream that lingers before hanging up
    return script


async def infer_failure(script: Script, expected: type[GatewayError], **options: Any) -> GatewayError:
    """The ``expected`` error an http backend raises for one v2 infer request to an upstream running ``script``."""
    server = RawServer(script)
    async with running([await server.start()], server, **options) as (backend, _):
        with pytest.raises(expected) as info:
            await backend.handle(make_ctx(RouteKind.V2_INFER, "/v2/models/digits/infer", json={}))
    return info.value
