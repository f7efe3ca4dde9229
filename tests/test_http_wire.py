"""The public port's HTTP/1.1 behaviour on the wire, whatever server implements it.

Black-box: a real gateway and a real upstream on loopback, raw sockets for the
client, every answer parsed strictly (RFC 9112 section 6.3 framing), so that
pipelining, keep-alive, chunked bodies, ``Expect: 100-continue``, HEAD, early
refusals and shutdown hold for any HTTP server the gateway is built on. Every
test runs on both loops (asyncio and uvloop, as ``serve`` runs), with short
limits so each takes well under 2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import io
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import orjson
import pytest
from aiohttp import web

from tests import client_limits_support as support, harness
from tests.client_limits_support import BODY, V2_PATH, gateway, open_raw, port_of, send, until_closed
from tests.harness import ALLOW_ANALYSTS, Keys, RunningGateway, error_fields, eventually, stopping, v2_model

# both loops, as in the client-limit tests (bound here, not imported: a test's ``upstream`` parameter is the fixture)
event_loop_policy, pytestmark, upstream = support.event_loop_policy, support.pytestmark, support.upstream

INFER_ANSWER = {"model_name": "digits", "outputs": [{"name": "s", "datatype": "FP32", "shape": [2], "data": [1, 0]}]}


class Closed(Exception):
    """The server closed the connection before sending any byte of the next answer."""


@dataclass
class Answer:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, (name, values)
        return values[0] if values else None


class Wire:
    """A raw client connection and the bytes it has received but not parsed yet (answers are read one at a time)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    async def send(self, data: bytes) -> None:
        await send(self.sock, data)

    async def _take(self, deadline: float, *, until: bytes = b"", size: int = 0) -> bytes:
        """The buffer up to ``until`` (which is dropped), or its first ``size`` bytes, once they have arrived."""
        loop = asyncio.get_running_loop()
        while until not in self.buffer if until else len(self.buffer) < size:
            chunk = b""
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), max(deadline - loop.time(), 0.001))
            if not chunk:
                raise EOFError
            self.buffer += chunk
        if until:
            taken, _, self.buffer = self.buffer.partition(until)
        else:
            taken, self.buffer = self.buffer[:size], self.buffer[size:]
        return taken

    async def answer(self, *, head: bool = False, timeout: float = 5.0) -> Answer:
        """The next answer, its body framed as RFC 9112 section 6.3 says (``head``: the answer to a HEAD).

        ``Closed`` when the server closed before sending any of it; any other shortfall fails the test."""
        deadline = asyncio.get_running_loop().time() + timeout
        status_line = None
        try:
            status_line, *lines = (await self._take(deadline, until=b"\r\n\r\n")).decode("latin-1").split("\r\n")
            version, status, _ = (status_line + " ").split(" ", 2)
            assert version in ("HTTP/1.1", "HTTP/1.0") and status.isdigit(), status_line
            headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
            answer = Answer(version, int(status), headers, b"")
            lengths = {v for k, v in headers if k.lower() == "content-length"}
            codings = [v.lower() for k, v in headers if k.lower() == "transfer-encoding"]
            assert len(lengths) <= 1 and not (lengths and codings), f"ambiguous framing: {headers}"
            if head or answer.status < 200 or answer.status in (204, 304):
                return answer
            if codings:
                assert codings == ["chunked"], codings
                while size := int((await self._take(deadline, until=b"\r\n")).split(b";")[0], 16):
                    chunk = await self._take(deadline, size=size + 2)
                    assert chunk.endswith(b"\r\n"), chunk
                    answer.body += chunk[:-2]
                while await self._take(deadline, until=b"\r\n"):  # trailer fields, up to the empty line
                    pass
            elif lengths:
                answer.body = await self._take(deadline, size=int(lengths.pop()))
            else:  # delimited by the close
                with contextlib.suppress(EOFError):
                    await self._take(deadline, size=1 << 40)
                answer.body, self.buffer = self.buffer, b""
            return answer
        except (TimeoutError, asyncio.TimeoutError):
            raise AssertionError(f"no whole answer within {timeout} s; unparsed: {self.buffer[:300]!r}") from None
        except EOFError:
            if status_line is None and not self.buffer:
                raise Closed("the server closed the connection before any answer") from None
            raise AssertionError(f"closed in the middle of an answer; unparsed: {self.buffer[:300]!r}") from None

    async def closes(self, timeout: float) -> tuple[bytes, bool]:
        """What else arrives (with anything unparsed), and whether the server closed within ``timeout``."""
        more, closed = await until_closed(self.sock, timeout)
        return self.buffer + more, closed


