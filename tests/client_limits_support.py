"""Raw-socket helpers and fixtures of the client-limit tests (``test_client_limits*.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from tests.harness import (ALLOW_ANALYSTS, error_fields, Keys, eventually, start_gateway, start_upstream,
                     v2_model)


BODY = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1],"data":[1.0]}]}'


V2_PATH = "/v2/models/digits/infer"


async def open_raw(port: int, *, rcvbuf: int | None = None, source: str | None = None) -> socket.socket:
    """A connected non-blocking socket; nothing reads it unless the test does (a client that never reads)."""
    loop = asyncio.get_running_loop()
    assert ("uvloop" in type(loop).__module__) == (_LOOP["expected"] == "uvloop"), type(loop)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        sock.bind((source, 0))
    await loop.sock_connect(sock, ("127.0.0.1", port))
    return sock


@contextlib.asynccontextmanager
async def raw_socket(port: int, **options: Any) -> AsyncIterator[socket.socket]:
    """``open_raw`` as an async context manager: the socket is closed on the way out."""
    with contextlib.closing(await open_raw(port, **options)) as sock:
        yield sock


async def send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


async def until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the server sends, and whether it closed the connection (EOF or reset) within ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return b"".join(chunks), False
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
        except asyncio.TimeoutError:
            return b"".join(chunks), False
        except (ConnectionResetError, BrokenPipeError):
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)


async def exchange(sock: socket.socket, request: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """One request on a keep-alive connection: its status and body."""
    loop = asyncio.get_running_loop()
    await send(sock, request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout)
        assert chunk, "closed mid-answer"
        body += chunk
    return int(head.split(b" ", 2)[1]), body


def infer(keys: Keys) -> bytes:
    return (f"POST {V2_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: {keys.auth()['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY


def error_of(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return int(head.split(b" ", 2)[1]), error_fields(body)


async def served(url: str, keys: Keys) -> int:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + V2_PATH, data=BODY, headers={**keys.auth(), "Content-Type": "application/json"}) as r:
            await r.read()
            return r.status


async def wait_for(check: Any, timeout: float = 5.0) -> None:
    await eventually(check, timeout, interval=0.02, message="condition never held")


# Every test runs on both loops: ``serve`` runs on uvloop, whose transports pause and buffer on their own
# terms. (pytest-asyncio 1.x deprecates overriding this fixture in favour of a conftest hook; open_raw
# asserts the loop, so the override silently lapsing would fail every test.)
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture:DeprecationWarning")


_LOOP = {"expected": "asyncio"}


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    _LOOP["expected"] = request.param
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


@pytest.fixture
async def upstream():
    up = await start_upstream()
    yield up
    await up.stop()


async def gateway(tmp_path: Path, keys: Keys, up: Any, **server: Any) -> Any:
    return await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                               server=server)


def port_of(gw: Any) -> int:
    return int(gw.url.rsplit(":", 1)[1])


def padded_head(total: int, *, finished: bool) -> bytes:
    head = b"GET /v2 HTTP/1.1\r\nHost: x\r\n"
    i = 0
    while len(head) < total:
        head += b"X-Pad-%d: %s\r\n" % (i, b"a" * 2000)
        i += 1
    return head + (b"\r\n" if finished else b"")


async def until_closed_after_send(sock: socket.socket, data: bytes) -> tuple[bytes, bool]:
    try:
        await send(sock, data)
    except OSError:
        pass  # the server may refuse before taking everything
    return await until_closed(sock, 5)


def endless_sse(streams: dict[str, Any]):
    """An upstream that streams SSE until its client (the gateway) goes away, and says when that happened."""

    async def handler(request: web.Request) -> web.StreamResponse:
        doc = orjson.loads(await request.read())
        if not doc.get("stream"):
            return web.json_response({"id": "c", "object": "chat.completion", "created": 0, "model": "chat",
                                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                                   "finish_reason": "stop"}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        streams["started"] += 1
        event = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "x" * 16_000}}]}) + b"\n\n"
        try:
            while True:
                await response.write(event)
        except (ConnectionError, asyncio.CancelledError):
            streams["released"] += 1
            raise
        return response

    return handler


def chat_request(keys: Keys, *, stream: bool) -> bytes:
    body = orjson.dumps({"model": "chat", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {keys.auth()['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


