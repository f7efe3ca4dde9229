"""Client-side limits on the answer side: the client write deadline (``server.client_write_timeout_s``), plain and TLS.

Real gateway, real loopback sockets; a client that never reads (or reads slowly) is a raw socket with a
small receive buffer.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from pathlib import Path

import aiohttp
import pytest
import orjson
from aiohttp import web

from tests import harness
from tests.certs import self_signed
from tests.harness import (ALLOW_ANALYSTS, Keys, openai_model, skip_if_native, start_gateway, start_upstream,
                     v2_model)
from tests.client_limits_support import (  # noqa: F401  (pytest uses the fixtures and pytestmark)
    chat_request,
    endless_sse,
    error_of,
    event_loop_policy,
    infer,
    open_raw,
    port_of,
    pytestmark,
    raw_socket,
    send,
    served,
    until_closed,
    upstream,
    wait_for)


async def test_stalled_stream_reader_is_dropped_and_its_upstream_connection_freed(tmp_path: Path,
                                                                                  keys: Keys) -> None:
    streams = {"started": 0, "released": 0}
    up = await start_upstream(endless_sse(streams))
    gw = await start_gateway(tmp_path, keys, models={"chat": openai_model(up.url, max_connections=2)},
                             policy=ALLOW_ANALYSTS, server={"client_write_timeout_s": 1})
    stalled: list[socket.socket] = []
    try:
        for _ in range(2):  # both pooled upstream connections, held by clients that never read
            sock = await open_raw(port_of(gw), rcvbuf=4096)
            await send(sock, chat_request(keys, stream=True))
            stalled.append(sock)
        await wait_for(lambda: streams["started"] == 2)
        started = time.monotonic()

        async with aiohttp.ClientSession() as s:  # a second caller: waits for a pooled connection, then is served
            async with s.post(gw.url + "/v1/chat/completions", headers=keys.auth(),
                              json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["choices"][0]["message"]["content"] == "hi"
        waited = time.monotonic() - started
        assert 0.5 < waited < 6, waited  # it needed one of the stalled readers' connections

        await wait_for(lambda: streams["released"] == 2)
        assert gw.running.connections.write_timeouts == 2
        for sock in stalled:  # the stalled callers' sockets are closed, not left streaming
            _, closed = await until_closed(sock, 5)
            assert closed
    finally:
        for sock in stalled:
            sock.close()
        await gw.stop()
        await up.stop()


async def test_large_answer_to_a_client_that_never_reads_is_dropped(tmp_path: Path, keys: Keys) -> None:
    big = b'{"outputs": [], "pad": "' + b"p" * 12_000_000 + b'"}'
    calls = {"n": 0}

    async def large(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return web.Response(body=big, content_type="application/json")
        return web.json_response({"outputs": []})

    async with (harness.upstream(large) as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                                server={"client_write_timeout_s": 1}) as gw,
                raw_socket(port_of(gw), rcvbuf=4096) as sock):
        started = time.monotonic()
        await send(sock, infer(keys))
        await wait_for(lambda: gw.running.connections.write_timeouts == 1, timeout=10)
        assert time.monotonic() - started >= 1.0
        data, closed = await until_closed(sock, 5)
        assert closed and len(data) < len(big)  # cut: the rest of the answer was never going to be taken
        await wait_for(lambda: gw.running.connections.total == 0)
        assert await served(gw.url, keys) == 200


async def test_a_slow_reader_that_keeps_taking_is_not_dropped(tmp_path: Path, keys: Keys) -> None:
    big = b'{"outputs": [], "pad": "' + b"p" * 6_000_000 + b'"}'

    async def large(request: web.Request) -> web.Response:
        return web.Response(body=big, content_type="application/json")

    async with (harness.upstream(large) as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                                server={"client_write_timeout_s": 0.5}) as gw,
                raw_socket(port_of(gw), rcvbuf=4096) as sock):
        loop = asyncio.get_running_loop()
        await send(sock, infer(keys))
        await asyncio.sleep(0.3)  # real socket buffers fill while the client reads nothing
        received = 0
        started = time.monotonic()
        while time.monotonic() - started < 2.0:  # a little at a time, each gap shorter than the deadline
            received += len(await asyncio.wait_for(loop.sock_recv(sock, 256 * 1024), 5))
            await asyncio.sleep(0.2)  # real socket: a slow reader, each gap shorter than the real write deadline
        assert gw.running.connections.write_timeouts == 0
        while received < len(big):  # then at full speed: the whole answer arrives
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5)
            assert chunk, "closed mid-answer"
            received += len(chunk)


async def test_over_tls_half_heads_get_the_deadline_and_stalled_readers_are_dropped(tmp_path: Path,
                                                                                  keys: Keys) -> None:
    big = b'{"outputs": [], "pad": "' + b"p" * 12_000_000 + b'"}'

    async def large(request: web.Request) -> web.Response:
        return web.Response(body=big, content_type="application/json")

    up = await start_upstream(large)
    cert, key = self_signed(tmp_path, "server", host="localhost")
    gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                             server={"header_timeout_s": 0.5, "client_write_timeout_s": 1,
                                     "tls": {"cert_file": str(cert), "key_file": str(key)}})
    client_tls = ssl.create_default_context(cafile=str(cert))
    writers: list[asyncio.StreamWriter] = []
    try:
        half_r, half_w = await asyncio.open_connection("localhost", port_of(gw), ssl=client_tls)
        writers.append(half_w)
        started = time.monotonic()
        half_w.write(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")
        answer = await asyncio.wait_for(half_r.read(), 5)  # to EOF
        assert 0.4 <= time.monotonic() - started < 1.5
        assert error_of(answer)[0] == 408

        stalled = await open_raw(port_of(gw), rcvbuf=4096)
        st_r, st_w = await asyncio.open_connection(sock=stalled, ssl=client_tls, server_hostname="localhost",
                                                   limit=16_384)  # the stream reader stops taking at 32 KiB
        writers.append(st_w)
        st_w.write(infer(keys))
        await wait_for(lambda: gw.running.connections.write_timeouts == 1, timeout=10)
        await wait_for(lambda: gw.running.connections.total == 0)
    finally:
        for w in writers:
            w.close()
        await gw.stop()
        await up.stop()


async def test_a_tls_handshake_that_never_finishes_is_closed_at_the_head_deadline(tmp_path: Path,
                                                                                   keys: Keys) -> None:
    """A TCP connection to a TLS port that never sends its ClientHello: asyncio would wait 60 s for it."""
    cert, key = self_signed(tmp_path, "server", host="localhost")
    async with (harness.upstream() as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                                server={"header_timeout_s": 0.5,
                                        "tls": {"cert_file": str(cert), "key_file": str(key)}}) as gw):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw))  # plain TCP, no handshake
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
        assert time.monotonic() - started < 2.5
        writer.close()
        # a real TLS client is still served
        client_tls = ssl.create_default_context(cafile=str(cert))
        r, w = await asyncio.open_connection("localhost", port_of(gw), ssl=client_tls)
        w.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(r.read(), 5)).startswith(b"HTTP/1.1 ")
        w.close()




async def test_a_stream_pushed_past_a_slow_reader_arrives_whole_and_in_order(tmp_path: Path, keys: Keys,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An upstream's stream is written from the upstream connection's callback while the client keeps up,
    and queues (the writer waiting for the client) once it does not: across those switches, a reader that is
    slow at first and fast later gets every event once, in order, and the usage the stream reported is read."""
    count = 3000
    from backends.http.response import Response

    attached = []
    push_to = Response.push_to

    def counting(self: Response, sink: object) -> None:
        attached.append(sink is not None and not self.ready())
        push_to(self, sink)  # type: ignore[arg-type]

    skip_if_native(Response)
    monkeypatch.setattr(Response, "push_to", counting)

    async def numbered(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(count):
            delta = {"content": f"{i:06d}" + "x" * 2500}  # ~7.5 MB in all: more than socket buffers hold
            await response.write(b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": delta}]}) + b"\n\n")
            if i % 500 == 0:
                await asyncio.sleep(0.05)  # the reader catches up meanwhile: pushing starts again
        usage = {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1}
        await response.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    async with (harness.upstream(numbered) as up,
                harness.gateway(tmp_path, keys, models={"chat": openai_model(up.url)}, policy=ALLOW_ANALYSTS) as gw,
                raw_socket(port_of(gw), rcvbuf=4096) as sock):
        loop = asyncio.get_running_loop()
        await send(sock, chat_request(keys, stream=True))
        data = b""
        started = time.monotonic()
        while not data.endswith(b"0\r\n\r\n"):
            slow = time.monotonic() - started < 1
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096 if slow else 1 << 20), 5)
            assert chunk, "closed mid-stream"
            data += chunk
            if slow:
                await asyncio.sleep(0.01)  # slow at first: socket buffers fill, chunks queue
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower()
        events = b""
        while body:  # undo the chunked framing
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line, 16)
            events, body = events + body[:size], body[size + 2:]
        numbers = [int(line[line.index(b'"content":"') + 11:][:6]) for line in events.split(b"\n\n")
                   if b'"content":"' in line]
        assert numbers == list(range(count))
        assert events.endswith(b"data: [DONE]\n\n")
        assert attached.count(True) >= 3  # pushed from the start, then again each time the reader caught up


