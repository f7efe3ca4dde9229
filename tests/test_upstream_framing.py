"""Response framing of the upstream client, on a fake network (``tests/fake_upstream.py``): no sockets.

Each upstream here is a script whose every ``write`` reaches the client as one
``data_received``, so an answer can be cut exactly where a parser is most
likely to stumble (mid-line, mid-chunk-size, one byte at a time). The same
behaviour over real sockets is in ``test_upstream_client.py`` and
``test_upstream_body.py``; these pin down framing alone, deterministically.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest

from backends.http.client import Disconnected, InvalidResponse, Pool, ReadTimeout, ResponseTooLarge, StreamExpired
from backends.http.connection import MAX_HEADER_BYTES
from backends.http.response import PAUSE_ABOVE
from tests.clock import FakeClock
from tests.fake_upstream import ORIGIN, FakeNetwork, FakeWriter, Script, answers, read_request, scripted_pool
from tests.harness import eventually

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")


@pytest.fixture
async def fake() -> AsyncIterator[list[tuple[Pool, FakeNetwork]]]:
    made: list[tuple[Pool, FakeNetwork]] = []
    yield made
    for pool, net in made:
        pool.close()
        await net.close()
        assert net.errors == []  # a script that broke is a broken test, not a finding


def make(fake: list[tuple[Pool, FakeNetwork]], script: Script, **options: object) -> tuple[Pool, FakeNetwork]:
    pool, net = scripted_pool(script, **options)
    fake.append((pool, net))
    return pool, net


async def get(pool: Pool, *, max_bytes: int = 0) -> tuple[int, bytes]:
    resp = await pool.request(ORIGIN, "GET", "/x", [], None, 5)
    try:
        return resp.status, await resp.read(max_bytes=max_bytes)
    finally:
        resp.release()


async def test_content_length_body_whole_and_the_connection_reused(fake) -> None:
    pool, net = make(fake, answers(OK, OK))
    assert await get(pool) == (200, b"hello")
    assert await get(pool) == (200, b"hello")
    assert net.connections == 1  # both answers framed exactly: the connection was trusted with the second


@pytest.mark.parametrize("split", [1, 2, 7])
async def test_chunked_body_cut_anywhere_is_put_together(fake, split: int) -> None:
    pool, net = make(fake, answers(CHUNKED, CHUNKED, split=split))
    assert await get(pool) == (200, b"hello world")
    assert await get(pool) == (200, b"hello world")  # the trailer and last chunk ended it exactly
    assert net.connections == 1


async def test_content_length_cut_anywhere_is_put_together(fake) -> None:
    pool, _ = make(fake, answers(OK, split=1))
    assert await get(pool) == (200, b"hello")


async def test_body_without_length_ends_with_the_connection(fake) -> None:
    async def script(reader: asyncio.StreamReader, writer: FakeWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil ")
        writer.write(b"the end")
    pool, net = make(fake, script)
    assert await get(pool) == (200, b"until the end")
    assert await get(pool) == (200, b"until the end")
    assert net.connections == 2  # close-delimited: never reused


async def test_close_inside_a_content_length_body_is_disconnected(fake) -> None:
    pool, _ = make(fake, answers(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf"))
    resp = await pool.request(ORIGIN, "GET", "/x", [], None, 5)
    assert resp.status == 200
    with pytest.raises(Disconnected):
        await resp.read()
    resp.release()


async def test_close_inside_a_chunk_is_disconnected_after_what_arrived(fake) -> None:
    pool, _ = make(fake, answers(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n9\r\nwor"))
    resp = await pool.request(ORIGIN, "GET", "/x", [], None, 5)
    received = b""
    with pytest.raises(Disconnected):
        while chunk := await resp.readany():
            received += chunk
    assert received in (b"hellowor", b"hello")  # what came is handed on; the cut is an error, not an end
    resp.release()


async def test_close_before_any_answer_is_disconnected(fake) -> None:
    async def script(reader: asyncio.StreamReader, writer: FakeWriter) -> None:
        await read_request(reader)  # heard the request, hung up
    pool, _ = make(fake, script)
    with pytest.raises(Disconnected):
        await pool.request(ORIGIN, "GET", "/x", [], None, 5)


async def test_close_inside_the_head_is_disconnected(fake) -> None:
    pool, _ = make(fake, answers(b"HTTP/1.1 200 OK\r\nContent-Len"))
    with pytest.raises(Disconnected):
        await pool.request(ORIGIN, "GET", "/x", [], None, 5)


async def test_declared_length_over_the_cap_is_refused_before_the_body(fake) -> None:
    async def script(reader: asyncio.StreamReader, writer: FakeWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await asyncio.Event().wait()  # the body never comes: the cap must not wait for it

    pool, net = make(fake, script)
    resp = await pool.request(ORIGIN, "GET", "/x", [], None, 5)
    with pytest.raises(ResponseTooLarge):
        await resp.read(max_bytes=100)
    resp.release()
    await eventually(lambda: net.peers[0].closed_by_client)  # refused: the connection is closed, not pooled


async def test_chunked_body_growing_past_the_cap_is_refused(fake) -> None:
    chunk = b"3c\r\n" + b"x" * 60 + b"\r\n"
    pool, net = make(fake, answers(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n",
                                   split=len(chunk), hold=True))
    resp = await pool.request(ORIGIN, "GET", "/x", [], None, 5)
    with pytest.raises(ResponseTooLarge):
        await resp.read(max_bytes=100)
    resp.release()
    await eventually(lambda: net.peers[0].lost)
    assert net.peers[0].closed_by_client  # refused: the client hung up (the upstream would have kept it open)


async def test_body_without_length_growing_past_the_cap_is_refused(fake) -> None:
    async def script(reader: asyncio.StreamReader, writer: FakeWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        for _ in range(5):
            writer.write(b"y" * 40)
        await asyncio.Event().wait()  # never closes: only the cap ends it
    pool, _ = make(fake, script)
    resp = await pool.request(ORIGIN, "GET", "/x", [], None, 5)
    with pytest.raises(ResponseTooLarge):
        await resp.read(max_bytes=100)
    resp.release()


async def test_a_second_answer_to_one_request_is_never_taken_for_the_next(fake) -> None:
    pool, net = make(fake, answers(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil", OK))
    assert await get(pool) == (200, b"hello")
    assert await get(pool) == (200, b"hello")  # on a new connection: the one that spoke twice was dropped
    assert net.connections == 2


async def test_informational_answer_before_the_real_one_is_skipped(fake) -> None:
    pool, _ = make(fake, answers(b"HTTP/1.1 100 Continue\r\n\r\n" + OK, split=3))
    assert await get(pool) == (200, b"hello")


async def test_header_block_over_the_limit_is_invalid(fake) -> None:
    huge = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 1000) for i in range(MAX_HEADER_BYTES // 1000 + 2))
    pool, _ = make(fake, answers(b"HTTP/1.1 200 OK\r\n" + huge + b"Content-Length: 0\r\n\r\n"))
    with pytest.raises(InvalidResponse):
        await pool.request(ORIGIN, "GET", "/x", [], None, 5)


async def test_garbage_instead_of_a_status_line_is_invalid(fake) -> None:
    pool, _ = make(fake, answers(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    with pytest.raises(InvalidResponse):
        await pool.request(ORIGIN, "GET", "/x", [], None, 5)


async def test_an_unread_stream_pauses_the_upstream_then_resumes(fake) -> None:
    piece = b"z" * 65_536
    count = PAUSE_ABOVE // len(piece) + 4
    pool, net = make(fake, answers(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(piece) * count)
                                   + piece * count, split=len(piece)))
    resp = await pool.request(ORIGIN, "GET", "/x", [], None, 5)
    await eventually(lambda: net.peers[0].paused)  # nobody reads: the client stops reading past PAUSE_ABOVE
    assert resp._buffered <= PAUSE_ABOVE + len(piece)
    received = 0
    while chunk := await resp.readany():
        received += len(chunk)
    resp.release()
    assert received == len(piece) * count and net.peers[0].pauses >= 1


async def test_refused_connect_is_connect_failed(fake) -> None:
    from backends.http.client import ConnectFailed

    pool, net = make(fake, answers(OK))
    net.refuse = True
    with pytest.raises(ConnectFailed):
        await pool.request(ORIGIN, "GET", "/x", [], None, 5)
    net.refuse = False
    assert await get(pool) == (200, b"hello")  # the failed attempt gave its slot back


async def test_request_bytes_are_what_the_client_wrote(fake) -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: FakeWriter) -> None:
        seen.append(await read_request(reader))
        writer.write(OK)
    pool, _ = make(fake, script)
    resp = await pool.request(ORIGIN, "POST", "/v2/models/m/infer", [("X-A", "1")], b'{"a":1}', 5)
    assert await resp.read() == b"hello"
    resp.release()
    assert seen == [b"POST /v2/models/m/infer HTTP/1.1\r\nHost: upstream.test:8000\r\nX-A: 1\r\n"
                    b"Content-Length: 7\r\n\r\n{\"a\":1}"]


# -- timers, on a fake clock: the client's silence limit, total deadlines and keep-alive ----------------------


def remote_controlled(head: bytes) -> tuple[Script, asyncio.Queue[bytes | None]]:
    """A script that answers ``head`` and then writes whatever the test puts on the queue (None: hang up)."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def script(reader: asyncio.StreamReader, writer: FakeWriter) -> None:
        await read_request(reader)
        writer.write(head)
        while (data := await queue.get()) is not None:
            writer.write(data)
    return script, queue


