"""Client-side limits (``server.*``): head deadline, head size, connection caps, keep-alive, write deadline.

Every test talks to a real gateway over real loopback sockets, with raw
non-blocking sockets where the point is a client that misbehaves (sends half a
head, drips bytes, never reads). Limits are short so each test takes seconds.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway.config import ServerConfig, load_config
from gateway.errors import ConfigError
from certs import self_signed
from harness import (ALLOW_ANALYSTS, Keys, eventually, gateway_config, openai_model, start_gateway, start_upstream,
                     v2_model, write_yaml)

BODY = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1],"data":[1.0]}]}'
V2_PATH = "/v2/models/digits/infer"


# -- raw sockets ---------------------------------------------------------------------

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
    return int(head.split(b" ", 2)[1]), orjson.loads(body)["error"]


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


# -- configuration ---------------------------------------------------------------------

def test_defaults_are_the_contracts() -> None:
    s = ServerConfig()
    assert (s.header_timeout_s, s.keepalive_timeout_s, s.max_header_bytes, s.max_connections,
            s.max_connections_per_ip, s.client_write_timeout_s) == (10, 75, 65536, 10000, 1024, 30)


@pytest.mark.parametrize("key, value", [("header_timeout_s", 0), ("keepalive_timeout_s", -1), ("max_header_bytes", 10),
                                        ("max_connections", 0), ("max_connections_per_ip", 0),
                                        ("client_write_timeout_s", 0)])
def test_bad_limits_are_refused_naming_the_key(tmp_path: Path, key: str, value: Any) -> None:
    config = gateway_config(tmp_path, None, models={"m": v2_model("http://127.0.0.1:9")}, policy=None,
                            server={key: value}, auth={"api_keys": {"file": str(tmp_path / "keys.yaml")}})
    (tmp_path / "keys.yaml").write_text("[]\n")
    with pytest.raises(ConfigError, match=f"server.{key}"):
        load_config(write_yaml(tmp_path / "gateway.yaml", config))


def test_aiohttp_internals_the_guard_reads_are_still_there() -> None:
    """The guard lives inside aiohttp's RequestHandler; an aiohttp upgrade that renames these must fail here."""
    from aiohttp.web_protocol import RequestHandler, _ErrInfo

    slots = {name for cls in RequestHandler.__mro__ for name in getattr(cls, "__slots__", ())}
    assert {"_messages", "_waiter", "_close", "_force_close", "_request_count", "_payload_parser", "_upgraded",
            "_request_in_progress", "_loop", "_paused", "_logging_enabled"} <= slots
    assert callable(RequestHandler.log_access) and callable(RequestHandler.handle_error)
    assert _ErrInfo(status=431, exc=ValueError(), message="m").status == 431


# -- the request head ------------------------------------------------------------------

async def test_half_sent_heads_are_closed_within_the_deadline_while_a_real_client_is_served(
        tmp_path: Path, keys: Keys, upstream: Any) -> None:
    gw = await gateway(tmp_path, keys, upstream, header_timeout_s=0.5, keepalive_timeout_s=30)
    counter = gw.running.connections
    socks: list[socket.socket] = []
    try:
        socks = list(await asyncio.gather(*(open_raw(port_of(gw)) for _ in range(400))))
        sent_at = time.monotonic()
        await asyncio.gather(*(send(s, b"POST / HTTP/1.1\r\nHost: x\r\n") for s in socks))
        assert await served(gw.url, keys) == 200  # served while the 400 are held
        assert counter.total >= 400

        async def closed_after(sock: socket.socket) -> tuple[float, bytes, bool]:
            answer, closed = await until_closed(sock, 5)
            return time.monotonic() - sent_at, answer, closed

        results = await asyncio.gather(*(closed_after(s) for s in socks))
        assert all(closed for _, _, closed in results)
        slowest = max(t for t, _, _ in results)
        assert slowest < 0.5 + 1.5, slowest  # the deadline, plus scheduling slack for 400 sockets on a busy box
        statuses = {error_of(answer)[0] for _, answer, _ in results if answer}
        assert statuses <= {408}
        assert error_of(results[0][1])[1]["type"] == "request_timeout"
        await wait_for(lambda: counter.total == 0)
        assert counter.head_timeouts == 400
        assert await served(gw.url, keys) == 200
        registry = gw.gateway.metrics.registry  # exported at a scrape, never counted per request
        assert registry.get_sample_value("maas_client_connections_closed_total",
                                         {"limit": "header_timeout_s"}) == 400
        assert registry.get_sample_value("maas_client_connections") == 0
    finally:
        for s in socks:
            s.close()
        await gw.stop()


