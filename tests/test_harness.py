"""The test helpers themselves: ports that cannot be handed out twice, waiting on a condition, the fake clock."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests import harness
from tests.clock import FakeClock
from tests.harness import eventually, free_port


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
    async with harness.upstream(port=port) as up:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()


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


async def test_fake_clock_wakes_sleepers_in_deadline_order_only_when_advanced() -> None:
    clock = FakeClock()
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.ensure_future(sleeper(n, s)) for n, s in (("late", 2.0), ("early", 1.0), ("now", 0))]
    await clock.settle()
    assert woke == ["now"] and clock.sleepers == 2  # a zero sleep is one loop turn; the others wait
    clock.advance(1.5)
    await clock.settle()
    assert woke == ["now", "early"] and clock() == 1_001.5
    clock.advance(0.5)  # exactly at the deadline: due
    await asyncio.gather(*tasks)
    assert woke == ["now", "early", "late"] and clock.sleepers == 0


async def test_fake_clock_timers_can_be_cancelled_and_cancelled_sleepers_leave_no_timer() -> None:
    clock = FakeClock()
    fired: list[int] = []
    clock.call_at(clock() + 1, fired.append, 1).cancel()
    clock.call_later(1, fired.append, 2)
    task = asyncio.ensure_future(clock.sleep(5))
    await clock.settle()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert clock.sleepers == 1  # only call_later's timer is left
    clock.advance(10)
    await clock.settle()
    assert fired == [2]