@contextlib.asynccontextmanager
async def wire(gw: RunningGateway) -> AsyncIterator[Wire]:
    with contextlib.closing(await open_raw(port_of(gw))) as sock:
        yield Wire(sock)


@pytest.fixture
async def gw(tmp_path: Path, keys: Keys, upstream: Any) -> AsyncIterator[RunningGateway]:
    """The gateway with its default limits, in front of the recording upstream."""
    async with stopping(await gateway(tmp_path, keys, upstream)) as running:
        yield running


@pytest.fixture
async def w(gw: RunningGateway) -> AsyncIterator[Wire]:
    """A raw connection to ``gw``."""
    async with wire(gw) as connection:
        yield connection


@pytest.fixture
def auth(keys: Keys) -> str:
    """An analyst's ``Authorization`` header value (the policy lets analysts infer and read)."""
    return keys.auth()["Authorization"]


def request(method: str = "POST", path: str = V2_PATH, *, auth: str | None = None, body: bytes | None = BODY,
            headers: str = "", version: str = "HTTP/1.1", length: int | None = None) -> bytes:
    """Raw request bytes; ``headers`` are extra header lines ending in CRLF, ``length`` a Content-Length to claim."""
    head = f"{method} {path} {version}\r\nHost: x\r\n"
    if auth is not None:
        head += f"Authorization: {auth}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body) if length is None else length}\r\n"
    return (head + headers + "\r\n").encode() + (body or b"")


def chunked_infer(auth: str, trailer: bytes = b"", *, framing: str = "") -> bytes:
    """An infer request whose body is in three chunks, one with a chunk extension."""
    a, b, c = BODY[:7], BODY[7:40], BODY[40:]
    return (request(auth=auth, body=None, headers=f"Content-Type: application/json\r\n{framing}"
                                                   "Transfer-Encoding: chunked\r\n")
            + b"%x;name=value\r\n%b\r\n%x\r\n%b\r\n%x\r\n%b\r\n0\r\n" % (len(a), a, len(b), b, len(c), c)
            + trailer + b"\r\n")


def served_infer(answer: Answer) -> None:
    assert answer.status == 200, (answer.status, answer.body[:300])
    assert orjson.loads(answer.body)["model_name"] == "digits"
    assert answer.get("X-Request-ID")


def refusal(answer: Answer, status: int) -> dict[str, Any]:
    """``answer`` is the JSON error shape with ``status``, its X-Request-ID the body's request_id."""
    assert answer.status == status, (answer.status, answer.body[:300])
    error = error_fields(answer.body)
    assert answer.get("X-Request-ID") == error["request_id"], answer.headers
    return error


async def test_pipelined_requests_are_answered_in_order(w: Wire, upstream: Any, auth: str) -> None:
    """HTTP/1.1 clients (and proxies in front of us) may pipeline: answers must come whole, in request order."""
    await w.send(b"".join(request(auth=auth, headers=f"X-Request-ID: pipelined-{i}\r\n") for i in range(3)))
    answers = [await w.answer() for _ in range(3)]
    for answer in answers:
        served_infer(answer)
    assert [a.get("X-Request-ID") for a in answers] == ["pipelined-0", "pipelined-1", "pipelined-2"]  # the client's
    assert len(upstream.seen) == 3 and w.buffer == b""


async def test_http_1_0_closes_unless_keep_alive_is_asked(gw: RunningGateway, auth: str) -> None:
    """An HTTP/1.0 client reads to the close unless it asked for keep-alive and was told so (ab -k, old proxies)."""
    async with wire(gw) as w:
        await w.send(request(auth=auth, version="HTTP/1.0"))
        answer = await w.answer()
        served_infer(answer)
        assert answer.get("Transfer-Encoding") is None  # an HTTP/1.0 client knows no chunked
        assert await w.closes(2) == (b"", True)
    async with wire(gw) as w:
        for _ in range(2):
            await w.send(request(auth=auth, version="HTTP/1.0", headers="Connection: keep-alive\r\n"))
            answer = await w.answer()
            served_infer(answer)
            assert answer.get("Content-Length") == str(len(answer.body))
            assert (answer.get("Connection") or "").lower() == "keep-alive", answer.headers


