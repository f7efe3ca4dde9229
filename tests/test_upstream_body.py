"""Whole-body reads, answer caps, deadlines and connection reuse of the upstream client, on real sockets.

The servers here are raw asyncio servers writing exact bytes, so each test pins
down one way an upstream can be large, slow or sloppy with its framing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import pytest
from tests.harness import eventually
from tests.upstreams import closing_pool, trickle

from backends.http.client import Origin, Pool, ReadTimeout, ResponseTooLarge, StreamExpired

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Raw:
    """A TCP server running ``script`` per connection; counts connections."""

    def __init__(self, script: Script) -> None:
        self._script = script
        self.connections = 0
        self._server: asyncio.base_events.Server | None = None

    async def __aenter__(self) -> Raw:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self._script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def origin(self) -> Origin:
        assert self._server is not None
        return Origin.parse(f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}")


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def new_pool(**kw) -> Pool:
    return Pool(limit=kw.pop("limit", 8), keepalive_s=kw.pop("keepalive_s", 4.0), connect_timeout_s=2.0,
                ssl_context=None)


def answer(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra) + body


def chunked(body: bytes, piece: int = 65_536) -> bytes:
    out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for i in range(0, len(body), piece):
        part = body[i:i + piece]
        out.append(b"%x\r\n%s\r\n" % (len(part), part))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


def serve_each(answers: Callable[[int], bytes]) -> Script:
    """Answer the n-th request on a connection with ``answers(n)``, keep-alive."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while True:
            await read_request(reader)
            n += 1
            writer.write(answers(n))
            await writer.drain()
    return script


async def get(pool: Pool, origin: Origin, *, max_bytes: int = 0, total_s: float | None = None,
              method: str = "POST") -> tuple[int, bytes]:
    resp = await pool.request(origin, method, "/x", [], b"{}" if method == "POST" else None, 2.0)
    try:
        return resp.status, await resp.read(max_bytes=max_bytes, total_s=total_s)
    finally:
        resp.release()


# -- whole bodies never stall -------------------------------------------------------

@pytest.mark.parametrize("size", [1_000_000, 2 * 1024 * 1024, 10 * 1024 * 1024])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_large_body_read_whole_arrives_whole(size: int, framing: str) -> None:
    """The old reader paused the socket above 256 KiB and never resumed it: a 1 MB answer never came."""
    body = bytes(range(256)) * (size // 256)
    wire = answer(body) if framing == "length" else chunked(body)
    async with Raw(serve_each(lambda _n: wire)) as up:
        with closing_pool(new_pool()) as pool:
            status, got = await asyncio.wait_for(get(pool, up.origin), 10)
            assert status == 200 and got == body
            assert (await asyncio.wait_for(get(pool, up.origin), 10))[1] == body  # and the connection is reusable
            assert up.connections == 1


async def test_body_that_arrived_before_read_was_called_is_not_lost() -> None:
    body = b"z" * 3_000_000
    async with Raw(serve_each(lambda _n: answer(body))) as up:
        with closing_pool(new_pool()) as pool:
            resp = await pool.request(up.origin, "POST", "/x", [], b"{}", 2.0)
            await eventually(lambda: resp._conn._paused)  # the first 256 KiB are buffered and the socket paused
            assert await asyncio.wait_for(resp.read(), 10) == body
            resp.release()


# -- max_bytes ----------------------------------------------------------------------

async def test_declared_length_over_the_cap_is_refused_before_the_body_is_read() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(5)  # the thing under test: the rest never comes, and the cap must not wait for it

    async with Raw(script) as up:
        with closing_pool(new_pool()) as pool:
            started = time.monotonic()
            with pytest.raises(ResponseTooLarge):
                await get(pool, up.origin, max_bytes=1_000_000)
            assert time.monotonic() - started < 1.5
            assert pool._open == 0  # a connection with an unread body is never pooled


@pytest.mark.parametrize("size,ok", [(4096, True), (4097, False), (1_000_000, False)])
async def test_chunked_body_is_counted_against_the_cap(size: int, ok: bool) -> None:
    body = b"c" * size
    async with Raw(serve_each(lambda _n: chunked(body, 1000))) as up:
        with closing_pool(new_pool()) as pool:
            if ok:
                assert (await get(pool, up.origin, max_bytes=4096))[1] == body
            else:
                with pytest.raises(ResponseTooLarge):
                    await get(pool, up.origin, max_bytes=4096)
                await eventually(lambda: pool._open == 0)


# -- deadlines ------------------------------------------------------------------------

async def test_a_trickling_body_ends_at_the_total_deadline() -> None:
    """Never silent for long enough to trip the silence timeout, yet never done: the total deadline ends it."""
    async with Raw(trickle(read_request, 1000)) as up:
        with closing_pool(new_pool()) as pool:
            started = time.monotonic()
            with pytest.raises(ReadTimeout):
                await get(pool, up.origin, total_s=0.4)
            assert 0.3 < time.monotonic() - started < 2


async def test_a_stream_deadline_ends_a_stream_that_keeps_producing() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(100):
            data = b"data: %d\n\n" % i
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(0.05)  # the thing under test: a slow stream (one event every 50 ms)

    async with Raw(script) as up:
        with closing_pool(new_pool()) as pool:
            resp = await pool.request(up.origin, "POST", "/x", [], b"{}", 2.0)
            resp.expire_after(0.4)
            got = b""
            started = time.monotonic()
            with pytest.raises(StreamExpired):
                while chunk := await resp.readany():
                    got += chunk
            assert 0.3 < time.monotonic() - started < 2
            assert got.startswith(b"data: 0\n\n")
            resp.release()
            await eventually(lambda: pool._open == 0)  # discarded, never pooled


# -- late bytes and reuse order ---------------------------------------------------------

@pytest.mark.parametrize("status_line,method", [
    (b"HTTP/1.1 204 No Content\r\n\r\n", "POST"),
    (b"HTTP/1.1 304 Not Modified\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", "HEAD"),
])
async def test_late_bytes_after_a_bodiless_answer_never_reach_the_next_request(status_line: bytes,
                                                                                method: str) -> None:
    """An upstream that sends a body after 204/304/HEAD anyway: those bytes must not become the next answer."""
    poison = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned"

    requests = 0  # across connections: only the very first answer misbehaves

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        while True:
            await read_request(reader)
            requests += 1
            if requests == 1:
                writer.write(status_line)
                await writer.drain()
                await asyncio.sleep(0.02)  # late: after the client has read the answer
                writer.write(poison)
            else:
                writer.write(answer(b"fresh"))
            await writer.drain()

    async with Raw(script) as up:
        with closing_pool(new_pool()) as pool:
            first = await get(pool, up.origin, method=method)
            assert first[1] == b""
            second = await get(pool, up.origin)  # at once, while the late bytes are on their way
            await asyncio.sleep(0.05)  # the late bytes (sent 20 ms after the answer) land; nothing to wait on
            third = await get(pool, up.origin)
            assert second == (200, b"fresh") and third == (200, b"fresh")


async def test_idle_connections_are_reused_oldest_first() -> None:
    async with Raw(serve_each(lambda _n: answer(b"{}"))) as up:
        with closing_pool(new_pool()) as pool:
            await asyncio.gather(get(pool, up.origin), get(pool, up.origin))  # two connections, both idle now
            assert up.connections == 2
            idle = list(pool._idle[up.origin])
            resp = await pool.request(up.origin, "POST", "/x", [], b"{}", 2.0)
            assert resp._conn is idle[0]  # the one idle longest
            await resp.read()
            resp.release()
            assert list(pool._idle[up.origin]) == [idle[1], idle[0]]
