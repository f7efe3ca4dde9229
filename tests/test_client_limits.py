"""Client-side limits on the request side (``server.*``): head deadline, head size, connection caps, keep-alive.

Every test talks to a real gateway over real loopback sockets, with raw
non-blocking sockets where the point is a client that misbehaves (sends half a
head, drips bytes). Limits are short so each test takes seconds.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.config import ServerConfig, load_config
from gateway.errors import ConfigError
from tests import harness
from tests.harness import (ALLOW_ANALYSTS, error_fields, Keys, gateway_config, start_gateway, start_upstream,
                     v2_model, write_yaml)
from tests.client_limits_support import (  # noqa: F401  (fixtures and pytestmark are used by pytest)
    BODY,
    V2_PATH,
    error_of,
    event_loop_policy,
    exchange,
    gateway,
    infer,
    open_raw,
    padded_head,
    port_of,
    pytestmark,
    raw_socket,
    send,
    served,
    until_closed,
    until_closed_after_send,
    upstream,
    wait_for)


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


async def test_half_sent_heads_are_closed_within_the_deadline_while_a_real_client_is_served(
        tmp_path: Path, keys: Keys, upstream: Any) -> None:
    # 1.5 s, not 0.5 s: on a loaded 2-core box serving the real client can take longer than 0.5 s, and the
    # half-sent heads must still be held while it is served
    gw = await gateway(tmp_path, keys, upstream, header_timeout_s=1.5, keepalive_timeout_s=30)
    counter = gw.running.connections
    socks: list[socket.socket] = []
    try:
        socks = list(await asyncio.gather(*(open_raw(port_of(gw)) for _ in range(400))))
        sent_at = time.monotonic()
        await asyncio.gather(*(send(s, b"POST / HTTP/1.1\r\nHost: x\r\n") for s in socks))
        await wait_for(lambda: counter.total >= 400)
        assert await served(gw.url, keys) == 200  # served while the 400 are held

        async def closed_after(sock: socket.socket) -> tuple[float, bytes, bool]:
            answer, closed = await until_closed(sock, 5)
            return time.monotonic() - sent_at, answer, closed

        results = await asyncio.gather(*(closed_after(s) for s in socks))
        assert all(closed for _, _, closed in results)
        slowest = max(t for t, _, _ in results)
        assert slowest < 1.5 + 1.5, slowest  # the deadline, plus scheduling slack for 400 sockets on a busy box
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
    async with (harness.stopping(await gateway(tmp_path, keys, upstream, header_timeout_s=0.5,
                                               keepalive_timeout_s=30)) as gw,
                raw_socket(port_of(gw)) as sock):
        dripped = 0

        async def drip() -> None:
            nonlocal dripped
            for byte in b"X-Slow: " + b"a" * 200:
                try:
                    await send(sock, bytes([byte]))
                except OSError:
                    return
                dripped += 1
                await asyncio.sleep(0.1)  # real socket vs the server's real head deadline: a head dripped byte by byte

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


async def test_keep_alive_connections_next_head_has_its_own_deadline(tmp_path: Path, keys: Keys, upstream: Any) -> None:
    async with (harness.stopping(await gateway(tmp_path, keys, upstream, header_timeout_s=0.5, keepalive_timeout_s=30)) as gw,
                raw_socket(port_of(gw)) as sock):
        for _ in range(3):  # well-behaved requests on one connection, spread over more than one deadline
            assert (await exchange(sock, infer(keys)))[0] == 200
            await asyncio.sleep(0.3)  # real socket idle past the server's real deadline (gaps add up past it)
        started = time.monotonic()
        await send(sock, b"GET /v2 HTTP/1.1\r\nHost: x\r\n")  # then half a head on the same connection
        answer, closed = await until_closed(sock, 5)
        assert closed and 0.4 <= time.monotonic() - started < 1.5
        assert error_of(answer)[0] == 408


async def test_a_head_split_across_reads_within_the_deadline_is_served(tmp_path: Path, keys: Keys,
                                                                       upstream: Any) -> None:
    async with (harness.stopping(await gateway(tmp_path, keys, upstream, header_timeout_s=1)) as gw,
                raw_socket(port_of(gw)) as sock):
        request = infer(keys)
        for i in range(0, 300, 60):
            await send(sock, request[i:i + 60])
            await asyncio.sleep(0.05)  # real socket, real deadline: a head in slow pieces, within it
        assert (await exchange(sock, request[300:]))[0] == 200
        # pipelined: a whole request and the start of the next in one write; the rest arrives in time
        # (after a Content-Length body the next head's clock starts with its next read: see the module)
        await send(sock, request + request[:50])
        await asyncio.sleep(0.3)  # real socket, real deadline: the rest of the next head comes late, yet in time
        status, _ = await exchange(sock, b"")
        assert status == 200
        assert (await exchange(sock, request[50:]))[0] == 200
        assert gw.running.connections.head_timeouts == 0


async def test_half_a_head_pipelined_behind_a_request_gets_the_deadline(tmp_path: Path, keys: Keys,
                                                                        upstream: Any) -> None:
    async with (harness.stopping(await gateway(tmp_path, keys, upstream, header_timeout_s=0.5, keepalive_timeout_s=30)) as gw,
                raw_socket(port_of(gw)) as sock):
        auth = keys.auth()["Authorization"]
        whole = f"GET /v2/models/digits/ready HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n".encode()
        started = time.monotonic()
        await send(sock, whole + b"GET /v2 HTTP/1.1\r\nHo")
        answer, closed = await until_closed(sock, 5)
        assert closed and 0.4 <= time.monotonic() - started < 1.5
        first, _, rest = answer.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200"), answer[:200]
        assert b" 408 Request Timeout\r\n" in rest


async def test_the_head_deadline_never_applies_to_bodies_or_slow_answers(tmp_path: Path, keys: Keys) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.8)  # a real upstream slower than the server's real head deadline
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
            await asyncio.sleep(0.2)  # real socket: a body trickling past the server's real head deadline
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


@pytest.mark.parametrize("finished", [False, True], ids=["arriving", "whole"])
async def test_a_200_kb_head_is_431_and_closed(tmp_path: Path, keys: Keys, upstream: Any, finished: bool) -> None:
    async with (harness.stopping(await gateway(tmp_path, keys, upstream)) as gw,
                raw_socket(port_of(gw)) as sock):
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


async def test_one_long_header_within_the_total_still_reaches_the_app(tmp_path: Path, keys: Keys,
                                                                      upstream: Any) -> None:
    """A 30 KB bearer token is the app's 401, as before; three such headers (90 KB) are over the 64 KB total."""
    async with (harness.stopping(await gateway(tmp_path, keys, upstream)) as gw,
                raw_socket(port_of(gw)) as sock):
        token = "x" * 30_000
        request = (f"POST {V2_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n").encode() + BODY
        status, body = await exchange(sock, request)
        assert status == 401 and error_fields(body)["type"] == "unauthenticated"
        big = b"".join(b"X-Big-%d: %s\r\n" % (i, b"b" * 30_000) for i in range(3))
        three = b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + big
        answer, closed = await until_closed_after_send(sock, three + b"\r\n")
        assert closed and error_of(answer)[0] == 431


async def test_too_many_header_lines_are_431_too(tmp_path: Path, keys: Keys, upstream: Any) -> None:
    """Over 128 header lines (``http_connection.MAX_HEADERS``) is a header problem, answered like the total cap."""
    async with (harness.stopping(await gateway(tmp_path, keys, upstream)) as gw,
                raw_socket(port_of(gw)) as sock):
        many = b"GET /v2 HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n"
        answer, closed = await until_closed_after_send(sock, many)
        assert closed
        status, error = error_of(answer)
        assert status == 431 and error["type"] == "request_header_fields_too_large"


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