async def test_connection_close_from_the_client_closes_after_the_answer(w: Wire, auth: str) -> None:
    """A client that says ``Connection: close`` waits for the close to know it is done (RFC 9112 section 9.6)."""
    await w.send(request(auth=auth, headers="Connection: close\r\n"))
    served_infer(await w.answer())
    assert await w.closes(2) == (b"", True)


@pytest.mark.parametrize("trailer", [b"", b"X-Trailer: 1\r\n"], ids=["plain", "trailer"])
async def test_a_chunked_body_in_unaligned_pieces_reaches_the_upstream_whole(w: Wire, upstream: Any, auth: str,
                                                                             trailer: bytes) -> None:
    """Chunked uploads (streaming clients, curl -T -) arrive split anywhere; the model must get the exact bytes."""
    data = chunked_infer(auth, trailer)
    for i in range(0, len(data), 11):  # 11-byte pieces: cuts through the head, size lines and chunk data
        await w.send(data[i:i + 11])
        await asyncio.sleep(0.01)  # real socket: each piece its own read on the server
    served_infer(await w.answer())
    assert [s.body for s in upstream.seen] == [BODY]
    await w.send(request(auth=auth))  # the last chunk (and trailer) was consumed, nothing more
    served_infer(await w.answer())


async def test_content_length_with_chunked_is_refused(w: Wire, upstream: Any, auth: str) -> None:
    """Both framings in one request is the request-smuggling shape (RFC 9112 section 6.1): 400, then close."""
    await w.send(chunked_infer(auth, framing="Content-Length: 5\r\n") + request(auth=auth))
    assert refusal(await w.answer(), 400)["type"] == "invalid_request"
    assert await w.closes(2) == (b"", True)
    assert upstream.seen == []


async def test_a_bad_chunk_size_is_refused_and_closed(w: Wire, upstream: Any, auth: str) -> None:
    """After a framing error nothing on the connection can be trusted: 400 in our shape, then close."""
    data = chunked_infer(auth)
    await w.send(data[:data.index(b"\r\n\r\n") + 4] + b"zz\r\n" + BODY + b"\r\n0\r\n\r\n")
    assert refusal(await w.answer(), 400)["type"] == "invalid_request"
    assert await w.closes(2) == (b"", True)
    assert upstream.seen == []


async def test_expect_100_continue_gets_the_interim_answer_before_the_body(w: Wire, upstream: Any, auth: str) -> None:
    """curl (over 1 KiB) and many HTTP libraries send Expect and stall about 1 s without the interim 100."""
    await w.send(request(auth=auth, headers="Expect: 100-continue\r\n")[:-len(BODY)])
    interim = await w.answer(timeout=2)
    assert (interim.version, interim.status) == ("HTTP/1.1", 100), interim
    await w.send(BODY)
    served_infer(await w.answer())
    assert [s.body for s in upstream.seen] == [BODY]


async def test_expect_100_continue_refused_from_the_head_gets_the_final_answer_only(w: Wire, upstream: Any) -> None:
    """A request refused from its head alone must not invite the body (no 100), only the final answer."""
    await w.send(request(headers="Expect: 100-continue\r\n")[:-len(BODY)])  # no credentials
    assert refusal(await w.answer(timeout=2), 401)["type"] == "unauthenticated"
    assert upstream.seen == []


async def test_head_answers_carry_no_body(w: Wire, auth: str) -> None:
    """A body written after a HEAD answer would be read as the next answer: the connection's framing breaks."""
    await w.send(request("HEAD", "/v1/models", auth=auth, body=None) + request("GET", "/v1/models", auth=auth,
                                                                                body=None))
    head, get = await w.answer(head=True), await w.answer()
    assert head.status == get.status == 200, (head, get)
    assert orjson.loads(get.body)["data"][0]["id"] == "digits"
    assert head.get("Content-Length") in (None, str(len(get.body))), (head.headers, len(get.body))
    assert head.get("X-Request-ID") and head.get("Content-Type") == get.get("Content-Type")
    assert await w.closes(0.3) == (b"", False)  # nothing more (a HEAD body would show up here)


async def test_a_client_gone_mid_body_is_never_forwarded(gw: RunningGateway, upstream: Any, auth: str) -> None:
    """Half a body must not reach the model as a request, nor leave the server in a bad state."""
    async with wire(gw) as w:
        await w.send(request(auth=auth, body=BODY[:10], length=1000))
        await asyncio.sleep(0.1)  # real socket: the server has the head and part of the body before the close
    await asyncio.sleep(0.2)  # real socket: time for the server to see the close
    async with wire(gw) as w:
        await w.send(request(auth=auth))
        served_infer(await w.answer())
    assert [s.body for s in upstream.seen] == [BODY]