async def test_silence_past_the_timeout_is_a_read_timeout(fake) -> None:
    clock = FakeClock()
    script, _ = remote_controlled(b"")  # hears the request, says nothing
    pool, _ = make(fake, script, clock=clock)
    request = asyncio.ensure_future(pool.request(ORIGIN, "GET", "/x", [], None, 5))
    await eventually(lambda: clock.sleepers == 1)  # the exchange's one timer
    clock.advance(4.9)
    await clock.settle()
    assert not request.done()
    clock.advance(0.2)  # the thing under test: 5 s without a byte
    with pytest.raises(ReadTimeout):
        await asyncio.wait_for(request, 5)


async def test_each_byte_restarts_the_silence_limit_but_not_a_total_deadline(fake) -> None:
    clock = FakeClock()
    script, queue = remote_controlled(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
    pool, _ = make(fake, script, clock=clock)
    resp = await pool.request(ORIGIN, "GET", "/x", [], None, 5)
    body = asyncio.ensure_future(resp.read(total_s=10))
    await clock.settle()  # read() has started: its deadline is 10 s from now
    for sent in (1, 2):  # a byte every 4 s: never 5 s of silence
        clock.advance(4)
        queue.put_nowait(b"x")
        await eventually(lambda: resp._received == sent)
    clock.advance(1.9)
    await clock.settle()
    assert not body.done()  # 9.9 s, in steps the silence limit allows...
    clock.advance(0.2)  # ...and the whole-body deadline (total_s) ends it
    with pytest.raises(ReadTimeout):
        await asyncio.wait_for(body, 5)
    resp.release()


async def test_a_stream_deadline_ends_a_stream_that_never_goes_silent(fake) -> None:
    clock = FakeClock()
    script, queue = remote_controlled(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    pool, _ = make(fake, script, clock=clock)
    resp = await pool.request(ORIGIN, "GET", "/x", [], None, 5)
    resp.expire_after(10)
    received = b""
    for _ in range(3):
        queue.put_nowait(b"1\r\ny\r\n")
        received += await resp.readany()
        clock.advance(3)
    clock.advance(1.5)  # 10.5 s in: past max_stream_s, although the upstream was never silent for 5 s
    with pytest.raises(StreamExpired):
        await asyncio.wait_for(resp.readany(), 5)
    assert received == b"yyy"
    resp.release()


async def test_an_idle_connection_past_keepalive_is_not_reused(fake) -> None:
    clock = FakeClock()
    pool, net = make(fake, answers(OK, OK), clock=clock, keepalive_s=4.0)
    assert await get(pool) == (200, b"hello")
    clock.advance(3.9)
    assert await get(pool) == (200, b"hello")  # within keepalive_s: the same connection
    assert net.connections == 1
    clock.advance(4.0)  # the thing under test: idle for keepalive_s
    assert await get(pool) == (200, b"hello")
    assert net.connections == 2 and net.peers[0].closed_by_client