async def short_sse(request: web.Request) -> web.StreamResponse:
    """A chat stream of one token, its usage and [DONE], in two writes."""
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
    await response.write(b'data: {"choices":[],"usage":{"total_tokens":3}}\n\ndata: [DONE]\n\n')
    await response.write_eof()
    return response


async def test_a_streams_end_leaves_after_its_bookkeeping(tmp_path: Path, keys: Keys,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The last chunk of a stream is written after the request's quota settlement, metrics and audit line, as
    a whole answer is: a client that sees the end finds its request accounted for, and its next request on the
    connection does not queue behind the previous one's bookkeeping."""
    from gateway.app import Gateway
    from gateway.http_writer import AnswerWriter

    order: list[str] = []
    finish, end_stream = Gateway.finish, AnswerWriter.end_stream

    async def finishing(self: Gateway, ctx: object) -> None:
        await finish(self, ctx)  # type: ignore[arg-type]
        order.append("finish")

    def ending(self: AnswerWriter) -> None:
        order.append("end")
        end_stream(self)

    skip_if_native(Gateway, AnswerWriter)
    monkeypatch.setattr(Gateway, "finish", finishing)
    monkeypatch.setattr(AnswerWriter, "end_stream", ending)

    async with (harness.upstream(short_sse) as up,
                harness.gateway(tmp_path, keys, models={"chat": openai_model(up.url)}, policy=ALLOW_ANALYSTS) as gw,
                raw_socket(port_of(gw)) as sock):
        loop = asyncio.get_running_loop()
        for _ in range(2):  # two streams on one connection
            await send(sock, chat_request(keys, stream=True))
            data = b""
            while not data.endswith(b"\r\n0\r\n\r\n"):
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
                assert chunk, "closed mid-stream"
                data += chunk
            assert b"data: [DONE]" in data
        assert order == ["finish", "end", "finish", "end"]


async def test_a_client_gone_between_a_streams_last_event_and_its_end(tmp_path: Path, keys: Keys,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The client resets its connection after the last event, while the request's bookkeeping runs and before
    the stream's end is written (the end is written after ``finish``): the end goes nowhere, quietly; the
    request keeps its one audit line; the connection is let go; the gateway serves the next caller."""
    from gateway.app import Gateway
    from gateway.http_writer import AnswerWriter

    finish, end_stream = Gateway.finish, AnswerWriter.end_stream
    gone: list[socket.socket] = []
    order: list[str] = []

    def ending(self: AnswerWriter) -> None:
        order.append("end")
        end_stream(self)

    async def finishing(self: Gateway, ctx: object) -> None:
        if gone:
            sock = gone.pop()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
            sock.close()
            time.sleep(0.05)  # blocking: the reset reaches the gateway's socket before its loop runs again
            order.append("reset")
        await finish(self, ctx)  # type: ignore[arg-type]

    skip_if_native(Gateway, AnswerWriter)
    monkeypatch.setattr(Gateway, "finish", finishing)
    monkeypatch.setattr(AnswerWriter, "end_stream", ending)

    async with (harness.upstream(short_sse) as up,
                harness.gateway(tmp_path, keys, models={"chat": openai_model(up.url)}, policy=ALLOW_ANALYSTS) as gw):
        sock = await open_raw(port_of(gw))
        gone.append(sock)
        await send(sock, chat_request(keys, stream=True))
        await wait_for(lambda: order[:2] == ["reset", "end"])  # reset during the bookkeeping, then the end
        audit = tmp_path / "audit.log"
        await wait_for(lambda: audit.exists() and b'"model":"chat"' in audit.read_bytes())
        [line] = [orjson.loads(raw) for raw in audit.read_bytes().splitlines()]
        assert line["status"] == 200 and line["decision"] == "allow"
        async with aiohttp.ClientSession() as s:  # the reset connection is let go (the gauge counts open ones)
            for _ in range(100):
                async with s.get(gw.admin_url + "/metrics") as r:
                    if b"\nmaas_client_connections 0.0\n" in await r.read():
                        break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the reset connection is still counted open")
        async with aiohttp.ClientSession() as s:  # the next caller is served
            async with s.post(gw.url + "/v1/chat/completions", headers=keys.auth(),
                              json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200, await r.text()
    assert "answering a request failed" not in caplog.text and "Traceback" not in caplog.text


async def test_a_streams_end_is_not_written_to_a_connection_already_closing(tmp_path: Path, keys: Keys,
                                                                          caplog: pytest.LogCaptureFixture,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection was closed on our side (a write deadline, a stop) between the stream's last chunk and its
    end: the end is not written, nothing is logged as a failure, and the gateway serves the next caller."""
    from gateway.http_writer import AnswerWriter

    end_stream = AnswerWriter.end_stream
    closed: list[bool] = []

    def closing_first(self: AnswerWriter) -> None:
        transport = self._tr
        if transport is not None and not closed:
            transport.close()  # what a write deadline or a stop does
            closed.append(transport.is_closing())
        end_stream(self)

    skip_if_native(AnswerWriter)
    monkeypatch.setattr(AnswerWriter, "end_stream", closing_first)
    async with (harness.upstream(short_sse) as up,
                harness.gateway(tmp_path, keys, models={"chat": openai_model(up.url)}, policy=ALLOW_ANALYSTS) as gw,
                raw_socket(port_of(gw)) as sock):
        await send(sock, chat_request(keys, stream=True))
        data, closed_by_gateway = await until_closed(sock, 5)
        assert closed == [True] and closed_by_gateway
        assert b"data: [DONE]" in data and not data.endswith(b"\r\n0\r\n\r\n")  # events, then no end
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/chat/completions", headers=keys.auth(),
                              json={"model": "chat", "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200, await r.text()
    assert "answering a request failed" not in caplog.text