async def test_an_early_refusal_does_not_wait_for_a_large_body(tmp_path: Path, keys: Keys, upstream: Any,
                                                               auth: str) -> None:
    """A 401 decided from the head must come at once; the connection then closes or stays correctly framed."""
    declared, sent = 2_000_000, 65_536
    async with stopping(await gateway(tmp_path, keys, upstream, max_body_bytes=4_000_000)) as gw, wire(gw) as w:
        await w.send(request(body=b"x" * sent, length=declared))  # no credentials
        assert refusal(await w.answer(timeout=2), 401)["type"] == "unauthenticated"
        rest, closed = await w.closes(0.5)
        assert rest == b""
        if not closed:  # kept open: the body's rest is skipped and the next request is read as one
            with contextlib.suppress(Closed, ConnectionError):  # or the server gives up on the body and closes
                await w.send(b"x" * (declared - sent) + request(auth=auth))
                served_infer(await w.answer())
        assert upstream.seen == [] or [s.body for s in upstream.seen] == [BODY]


async def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path, keys: Keys, upstream: Any, auth: str) -> None:
    """Idle connections hold a socket and memory each; ``keepalive_timeout_s`` bounds how long."""
    async with stopping(await gateway(tmp_path, keys, upstream, keepalive_timeout_s=0.5)) as gw, wire(gw) as w:
        await w.send(request(auth=auth))
        served_infer(await w.answer())
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await w.closes(2.5) == (b"", True)
        assert 0.3 <= loop.time() - started < 2.0, loop.time() - started


async def test_an_upgrade_request_is_never_switched(w: Wire, upstream: Any, auth: str) -> None:
    """The gateway speaks no WebSocket: a 101 (or an upgrade passed upstream) would tunnel past every stage."""
    await w.send(request(auth=auth, headers="Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13"
                                            "\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"))
    answer = await w.answer()
    assert answer.status >= 200 and answer.get("Upgrade") is None and answer.get("X-Request-ID"), answer
    for seen in upstream.seen:
        assert "upgrade" not in {k.lower() for k in seen.headers}, seen.headers
        assert "upgrade" not in seen.headers.get("Connection", "").lower(), seen.headers
    with contextlib.suppress(Closed, ConnectionError):  # closing after it is fine too
        await w.send(request(auth=auth))
        served_infer(await w.answer())


async def test_connect_is_refused_never_tunnelled(w: Wire, upstream: Any, auth: str) -> None:
    """CONNECT would make the gateway an open proxy: answered in our error shape and never forwarded."""
    await w.send(request("CONNECT", "example.com:443", auth=auth, body=None))
    with contextlib.suppress(Closed):  # closed without any answer: no tunnel either
        answer = await w.answer(timeout=2)
        assert 400 <= answer.status < 500, answer
        refusal(answer, answer.status)
        with contextlib.suppress(Closed, ConnectionError):  # no tunnel: what follows is ours to answer, or closed
            await w.send(request(auth=auth))
            served_infer(await w.answer(timeout=2))
    assert all((s.method, s.path) == ("POST", V2_PATH) for s in upstream.seen), upstream.seen


async def extra_headers(request: web.Request) -> web.Response:
    """An upstream answering chunked, with an extra header and hop-by-hop ones of its own connection."""
    response = web.Response(body=orjson.dumps(INFER_ANSWER), headers={
        "Content-Type": "application/json", "X-Upstream-Extra": "kept", "Connection": "X-Hop", "X-Hop": "secret",
        "Keep-Alive": "timeout=1"})
    response.enable_chunked_encoding()
    return response


class _Replay(io.BytesIO):
    """Bytes already received, as the socket ``http.client`` reads answers from."""

    def makefile(self, *args: Any) -> _Replay:
        return self

    def close(self) -> None:  # http.client closes its file after each answer; the next answer is in it too
        pass


