"""The test helpers themselves: ports that cannot be handed out twice, and waiting on a condition."""

from __future__ import annotations

import asyncio
import socket

import pytest

from harness import eventually, free_port, start_upstream


def test_free_port_is_never_handed_out_twice_and_refuses_until_used() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    with pytest.raises(ConnectionRefusedError):  # held, not listening: a dead upstream stays dead
        socket.create_connection(("127.0.0.1", ports[0]), timeout=2).close()
    plain = socket.socket()
    try:
        with pytest.raises(OSError):  # no other program can take it
            plain.bind(("127.0.0.1", ports[0]))
    finally:
        plain.close()


async def test_a_server_can_still_listen_on_a_free_port() -> None:
    port = free_port()
    up = await start_upstream(port=port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        await up.stop()


async def test_eventually_returns_the_value_as_soon_as_it_holds() -> None:
    calls = []

    def predicate() -> int | None:
        calls.append(1)
        return 7 if len(calls) >= 3 else None

    assert await eventually(predicate, timeout=5, interval=0) == 7
    assert len(calls) == 3

    async def async_predicate() -> str:
        return "ok"

    assert await eventually(async_predicate) == "ok"


async def test_eventually_fails_with_the_message_after_the_timeout() -> None:
    with pytest.raises(AssertionError, match="within 0.05 s: still waiting"):
        await eventually(lambda: False, timeout=0.05, message=lambda: "still waiting")
