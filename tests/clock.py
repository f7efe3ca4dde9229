"""A clock that moves only when a test says so, for code that takes a ``clock`` (and ``sleep``/``call_at``) seam.

Production code reads ``time.monotonic`` (or the loop's clock) and sleeps with
``asyncio.sleep``; the classes that decide by time take those as arguments
(ejection in ``backends/http/upstreams.py``, JWKS refresh, quota leases and
slot refreshes, the memory store's buckets, the torch runner's batch delay).
A test hands them one ``FakeClock`` and calls ``advance(seconds)`` instead of
sleeping: no test waits for real time to pass, and none is flaky on a slow
machine because a timer fired late.

    clock = FakeClock()
    pool = UpstreamPool(..., clock=clock, sleep=clock.sleep)
    clock.advance(0.4)      # what was due by then runs on the next loop turns

Sleepers and timers due at or before the new time are woken in deadline order
through ``loop.call_soon``, as a real loop runs its timers: a test that needs
what they did awaits it (``eventually``, or ``await clock.settle()``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Any, Callable


class FakeTimer:
    """What ``call_at`` returns: cancellable, like ``asyncio.TimerHandle``."""

    __slots__ = ("_when", "callback", "args", "cancelled")

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self._when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def when(self) -> float:
        return self._when

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A monotonic clock (``clock()`` -> seconds) with ``sleep``, ``call_at`` and ``advance``."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start
        self._timers: list[tuple[float, int, FakeTimer]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        timer = FakeTimer(when, callback, args)
        heapq.heappush(self._timers, (when, next(self._order), timer))
        return timer

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        return self.call_at(self.now + delay, callback, *args)

    async def sleep(self, seconds: float) -> None:
        """Return once ``advance`` has moved the clock ``seconds`` on (at once for 0 or less, after a loop turn)."""
        if seconds <= 0:
            await asyncio.sleep(0)  # one loop turn, not a clock: asyncio.sleep(0) yields the same way
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        timer = self.call_at(self.now + seconds, _wake, future)
        try:
            await future
        finally:
            timer.cancel()

    @property
    def sleepers(self) -> int:
        """Timers and sleepers still waiting (for tests that check something is waiting on the clock)."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def advance(self, seconds: float) -> None:
        """Move the clock on and let every timer due by then fire (on the next loop turns, in deadline order)."""
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds
        loop = asyncio.get_running_loop()
        while self._timers and self._timers[0][0] <= self.now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                loop.call_soon(timer.callback, *timer.args)

    async def settle(self, turns: int = 10) -> None:
        """A few loop turns, not a clock: lets what ``advance`` woke run up to its next wait."""
        for _ in range(turns):
            await asyncio.sleep(0)  # one loop turn, not a clock


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
