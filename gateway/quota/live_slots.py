"""The in-flight slots this process holds, kept alive for as long as their requests run.

A ``max_concurrent`` slot in Redis expires ``SLOT_TTL_S`` after it was last
written, so that a replica that crashes holding slots cannot lock its subjects
out for good. A request may legitimately outlive that TTL (a long stream), and
its slot must not expire under it, or one more concurrent request is admitted
every TTL. So the Redis store tracks the slots it handed out and not yet took
back, and one task per store pushes all of their expiries forward every TTL/3,
in one store call (not one task or one call per request: a request costs a set
insert and a set discard, nothing else). One missed refresh still leaves a
third of the TTL to spare; a failed refresh is retried soon, not a whole
interval later. The TTL then only matters for slots nobody refreshes: those of
a dead replica. (The memory store needs none of this: its slots have no TTL,
they live and die with the process.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from .store import StoreError

log = logging.getLogger("maas.quota")

Snapshot = dict[str, list[str]]  # slot-set key (or bucket) -> slot ids


class LiveSlots:
    """Slots held by requests still running, and the periodic task that refreshes them.

    ``refresh`` receives every live slot, grouped by key, and must only extend
    slots that still exist (a slot released while the call was on its way
    stays released). It raises ``StoreError`` when the store cannot answer.
    """

    __slots__ = ("_slots", "_count", "_refresh", "_interval", "_retry", "_task", "_closing", "_sleep")

    def __init__(self, ttl_s: float, refresh: Callable[[Snapshot], Awaitable[object]], *,
                 retry_s: float = 1.0, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._sleep = sleep  # the seam for tests: a fake clock's sleep instead of waiting out the interval
        self._slots: dict[str, set[str]] = {}
        self._count = 0
        self._refresh = refresh
        self._interval = ttl_s / 3
        self._retry = min(retry_s, self._interval)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def __len__(self) -> int:
        return self._count

    def add(self, key: str, slot: str) -> None:
        held = self._slots.get(key)
        if held is None:
            held = self._slots[key] = set()
        if slot not in held:
            held.add(slot)
            self._count += 1

    def discard(self, key: str, slot: str) -> None:
        held = self._slots.get(key)
        if held is not None and slot in held:
            held.remove(slot)
            self._count -= 1
            if not held:
                del self._slots[key]

    def snapshot(self) -> Snapshot:
        return {key: list(held) for key, held in self._slots.items()}

    def start(self) -> None:
        if self._task is None:
            self._closing = False
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="quota-slot-refresh")

    async def close(self) -> None:
        """Stop refreshing (slots still held then expire after the TTL, as a crashed replica's do)."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()  # the flag ends the loop too, should a cancellation be swallowed in a store call
            await asyncio.wait([task], timeout=5)

    async def _loop(self) -> None:
        delay = self._interval
        while not self._closing:
            await self._sleep(delay)
            delay = self._interval
            if not self._slots:
                continue
            try:
                await self._refresh(self.snapshot())
            except StoreError as exc:
                log.warning("quota slot refresh failed (%d live slots): %s", self._count, exc)
                delay = self._retry
            except Exception:  # noqa: BLE001 - a bug here must not stop the refreshes for good
                log.exception("quota slot refresh failed unexpectedly")
                delay = self._retry