async def test_slowloris_is_closed_at_the_deadline_although_bytes_keep_arriving(
        tmp_path: Path, keys: Keys, upstream: Any) -> None:
    gw = await gateway(tmp_path, keys, upstream, header_timeout_s=0.5, keepalive_timeout_s=30)
    sock = await open_raw(port_of(gw))
    dripped = 0

    async def drip() -> None:
        nonlocal dripped
        for byte in b"X-Slow: " + b"a" * 200:
            try:
                await send(sock, bytes([byte]))
            except OSError:
                return
            dripped += 1
            await asyncio.sleep(0.1)  # the thing under test: a head dripped one byte at a time

    try:
        started = time.monotonic()
        await send(sock, b"GET /v2 HTTP/1.1\r\nHost: x\r\n")
        dripper = asyncio.create_task(drip())
        answer, closed = await until_closed(sock, 5)
        elapsed = time.monotonic() - started
        dripper.cancel()
        assert closed
        assert 0.4 <= elapsed < 1.5, elapsed
        assert dripped >= 3  # bytes kept arriving; the deadline did not move
        status, error = error_of(answer)
        assert status == 408 and error["type"] == "request_timeout"
        assert gw.running.connections.head_timeouts == 1
    finally:
        sock.close()
        await gw.stop()


async def test_keep_alive_connections_next_head_has_its_own_deadline(tmp_path: Path, keys: Keys, upstream: Any) -> None:
    gw = await gateway(tmp_path, keys, upstream, header_timeout_s=0.5, keepalive_timeout_s=30)
    sock = await open_raw(port_of(gw))
    try:
        for _ in range(3):  # well-behaved requests on one connection, spread over more than one deadline
            assert (await exchange(sock, infer(keys)))[0] == 200
            await asyncio.sleep(0.3)  # the thing under test: idle gaps that add up past the head deadline
        started = time.monotonic()
        await send(sock, b"GET /v2 HTTP/1.1\r\nHost: x\r\n")  # then half a head on the same connection
        answer, closed = await until_closed(sock, 5)
        assert closed and 0.4 <= time.monotonic() - started < 1.5
        assert error_of(answer)[0] == 408
    finally:
        sock.close()
        await gw.stop()


async def test_a_head_split_across_reads_within_the_deadline_is_served(tmp_path: Path, keys: Keys,
                                                                       upstream: Any) -> None:
    gw = await gateway(tmp_path, keys, upstream, header_timeout_s=1)
    sock = await open_raw(port_of(gw))
    try:
        request = infer(keys)
        for i in range(0, 300, 60):
            await send(sock, request[i:i + 60])
            await asyncio.sleep(0.05)  # the thing under test: a head in slow pieces, within the deadline
        assert (await exchange(sock, request[300:]))[0] == 200
        # pipelined: a whole request and the start of the next in one write; the rest arrives in time
        # (after a Content-Length body the next head's clock starts with its next read: see the module)
        await send(sock, request + request[:50])
        await asyncio.sleep(0.3)  # the thing under test: the rest of the next head comes late, yet in time
        status, _ = await exchange(sock, b"")
        assert status == 200
        assert (await exchange(sock, request[50:]))[0] == 200
        assert gw.running.connections.head_timeouts == 0
    finally:
        sock.close()
        await gw.stop()


async def test_half_a_head_pipelined_behind_a_request_gets_the_deadline(tmp_path: Path, keys: Keys,
                                                                        upstream: Any) -> None:
    gw = await gateway(tmp_path, keys, upstream, header_timeout_s=0.5, keepalive_timeout_s=30)
    sock = await open_raw(port_of(gw))
    try:
        auth = keys.auth()["Authorization"]
        whole = f"GET /v2/models/digits/ready HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n".encode()
        started = time.monotonic()
        await send(sock, whole + b"GET /v2 HTTP/1.1\r\nHo")
        answer, closed = await until_closed(sock, 5)
        assert closed and 0.4 <= time.monotonic() - started < 1.5
        first, _, rest = answer.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b" 408 Request Timeout\r\n" in rest
    finally:
        sock.close()
        await gw.stop()


async def test_the_head_deadline_never_applies_to_bodies_or_slow_answers(tmp_path: Path, keys: Keys) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.8)  # the thing under test: an answer slower than the head deadline
        return web.json_response({"outputs": []})

    up = await start_upstream(slow)
    gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                             server={"header_timeout_s": 0.3, "body_timeout_s": 5})
    sock = await open_raw(port_of(gw))
    try:
        request = infer(keys)
        head_end = request.index(b"\r\n\r\n") + 4
        await send(sock, request[:head_end])
        for i in range(head_end, len(request), 25):  # a body trickling in for longer than the head deadline
            await asyncio.sleep(0.2)  # the thing under test: a trickling body
            await send(sock, request[i:i + 25])
        assert (await exchange(sock, b""))[0] == 200  # and an answer slower than it
        chunked_head = request[:head_end - 2].replace(b"Content-Length: %d\r\n" % len(BODY),
                                                      b"Transfer-Encoding: chunked\r\n")
        chunked = chunked_head + b"\r\n" + b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"
        assert (await exchange(sock, chunked))[0] == 200  # a chunked body, ended exactly at the read's end
        started = time.monotonic()
        await send(sock, chunked + b"POST /v2")  # then one followed by half a head: that head has a deadline
        answer, closed = await until_closed(sock, 5)
        assert closed and time.monotonic() - started < 0.8 + 0.3 + 1.0
        assert answer.startswith(b"HTTP/1.1 200") and b" 408 Request Timeout\r\n" in answer
    finally:
        sock.close()
        await gw.stop()
        await up.stop()


