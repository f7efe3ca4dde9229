"""Requests that reach the quota store together go to Redis together.

Requests arriving in the same event-loop turn share one ``EVALSHA`` of each
script (the scripts loop over their requests, each handled exactly as if
alone, and the whole batch is atomic). Nothing waits for a batch to fill, so
an idle gateway's latency is one round trip; under load the client-side cost
per request drops several times over (one command to encode, send and parse
instead of many). At most ``MAX_IN_FLIGHT`` batches are out at once: past
that, new requests join the next batch, sent as soon as one returns (and a
request that waited out its whole deadline there fails like a timeout).

Slots are never leaked by a failure on our side: the batch, not the request,
owns each Redis call, so a request cancelled while its call is in flight has
its slot freed when the answer comes back, and a call whose outcome is
unknown (timeout, connection lost) is put on the store's repair list, which
the store drains once Redis answers again.

Kept apart from ``redis_store`` because it is a scheduling idea (queue,
in-flight cap, settling futures) with no Redis in it: the store hands it a
function that sends a list of script calls under a deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from .redis_scripts import ACQUIRE, RELEASE, Requests, Script, integers
from .store import StoreError

log = logging.getLogger("maas.quota")

MAX_BATCH = 256  # requests per script call (the script blocks Redis ~10 us per request)
MAX_IN_FLIGHT = 8  # batches awaiting Redis at once; more requests wait for the next batch (and grow it)

Commands = list[tuple[Script, Requests]]
# Sends script calls within a timeout (seconds): one reply or error per call; StoreError when Redis fails.
Exchange = Callable[[Commands, float], Awaitable[list[Any]]]


@dataclass(slots=True)
class _Call:
    """One request's operation, waiting for the current batch to be sent."""

    script: Script  # ACQUIRE or RELEASE
    keys: tuple[str, ...]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    slot: tuple[str, str] | None  # (slots key, slot id) this call takes or frees, for leak repair
    deadline: float  # time.monotonic() by which the answer must be in


class Batcher:
    """Queues script calls, sends them in batches, and settles each request's future.

    ``repairs`` is the store's list of slots whose release is owed to Redis;
    ``late`` is called when calls waited a whole timeout for a batch slot, and
    answers the error they fail with (the store records the failure).
    """

    def __init__(self, exchange: Exchange, repairs: deque[tuple[str, str]], *, timeout_s: float,
                 batch_max: int, late: Callable[[], StoreError]) -> None:
        self._exchange = exchange
        self._repairs = repairs
        self._timeout = timeout_s
        self._batch_max = batch_max
        self._late = late
        self._queue: list[_Call] = []
        self._batches: set[asyncio.Task[None]] = set()

    async def submit(self, script: Script, keys: tuple[str, ...], args: tuple[Any, ...],
                     slot: tuple[str, str] | None) -> Any:
        """The script's reply for this one request (a list of integers), sent with whatever else is queued."""
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, loop.create_future(), slot, time.monotonic() + self._timeout)
        self._queue.append(call)
        if len(self._queue) == 1 and len(self._batches) < MAX_IN_FLIGHT:
            loop.call_soon(self._flush)
        try:
            return await call.future
        except asyncio.CancelledError:
            # Cancelled after the answer arrived but before this request could use it:
            # nobody will release a slot it was given, so give it back now.
            future = call.future
            if (slot is not None and script is ACQUIRE and future.done() and not future.cancelled()
                    and future.exception() is None and future.result()[0] == 1):
                self._repairs.append(slot)
            raise

    async def drain(self) -> None:
        """Wait (bounded) for the batches in flight, so closing the client does not cut them off."""
        if self._batches:
            await asyncio.wait(list(self._batches), timeout=self._timeout * 2)

    def _flush(self) -> None:
        """Send what is queued, unless MAX_IN_FLIGHT batches are out (then the next answer sends it)."""
        if not self._queue or len(self._batches) >= MAX_IN_FLIGHT:
            return
        batch, self._queue = self._queue, []
        now = time.monotonic()
        late = [c for c in batch if c.deadline <= now]
        if late:  # waited a whole timeout for a batch slot: Redis is too slow; never send them
            error = self._late()
            for call in late:
                if call.slot is not None and call.script is RELEASE:
                    self._repairs.append(call.slot)
                if not call.future.done():
                    call.future.set_exception(StoreError(str(error)))
            batch = [c for c in batch if c.deadline > now]
            if not batch:
                return
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._batches.add(task)
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._batches.discard(task)
        if self._queue:
            self._flush()

    async def _run(self, batch: list[_Call]) -> None:
        try:
            await self._settle(batch)
        except BaseException as exc:  # never leave a request waiting on a future nobody will resolve
            log.exception("quota batch failed unexpectedly")
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(StoreError(f"{type(exc).__name__}: {exc}"))
            if not isinstance(exc, Exception):
                raise

    async def _settle(self, batch: list[_Call]) -> None:
        commands: list[tuple[Script, list[_Call]]] = []
        for script in (ACQUIRE, RELEASE):
            calls = [c for c in batch if c.script is script]
            for i in range(0, len(calls), self._batch_max):
                commands.append((script, calls[i:i + self._batch_max]))
        deadline = min(c.deadline for c in batch)
        try:
            replies = await self._exchange([(s, [(c.keys, c.args) for c in cs]) for s, cs in commands],
                                           max(0.001, deadline - time.monotonic()))
        except StoreError as exc:
            for call in batch:
                if call.slot is not None:  # outcome unknown: the slot may be taken; free it later
                    self._repairs.append(call.slot)
                if not call.future.done():
                    call.future.set_exception(StoreError(str(exc)))
            return
        for (script, calls), reply in zip(commands, replies):
            width = 5 if script is ACQUIRE else 1
            values = [] if isinstance(reply, BaseException) else integers(reply)
            for i, call in enumerate(calls):
                if isinstance(reply, BaseException):
                    if call.slot is not None:
                        self._repairs.append(call.slot)
                    if not call.future.done():
                        call.future.set_exception(StoreError(f"{type(reply).__name__}: {reply}"))
                    continue
                result = values[i * width:(i + 1) * width]
                if not call.future.done():
                    call.future.set_result(result)
                elif script is ACQUIRE and call.slot is not None and result[0] == 1:
                    self._repairs.append(call.slot)  # admitted, but the request is gone: give the slot back
