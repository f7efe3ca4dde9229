"""The upstream HTTP/1.1 client (backends/http/client.py) against hand-written servers on real sockets.

Each server here answers with exact bytes, so the tests pin down framing the
way an upstream can get it wrong or hostile: no length, chunked, 1xx first,
two answers to one request, a header block that never ends.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.http.client import (ConnectFailed, ConnectTimeout, Disconnected, InvalidRequestLine, InvalidResponse,
                                  Origin, Pool, ReadTimeout, _could_split)
from tests.certs import build_pki
from tests.harness import eventually

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"


class Server:
    """A raw TCP server: counts connections and records every request head it reads."""

    def __init__(self, answer: Callable[[int, bytes], bytes | None] | None = None) -> None:
        self.connections = 0
        self.heads: list[bytes] = []
        self._answer = answer or (lambda _n, _head: OK)
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def origin(self) -> Origin:
        assert self._server is not None
        return Origin.parse(f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if length:
                    await reader.readexactly(length)
                self.heads.append(head)
                answer = self._answer(len(self.heads), head)
                if answer is None:  # hang: never answer
                    await asyncio.sleep(3600)  # the thing under test: an upstream that never answers
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


async def fetch(pool: Pool, origin: Origin, method: str = "POST", headers=(), body: bytes | None = b"{}",
                timeout: float = 5) -> tuple[int, bytes, list[tuple[str, str]]]:
    resp = await pool.request(origin, method, "/v2/models/m/infer", list(headers), body, timeout)
    try:
        return resp.status, await resp.read(), resp.headers
    finally:
        resp.release()


def new_pool(**kw) -> Pool:
    return Pool(limit=kw.pop("limit", 8), keepalive_s=kw.pop("keepalive_s", 4.0),
                connect_timeout_s=kw.pop("connect_timeout_s", 2.0), ssl_context=None)


@pytest.fixture
async def server():
    servers: list[Server] = []

    async def make(answer=None) -> Server:
        s = await Server(answer).start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        await s.stop()


async def test_keep_alive_connection_is_reused(server) -> None:
    up = await server()
    pool = new_pool()
    for _ in range(5):
        assert (await fetch(pool, up.origin))[:2] == (200, b"{}")
    assert up.connections == 1
    pool.close()


async def test_request_head_is_what_was_asked(server) -> None:
    up = await server()
    pool = new_pool()
    await fetch(pool, up.origin, headers=[("X-Maas-Subject", "alice"), ("Content-Type", "application/json")])
    head = up.heads[0].decode()
    assert head.startswith("POST /v2/models/m/infer HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{up.origin.port}\r\n" in head
    assert "X-Maas-Subject: alice\r\n" in head and "Content-Length: 2\r\n" in head
    pool.close()


async def test_upstream_path_prefix_is_put_first(server) -> None:
    up = await server()
    pool = new_pool()
    origin = Origin.parse(f"http://127.0.0.1:{up.origin.port}/serving/")
    await fetch(pool, origin)
    assert up.heads[0].startswith(b"POST /serving/v2/models/m/infer HTTP/1.1\r\n")
    pool.close()


async def test_connection_close_answer_is_not_reused(server) -> None:
    up = await server(lambda n, _h: OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
    pool = new_pool()
    for _ in range(3):
        assert (await fetch(pool, up.origin))[0] == 200
    assert up.connections == 3
    pool.close()


async def test_chunked_body_is_reassembled(server) -> None:
    up = await server(lambda n, _h: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    pool = new_pool()
    assert (await fetch(pool, up.origin))[:2] == (200, b"abcde")
    assert (await fetch(pool, up.origin))[:2] == (200, b"abcde")
    assert up.connections == 1
    pool.close()


async def test_body_without_length_ends_with_the_connection(server) -> None:
    up = await server(lambda n, _h: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
    pool = new_pool()
    assert (await fetch(pool, up.origin))[:2] == (200, b"until the end")
    pool.close()


async def test_informational_answer_is_skipped(server) -> None:
    up = await server(lambda n, _h: b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    pool = new_pool()
    assert (await fetch(pool, up.origin))[:2] == (200, b"{}")
    assert (await fetch(pool, up.origin))[:2] == (200, b"{}")
    pool.close()


async def test_head_answer_has_no_body_whatever_its_length(server) -> None:
    up = await server(lambda n, _h: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    pool = new_pool()
    assert (await fetch(pool, up.origin, method="HEAD", body=None))[:2] == (200, b"")
    pool.close()


async def test_a_second_unasked_answer_is_never_given_to_the_next_request(server) -> None:
    """Response desync: an upstream that answers twice must not have its spare answer served to someone else."""
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!"
    up = await server(lambda n, _h: OK + smuggled if n == 1 else OK.replace(b"{}", b"ok"))
    pool = new_pool()
    first = await fetch(pool, up.origin)
    await eventually(lambda: not pool._origin_of)  # the spare answer arrives and its connection is dropped
    second = await fetch(pool, up.origin)
    assert first[1] == b"{}" and second[1] == b"ok"
    assert up.connections == 2  # the connection that carried the spare answer was dropped
    pool.close()


@pytest.mark.parametrize("headers", [
    [("X-Maas-Subject", "alice\r\nX-Maas-Roles: admin")],
    [("X-Maas-Subject", "alice\nX-Maas-Roles: admin")],
    [("X-Maas-Subject", "alice\rX")],
    [("X-Evil", "a\x00b")],
    [("X-Evil\r\nX-Maas-Roles", "admin")],
])
async def test_header_injection_is_refused_before_anything_is_sent(server, headers) -> None:
    up = await server()
    pool = new_pool()
    with pytest.raises(InvalidRequestLine):
        await pool.request(up.origin, "POST", "/x", headers, b"{}", 5)
    await asyncio.sleep(0.05)  # a window for a connection that must never come (nothing to wait on)
    assert up.connections == 0 and up.heads == []
    pool.close()


@pytest.mark.parametrize("target", ["/x HTTP/1.1\r\nX-Evil: 1\r\n\r\nGET /y", "/x y", "/x\n"])
async def test_request_target_cannot_split_the_request(server, target) -> None:
    up = await server()
    pool = new_pool()
    with pytest.raises(InvalidRequestLine):
        await pool.request(up.origin, "GET", target, [], None, 5)
    assert up.connections == 0
    pool.close()


def _exact_split_check(lines: str, count: int, target: str) -> bool:
    """The check ``_could_split`` takes a shortcut to, written out: one CR and one LF per line, no other control."""
    return (lines.count("\n") != count or lines.count("\r") != count
            or any(c < " " and c != "\t" and c not in "\r\n" or c == "\x7f" for c in lines)
            or any(c <= " " or c == "\x7f" for c in target))


_TEXT = st.text(alphabet=st.sampled_from("aZ: \t\r\n\x00\x1f\x7f\x85\u200b\udc80/é"), max_size=12)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(_TEXT, _TEXT), max_size=4), _TEXT)
def test_the_split_check_shortcut_agrees_with_the_exact_check(headers, target) -> None:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers)
    assert _could_split(lines, len(headers), target) == _exact_split_check(lines, len(headers), target)


@pytest.mark.parametrize("answer,error", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\nonly this", Disconnected),  # cut short
    (b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * 70_000 + b"\r\n\r\n", InvalidResponse),  # endless header block
    (b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 300 + b"\r\n", InvalidResponse),  # too many headers
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", InvalidResponse),  # not HTTP
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", InvalidResponse),
])
async def test_broken_answers_are_errors_never_short_answers(server, answer: bytes, error: type) -> None:
    up = await server(lambda n, _h: answer)
    pool = new_pool()
    with pytest.raises(error):
        await fetch(pool, up.origin)
    pool.close()


async def test_silent_upstream_is_a_read_timeout(server) -> None:
    up = await server(lambda n, _h: None)
    pool = new_pool()
    with pytest.raises(ReadTimeout):
        await fetch(pool, up.origin, timeout=0.2)
    pool.close()


async def test_a_reused_connection_keeps_the_next_exchanges_limit(server) -> None:
    """A connection's one timer outlives its exchanges; one left pending by a long limit must not stretch a
    later, shorter one on the same connection: the silent second answer times out on its own limit."""
    up = await server(lambda n, _h: OK if n == 1 else None)  # answers once, then never again
    pool = new_pool()
    assert (await fetch(pool, up.origin, timeout=60))[:2] == (200, b"{}")  # leaves a timer due in a minute
    async with asyncio.timeout(10):  # the pending timer would wait 60 s
        with pytest.raises(ReadTimeout):
            await fetch(pool, up.origin, timeout=0.2)
    assert up.connections == 1  # the same connection, reused
    pool.close()


async def test_closed_port_is_connect_failed() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    pool = new_pool()
    with pytest.raises(ConnectFailed):
        await fetch(pool, Origin.parse(f"http://127.0.0.1:{port}"))
    pool.close()


async def test_pool_never_opens_more_than_its_limit(server) -> None:
    up = await server(lambda n, _h: OK)
    pool = new_pool(limit=2)
    results = await asyncio.gather(*(fetch(pool, up.origin) for _ in range(20)))
    assert all(r[0] == 200 for r in results)
    assert up.connections <= 2
    pool.close()


async def test_waiting_for_a_free_connection_is_bounded(server) -> None:
    up = await server(lambda n, _h: None if n == 1 else OK)  # the first request hangs and holds the only slot
    pool = new_pool(limit=1, connect_timeout_s=0.2)
    holder = asyncio.ensure_future(fetch(pool, up.origin, timeout=10))
    await eventually(lambda: up.heads)  # the first request holds the only connection
    with pytest.raises(ConnectTimeout):
        await fetch(pool, up.origin)
    holder.cancel()
    pool.close()


async def test_a_freed_slot_goes_to_a_waiting_request(server) -> None:
    up = await server()
    pool = new_pool(limit=1)
    results = await asyncio.gather(*(fetch(pool, up.origin) for _ in range(5)))
    assert [r[0] for r in results] == [200] * 5 and up.connections == 1
    pool.close()


async def test_idle_connections_expire_after_keepalive(server) -> None:
    up = await server()
    pool = new_pool(keepalive_s=0.1)
    await fetch(pool, up.origin)
    await asyncio.sleep(0.25)  # real socket, loop clock (fake-clock twin: test_upstream_framing)
    await fetch(pool, up.origin)
    assert up.connections == 2
    pool.close()


async def test_idle_connections_are_closed_when_keepalive_runs_out_without_traffic(server) -> None:
    up = await server()
    pool = new_pool(keepalive_s=0.1)
    await fetch(pool, up.origin)
    assert pool._open == 1
    await eventually(lambda: pool._open == 0, timeout=2.0)  # the sweep closes it once keepalive_s (0.1 s) runs out
    pool.close()


async def test_at_the_limit_an_idle_connection_to_another_upstream_makes_room(server) -> None:
    a, b = await server(), await server()
    pool = new_pool(limit=1, connect_timeout_s=1)
    await fetch(pool, a.origin)  # leaves an idle connection to a, the only slot
    assert (await fetch(pool, b.origin))[0] == 200
    assert a.connections == 1 and b.connections == 1 and pool._open == 1
    pool.close()


async def test_connection_the_upstream_closed_while_idle_is_not_used(server) -> None:
    up = await server(lambda n, _h: OK.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n", 1))
    pool = new_pool()
    await fetch(pool, up.origin)
    for conn in list(pool._origin_of):  # the upstream times the idle connection out
        conn.transport.close()
    await eventually(lambda: not pool._origin_of)  # the pool saw the close
    assert (await fetch(pool, up.origin))[0] == 200
    assert up.connections == 2
    pool.close()


async def test_unread_body_closes_the_connection_instead_of_pooling_it(server) -> None:
    up = await server(lambda n, _h: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")  # never ends
    pool = new_pool()
    resp = await pool.request(up.origin, "POST", "/x", [], b"{}", 5)
    assert await resp.readany() == b"abc"
    resp.release()
    resp.release()
    assert pool._open == 0
    pool.close()


async def test_slow_reader_pauses_the_upstream_socket(server) -> None:
    big = b"x" * 1_000_000
    up = await server(lambda n, _h: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
    pool = new_pool()
    resp = await pool.request(up.origin, "POST", "/x", [], b"{}", 5)
    await eventually(lambda: resp._conn._paused)  # nobody reads: the buffer stops near the high-water mark, not at 1 MB
    assert resp._buffered < 600_000 and resp._conn._paused
    received = bytearray()
    while chunk := await resp.readany():
        received += chunk
    resp.release()
    assert bytes(received) == big
    pool.close()


# -- TLS to the upstream --------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_pki(tmp_path_factory.mktemp("pki"))


async def _tls_server(pki) -> tuple[asyncio.base_events.Server, int]:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(pki["server_crt"]), str(pki["server_key"]))

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)
            writer.write(OK)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    return server, server.sockets[0].getsockname()[1]


async def test_https_upstream_with_its_ca(pki) -> None:
    import ssl

    server, port = await _tls_server(pki)
    pool = Pool(limit=4, keepalive_s=4, connect_timeout_s=2,
                ssl_context=ssl.create_default_context(cafile=str(pki["ca"])))
    try:
        assert (await fetch(pool, Origin.parse(f"https://localhost:{port}")))[:2] == (200, b"{}")
    finally:
        pool.close()
        server.close()


async def test_https_upstream_with_an_untrusted_certificate_is_refused(pki) -> None:
    import ssl

    server, port = await _tls_server(pki)
    pool = Pool(limit=4, keepalive_s=4, connect_timeout_s=2, ssl_context=ssl.create_default_context())
    try:
        with pytest.raises(ConnectFailed):
            await fetch(pool, Origin.parse(f"https://localhost:{port}"))
    finally:
        pool.close()
        server.close()