def padded_head(total: int, *, finished: bool) -> bytes:
    head = b"GET /v2 HTTP/1.1\r\nHost: x\r\n"
    i = 0
    while len(head) < total:
        head += b"X-Pad-%d: %s\r\n" % (i, b"a" * 2000)
        i += 1
    return head + (b"\r\n" if finished else b"")


@pytest.mark.parametrize("finished", [False, True], ids=["arriving", "whole"])
async def test_a_200_kb_head_is_431_and_closed(tmp_path: Path, keys: Keys, upstream: Any, finished: bool) -> None:
    gw = await gateway(tmp_path, keys, upstream)
    sock = await open_raw(port_of(gw))
    try:
        head = padded_head(200_000, finished=finished)
        if finished:
            await send(sock, head)  # whole: may be parsed in one read, then the parsed head is measured
        else:
            await send(sock, head[:100_000])  # arriving: refused as the bytes pass the cap, before the head ends
        answer, closed = await until_closed(sock, 5)
        assert closed
        status, error = error_of(answer)
        assert status == 431 and error["type"] == "request_header_fields_too_large"
        assert error["request_id"] and f"x-request-id: {error['request_id']}".encode() in answer.lower()
        assert gw.running.connections.heads_too_large == 1
        assert upstream.seen == []
    finally:
        sock.close()
        await gw.stop()