async def test_answers_carry_a_request_id_and_the_upstreams_headers_but_not_its_framing(tmp_path: Path, keys: Keys,
                                                                                         auth: str) -> None:
    """A proxy must re-frame what it relays (RFC 9110 section 7.6.1): stdlib clients must parse every answer."""
    async with (harness.upstream(extra_headers) as up,
                harness.gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS) as gw,
                wire(gw) as w):
        await w.send(request(auth=auth) + request() + request(path="/nope", auth=auth)
                     + request(auth=auth, headers="Connection: close\r\n"))
        data, closed = await w.closes(5)
        assert closed
    stream, answers = _Replay(data), []
    for _ in range(4):
        response = http.client.HTTPResponse(stream)  # type: ignore[arg-type]
        response.begin()
        headers = [(k.lower(), v) for k, v in response.getheaders()]
        answers.append((response.status, headers, response.read()))
    assert stream.read() == b""  # every answer's framing ended exactly where the next began
    assert [status for status, _, _ in answers] == [200, 401, 404, 200]
    for status, headers, body in answers:
        names = [k for k, _ in headers]
        assert names.count("x-request-id") == 1, headers
        assert "x-hop" not in names and "keep-alive" not in names, headers
        assert not {"content-length", "transfer-encoding"} <= set(names), headers
        if status == 200:
            assert orjson.loads(body) == INFER_ANSWER and ("x-upstream-extra", "kept") in headers
        else:
            assert error_fields(body)["request_id"] == dict(headers)["x-request-id"]
    assert len({dict(h)["x-request-id"] for _, h, _ in answers}) == 4


async def test_stop_finishes_the_request_in_flight_then_refuses_connections(tmp_path: Path, keys: Keys,
                                                                            auth: str) -> None:
    """A rolling restart must not cut answers under way, and must not take new work once stopped."""
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)  # a real upstream still working when stop() is called
        return web.json_response(INFER_ANSWER)

    async with harness.upstream(slow) as up:
        gw = await harness.start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS)
        stop: asyncio.Task[None] | None = None
        try:
            async with wire(gw) as w:
                await w.send(request(auth=auth))
                await eventually(lambda: up.seen, 2, message="the request never reached the upstream")
                stop = asyncio.create_task(gw.stop())
                served_infer(await w.answer(timeout=3))
                await asyncio.wait_for(stop, 5)
            with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port_of(gw)))
        finally:
            await (stop if stop is not None else gw.stop())  # stopped once, whatever failed


async def test_many_requests_on_one_connection_keep_no_state_between_them(w: Wire, upstream: Any, auth: str) -> None:
    """A keep-alive connection is reused for hours: one request's refusal must not leak into the next."""
    ids = set()
    for i in range(200):
        await w.send(request(auth=auth if i % 2 else None))
        answer = await w.answer()
        if i % 2:
            served_infer(answer)
        else:
            assert refusal(answer, 401)["type"] == "unauthenticated"
        ids.add(answer.get("X-Request-ID"))
    assert len(ids) == 200 and len(upstream.seen) == 100


async def test_a_long_pipeline_is_answered_whole_and_in_order(w: Wire, upstream: Any, auth: str) -> None:
    """Past 16 requests parsed ahead of their answers the server stops reading the socket, and must start
    again as answers go out: 60 pipelined requests in one write all come back, in order."""
    await w.send(b"".join(request(auth=auth, headers=f"X-Request-ID: p-{i}\r\n") for i in range(60)))
    answers = [await w.answer() for _ in range(60)]
    assert [a.get("X-Request-ID") for a in answers] == [f"p-{i}" for i in range(60)]
    assert {a.status for a in answers} == {200} and len(upstream.seen) == 60


async def test_trailers_over_the_head_cap_are_refused(tmp_path: Path, keys: Keys, upstream: Any, auth: str) -> None:
    """A chunked body's trailer section is headers after the body: it has the same cap as the head, or a
    client could make the parser buffer a header without end."""
    gw = await gateway(tmp_path, keys, upstream, max_header_bytes=2048)
    async with stopping(gw), wire(gw) as w:
        await w.send(chunked_infer(auth, b"X-Trailer: " + b"a" * 4096 + b"\r\n"))
        answer, closed = await w.closes(3)
        assert closed and b" 200 " not in answer.split(b"\r\n", 1)[0]
        assert upstream.seen == []


def test_a_header_that_would_split_the_answer_is_refused() -> None:
    """A backend's header value (or name) holding CR or LF would let it forge headers or a second answer:
    the answer's head is never built with one."""
    from gateway.http_answer import HeaderInjection, head

    assert head(200, [("X-Ok", "fine")], length=0, close=False).startswith(b"HTTP/1.1 200 OK\r\n")
    for name, value in (("X-Evil", "a\r\nSet-Cookie: s=1"), ("X-Evil", "a\nb"), ("X-Evil", "a\rb"),
                        ("X-Evil\r\nSet-Cookie", "s=1")):
        with pytest.raises(HeaderInjection):
            head(200, [(name, value)], length=0, close=False)