async def test_one_long_header_within_the_total_still_reaches_the_app(tmp_path: Path, keys: Keys,
                                                                      upstream: Any) -> None:
    """A 30 KB bearer token is the app's 401, as before; three such headers (90 KB) are over the 64 KB total."""
    gw = await gateway(tmp_path, keys, upstream)
    sock = await open_raw(port_of(gw))
    try:
        token = "x" * 30_000
        request = (f"POST {V2_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY
        status, body = await exchange(sock, request)
        assert status == 401 and orjson.loads(body)["error"]["type"] == "unauthenticated"
        big = b"".join(b"X-Big-%d: %s\r\n" % (i, b"b" * 30_000) for i in range(3))
        three = b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + big
        answer, closed = await until_closed_after_send(sock, three + b"\r\n")
        assert closed and error_of(answer)[0] == 431
    finally:
        sock.close()
        await gw.stop()


async def until_closed_after_send(sock: socket.socket, data: bytes) -> tuple[bytes, bool]:
    try:
        await send(sock, data)
    except OSError:
        pass  # the server may refuse before taking everything
    return await until_closed(sock, 5)


async def test_aiohttp_header_limits_are_431_too(tmp_path: Path, keys: Keys, upstream: Any) -> None:
    """Over 128 headers (aiohttp's own limit) is a header problem, answered like the total cap."""
    gw = await gateway(tmp_path, keys, upstream)
    sock = await open_raw(port_of(gw))
    try:
        many = b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n"
        answer, closed = await until_closed_after_send(sock, many)
        assert closed
        status, error = error_of(answer)
        assert status == 431 and error["type"] == "request_header_fields_too_large"
    finally:
        sock.close()
        await gw.stop()


# -- connections -----------------------------------------------------------------------

async def test_per_ip_cap_closes_the_extra_connection_at_once(tmp_path: Path, keys: Keys, upstream: Any) -> None:
    gw = await gateway(tmp_path, keys, upstream, max_connections_per_ip=2, max_connections=100)
    counter = gw.running.connections
    port = port_of(gw)
    held = [await open_raw(port), await open_raw(port)]
    extra: list[socket.socket] = []
    try:
        for s in held:
            assert (await exchange(s, infer(keys)))[0] == 200
        third = await open_raw(port)
        extra.append(third)
        answer, closed = await until_closed_after_send(third, infer(keys))
        assert closed and answer == b""  # closed before anything was read: no answer at all
        other = await open_raw(port, source="127.0.0.2")  # another address has its own allowance
        extra.append(other)
        assert (await exchange(other, infer(keys)))[0] == 200
        assert counter.refused == 1 and counter.per_ip == {"127.0.0.1": 2, "127.0.0.2": 1}

        held.pop().close()
        await wait_for(lambda: counter.per_ip.get("127.0.0.1") == 1)
        fresh = await open_raw(port)
        extra.append(fresh)
        assert (await exchange(fresh, infer(keys)))[0] == 200
        assert (await exchange(held[0], infer(keys)))[0] == 200  # the existing one still works
    finally:
        for s in held + extra:
            s.close()
        await gw.stop()


async def test_per_process_cap_closes_the_extra_connection_at_once(tmp_path: Path, keys: Keys,
                                                                   upstream: Any) -> None:
    gw = await gateway(tmp_path, keys, upstream, max_connections=2, max_connections_per_ip=100)
    counter = gw.running.connections
    port = port_of(gw)
    held = [await open_raw(port), await open_raw(port, source="127.0.0.2")]
    extra: list[socket.socket] = []
    try:
        for s in held:
            assert (await exchange(s, infer(keys)))[0] == 200
        for source in ("127.0.0.1", "127.0.0.3"):
            sock = await open_raw(port, source=source)
            extra.append(sock)
            answer, closed = await until_closed_after_send(sock, infer(keys))
            assert closed and answer == b"", source
        assert counter.refused == 2 and counter.total == 2

        held.pop(0).close()
        await wait_for(lambda: counter.total == 1)
        fresh = await open_raw(port)
        extra.append(fresh)
        assert (await exchange(fresh, infer(keys)))[0] == 200
        assert (await exchange(held[0], infer(keys)))[0] == 200
    finally:
        for s in held + extra:
            s.close()
        await gw.stop()
    assert counter.total == 0 and counter.per_ip == {}


async def test_idle_keep_alive_connection_is_closed(tmp_path: Path, keys: Keys, upstream: Any) -> None:
    gw = await gateway(tmp_path, keys, upstream, keepalive_timeout_s=0.5, header_timeout_s=10)
    used, silent = await open_raw(port_of(gw)), await open_raw(port_of(gw))
    try:
        assert (await exchange(used, infer(keys)))[0] == 200
        started = time.monotonic()
        for sock in (used, silent):  # after an answer, and a connection that never sent a byte
            answer, closed = await until_closed(sock, 5)
            assert closed and answer == b""
        assert time.monotonic() - started < 1.5
        await wait_for(lambda: gw.running.connections.total == 0)
    finally:
        used.close()
        silent.close()
        await gw.stop()


# -- the write deadline ------------------------------------------------------------------

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

    up = await start_upstream(large)
    gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                             server={"client_write_timeout_s": 1})
    sock = await open_raw(port_of(gw), rcvbuf=4096)
    try:
        started = time.monotonic()
        await send(sock, infer(keys))
        await wait_for(lambda: gw.running.connections.write_timeouts == 1, timeout=10)
        assert time.monotonic() - started >= 1.0
        data, closed = await until_closed(sock, 5)
        assert closed and len(data) < len(big)  # cut: the rest of the answer was never going to be taken
        await wait_for(lambda: gw.running.connections.total == 0)
        assert await served(gw.url, keys) == 200
    finally:
        sock.close()
        await gw.stop()
        await up.stop()


async def test_a_slow_reader_that_keeps_taking_is_not_dropped(tmp_path: Path, keys: Keys) -> None:
    big = b'{"outputs": [], "pad": "' + b"p" * 6_000_000 + b'"}'

    async def large(request: web.Request) -> web.Response:
        return web.Response(body=big, content_type="application/json")

    up = await start_upstream(large)
    gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                             server={"client_write_timeout_s": 0.5})
    sock = await open_raw(port_of(gw), rcvbuf=4096)
    loop = asyncio.get_running_loop()
    try:
        await send(sock, infer(keys))
        await asyncio.sleep(0.3)  # the thing under test: a client that reads nothing for a while (buffers fill)
        received = 0
        started = time.monotonic()
        while time.monotonic() - started < 2.0:  # a little at a time, each gap shorter than the deadline
            received += len(await asyncio.wait_for(loop.sock_recv(sock, 256 * 1024), 5))
            await asyncio.sleep(0.2)  # the thing under test: a slow reader, each gap shorter than the deadline
        assert gw.running.connections.write_timeouts == 0
        while received < len(big):  # then at full speed: the whole answer arrives
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5)
            assert chunk, "closed mid-answer"
            received += len(chunk)
    finally:
        sock.close()
        await gw.stop()
        await up.stop()


# -- over TLS ----------------------------------------------------------------------------

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
    up = await start_upstream()
    cert, key = self_signed(tmp_path, "server", host="localhost")
    gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                             server={"header_timeout_s": 0.5,
                                     "tls": {"cert_file": str(cert), "key_file": str(key)}})
    try:
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
    finally:
        await gw.stop()
        await up.stop()
