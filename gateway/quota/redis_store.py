"""Quota buckets in Redis, shared by every replica: one global limit across the fleet.

Each request is one run of ``acquire.lua`` (rate bucket, in-flight slot and
token reservation together, atomically, on Redis server time); a request that
holds a slot or a token reservation is one run of ``release.lua`` when it
ends. Requests arriving together share one ``EVALSHA`` (see ``RedisStore``),
and a busy rate-only bucket lends each replica a small allowance so most of
its requests need no round trip at all (see ``lease_size`` for the bound).
The scripts ship as package files, are loaded with ``SCRIPT LOAD`` and called
by SHA (``redis_scripts``); after a Redis restart or ``SCRIPT FLUSH`` the
``NOSCRIPT`` reply makes us load them again and retry.

A slot expires ``slot_ttl_s`` after it was last written, so a crashed
replica's slots free themselves; the slots of requests still running are
pushed forward every TTL/3 by one ``LiveSlots`` task (``refresh.lua``), so a
stream of any length keeps its slot.

A hung Redis must never hang a request (the failure that stalls other
gateways when Redis is SIGSTOPped or behind a dead network path): every call
is bounded by ``quota.timeout_ms`` with ``asyncio.timeout`` on top of
redis-py's own socket timeouts, and any failure becomes ``StoreError`` for the
stage to answer per ``on_store_error``. There is no circuit that stays open:
after two failures in a row calls fail fast for ``BACKOFF_S`` only, and a
background PING every ``HEALTH_INTERVAL_S`` keeps ``ready()`` and
``maas_quota_store_up`` current, so a Redis that comes back is used again
within a fraction of a second, without a restart.

URLs and credentials: see ``redis_connect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..redact import redact_text
from .live_slots import LiveSlots, Snapshot
from .redis_connect import connect, redact
from .redis_lease import LEASE_WINDOW_S, Leases, lease_size  # noqa: F401 - LEASE_WINDOW_S, lease_size: re-exported
from .redis_scripts import ACQUIRE, RELEASE, SCRIPTS, Requests, Script, command_args, integers, refresh_commands
from .store import SLOT_TTL_S, Limits, StoreError, Verdict

if TYPE_CHECKING:
    from ..config import QuotaConfig
    from ..metrics import Metrics

log = logging.getLogger("maas.quota")

BACKOFF_S = 0.2  # after 2+ failures in a row, fail fast this long before trying Redis again
HEALTH_INTERVAL_S = 1.0  # background PING period (readiness, maas_quota_store_up, slot repairs)
MAX_REPAIRS = 100_000  # slot releases owed to Redis while it is unreachable
MAX_BATCH = 256  # requests per script call (the script blocks Redis ~10 us per request)
MAX_IN_FLIGHT = 8  # batches awaiting Redis at once; more requests wait for the next batch (and grow it)
REFRESH_BATCH = 1000  # slots per refresh.lua call (all calls of one refresh share one pipeline)


@dataclass(slots=True)
class _Call:
    """One request's operation, waiting for the current batch to be sent."""

    script: Script  # ACQUIRE or RELEASE
    keys: tuple[str, ...]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    slot: tuple[str, str] | None  # (slots key, slot id) this call takes or frees, for leak repair
    deadline: float  # time.monotonic() by which the answer must be in


class RedisStore:
    """The shared store. Safe to use from many requests at once.

    Requests that reach the store in the same event-loop turn go to Redis
    together: one ``EVALSHA`` of each script carries all of them (the scripts
    loop over their requests, each handled exactly as if alone, and the whole
    batch is atomic). Nothing waits for a batch to fill, so an idle gateway's
    latency is one round trip; under load the client-side cost per request
    drops several times over (one command to encode, send and parse instead of
    many). At most ``MAX_IN_FLIGHT`` batches are out at once: past that, new
    requests join the next batch, sent as soon as one returns (and a request
    that waited out its whole deadline there fails like a timeout).

    Slots are never leaked by a failure on our side: the batch, not the
    request, owns each Redis call, so a request cancelled while its call is in
    flight has its slot freed when the answer comes back, and a call whose
    outcome is unknown (timeout, connection lost) has its slot freed once Redis
    answers again (the health loop drains these repairs).
    """

    def __init__(self, config: QuotaConfig, metrics: Metrics | None = None, *, client: Any = None,
                 slot_ttl_s: float = SLOT_TTL_S) -> None:
        self._config = config
        self._slot_ttl_ms = str(max(1, int(slot_ttl_s * 1000)))
        self._live = LiveSlots(slot_ttl_s, self.refresh_slots)
        self._metrics = metrics
        self._timeout = config.timeout_ms / 1000
        self._prefix = config.key_prefix
        self._client = client if client is not None else connect(config)
        # Redis Cluster: one request per script call (its keys share one slot; a batch's would not).
        self._batch_max = 1 if isinstance(self._client, RedisCluster) else MAX_BATCH
        self._queue: list[_Call] = []
        self._batches: set[asyncio.Task[None]] = set()
        self._repairs: deque[tuple[str, str]] = deque(maxlen=MAX_REPAIRS)
        self._limit_args: dict[Limits, str] = {}
        self._keys: dict[str, tuple[str, str, str]] = {}
        self._leases = Leases()  # this replica's unspent allowances of busy rate-only buckets
        self._failures = 0  # consecutive
        self._fail_fast_until = 0.0
        self._last_error: str | None = "not checked yet"
        self._health: asyncio.Task[None] | None = None
        self._closing = False
        self._set_up(False)

    # ---- lifecycle

    async def start(self) -> None:
        """Load the scripts and start the health check. A Redis that is down now is not fatal:
        requests are answered per ``on_store_error`` and readiness says why."""
        with contextlib.suppress(StoreError):
            await self._call(self._load_scripts)
        if self._health is None:
            self._health = asyncio.create_task(self._health_loop(), name="quota-store-health")
        self._live.start()

    async def close(self) -> None:
        self._closing = True
        await self._live.close()
        if self._health is not None:
            # The flag, not only the cancel, ends the loop: on Python 3.11 a
            # cancellation that lands in redis-py's send (asyncio.wait_for under
            # socket_timeout) can be swallowed, and close() must never hang.
            self._health.cancel()
            await asyncio.wait([self._health], timeout=HEALTH_INTERVAL_S + self._timeout + 0.5)
            self._health = None
        if self._batches:
            await asyncio.wait(list(self._batches), timeout=self._timeout * 2)
        with contextlib.suppress(Exception):
            await self._client.aclose()

    def ready(self) -> str | None:
        if self._last_error is None:
            return None
        return f"quota store {redact(self._config.store)} unreachable: {self._last_error}"

    async def ping(self) -> None:
        """One bounded PING; raises ``StoreError``. Also what the health loop runs."""
        await self._call(self._client.ping)

    # ---- the two operations

    def keys(self, bucket: str) -> tuple[str, str, str]:
        """Rate bucket, in-flight slots, token budget: one hash tag, so one Cluster slot."""
        keys = self._keys.get(bucket)
        if keys is None:
            if len(self._keys) >= 100_000:
                self._keys.clear()
            p = self._prefix
            keys = self._keys[bucket] = (f"{p}tb:{{{bucket}}}", f"{p}cc:{{{bucket}}}", f"{p}tk:{{{bucket}}}")
        return keys

    async def acquire(self, bucket: str, limits: Limits, slot: str, cost: int) -> Verdict:
        want = 1
        if limits.rate_per_s and not limits.needs_release:
            verdict, want = self._leases.spend(bucket, limits)
            if verdict is not None:  # admitted from this replica's allowance: no round trip
                return verdict
        keys = self.keys(bucket)
        wire = self._limit_args.get(limits)
        if wire is None:
            if len(self._limit_args) > 10_000:
                self._limit_args.clear()
            wire = self._limit_args[limits] = (f"{limits.rate_per_s!r} {limits.burst} {limits.max_concurrent} "
                                               f"{limits.tokens_per_minute}")
        if want > 1:
            self._leases.asking(bucket)
            try:
                r = await self._submit(ACQUIRE, keys, (wire, slot, cost, want), None)
            finally:
                self._leases.done(bucket)
            verdict = self._leases.grant(bucket, r)
            if verdict is not None:
                return verdict
        else:
            r = await self._submit(ACQUIRE, keys, (wire, slot, cost, 1),
                                   (keys[1], slot) if limits.max_concurrent else None)
            if r[0] >= 1 and limits.max_concurrent:
                self._live.add(keys[1], slot)  # kept alive until released (see LiveSlots)
        return Verdict.from_ms(r[0] >= 1, r[1], r[2], r[3], r[4])

    async def release(self, bucket: str, limits: Limits, slot: str, refund: int) -> None:
        keys = self.keys(bucket)
        held = slot if limits.max_concurrent else ""
        if held:
            self._live.discard(keys[1], slot)  # even if the release fails: a repair or the TTL frees it
        await self._submit(RELEASE, (keys[1], keys[2]), (held, limits.tokens_per_minute, refund),
                           (keys[1], slot) if held else None)

    async def refresh_slots(self, live: Snapshot) -> None:
        """Push the expiry of every slot in ``live`` to now + TTL; slots already released stay released.

        All of it is one round trip: ``REFRESH_BATCH`` slots per script call,
        the calls pipelined (Cluster: one call per key, each to its node).
        """
        commands = refresh_commands(live, per_call=REFRESH_BATCH, one_key_per_call=self._batch_max == 1)
        step = max(1, len(commands)) if self._batch_max > 1 else 16  # Cluster: 16 single-key calls at a time
        for i in range(0, len(commands), step):
            chunk = commands[i:i + step]
            replies = await self._call(functools.partial(self._send, chunk), timeout=max(self._timeout, 1.0))
            failed = next((r for r in replies if isinstance(r, BaseException)), None)
            if failed is not None:
                raise StoreError(f"{type(failed).__name__}: {failed}")

    def live_slots(self) -> int:
        """Slots this replica holds for requests still running (kept alive by the refresher)."""
        return len(self._live)

    def pending_repairs(self) -> int:
        """Slots whose release is owed to Redis (freed once it answers again)."""
        return len(self._repairs)

    # ---- batching

    async def _submit(self, script: Script, keys: tuple[str, ...], args: tuple[Any, ...],
                      slot: tuple[str, str] | None) -> Any:
        if self._failures >= 2 and time.monotonic() < self._fail_fast_until:
            if slot is not None and script is RELEASE:
                self._repairs.append(slot)
            raise StoreError(self._last_error or "quota store unavailable")
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

    def _flush(self) -> None:
        """Send what is queued, unless MAX_IN_FLIGHT batches are out (then the next answer sends it)."""
        if not self._queue or len(self._batches) >= MAX_IN_FLIGHT:
            return
        batch, self._queue = self._queue, []
        now = time.monotonic()
        late = [c for c in batch if c.deadline <= now]
        if late:  # waited a whole timeout for a batch slot: Redis is too slow; never send them
            self._failed(f"no answer within {self._config.timeout_ms} ms")
            for call in late:
                if call.slot is not None and call.script is RELEASE:
                    self._repairs.append(call.slot)
                if not call.future.done():
                    call.future.set_exception(StoreError(self._last_error or "timeout"))
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
            replies = await self._call(lambda: self._send([(s, [(c.keys, c.args) for c in cs]) for s, cs in commands]),
                                       timeout=max(0.001, deadline - time.monotonic()))
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

    async def _send(self, commands: list[tuple[Script, Requests]]) -> list[Any]:
        """One reply (or ResponseError) per script call; connection failures raise."""
        ttl = self._slot_ttl_ms
        wire = [(script, command_args(script, requests, ttl)) for script, requests in commands]
        if len(wire) == 1:
            script, (nkeys, args) = wire[0]
            try:
                return [await self._evalsha(script, nkeys, args)]
            except ResponseError as exc:
                return [exc]
        if self._batch_max == 1:  # Cluster: each command to its own node, concurrently
            replies = list(await asyncio.gather(*(self._evalsha(s, n, a) for s, (n, a) in wire),
                                                return_exceptions=True))
            for r in replies:
                if isinstance(r, BaseException) and not isinstance(r, ResponseError):
                    raise r
            return replies
        replies = await self._pipeline(wire)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:  # Redis restarted, failed over, or someone ran SCRIPT FLUSH
            await self._load_scripts()
            again = await self._pipeline([wire[i] for i in missing])
            for i, r in zip(missing, again):
                replies[i] = r
        return replies

    async def _pipeline(self, wire: list[tuple[Script, tuple[int, list[Any]]]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for script, (nkeys, args) in wire:
            pipe.evalsha(script.sha, nkeys, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def _evalsha(self, script: Script, nkeys: int, args: list[Any]) -> Any:
        try:
            return await self._client.evalsha(script.sha, nkeys, *args)
        except NoScriptError:  # Redis restarted, failed over, or someone ran SCRIPT FLUSH
            await self._client.script_load(script.source)
            return await self._client.evalsha(script.sha, nkeys, *args)

    async def _load_scripts(self) -> None:
        if self._batch_max == 1:  # Cluster: each SCRIPT LOAD goes to every primary
            for script in SCRIPTS:
                await self._client.script_load(script.source)
            return
        pipe = self._client.pipeline(transaction=False)  # all of them in one round trip
        for script in SCRIPTS:
            pipe.script_load(script.source)
        await pipe.execute()

    async def _repair(self) -> None:
        """Free slots whose release is owed (requests that failed or vanished mid-call), in batches."""
        size = MAX_BATCH if self._batch_max > 1 else 16  # Cluster: 16 single calls at a time
        while self._repairs:
            todo = [self._repairs.popleft() for _ in range(min(len(self._repairs), size))]
            requests: Requests = [((key, key), (slot, 0, 0)) for key, slot in todo]
            commands = [(RELEASE, requests)] if self._batch_max > 1 else [(RELEASE, [r]) for r in requests]
            try:
                replies = await self._call(lambda: self._send(commands))
            except StoreError:
                self._repairs.extend(todo)
                return
            if any(isinstance(r, BaseException) for r in replies):
                self._repairs.extend(todo)
                return

    # ---- deadlines and health

    async def _call(self, op: Any, *, timeout: float | None = None) -> Any:
        """Run one Redis operation under the deadline; any failure becomes ``StoreError``."""
        try:
            async with asyncio.timeout(self._timeout if timeout is None else timeout):
                result = await op()
        except TimeoutError as exc:
            self._failed(f"no answer within {self._config.timeout_ms} ms")
            raise StoreError(self._last_error or "timeout") from exc
        except (RedisError, OSError) as exc:
            self._failed(redact_text(f"{type(exc).__name__}: {exc}".strip()))  # a client error may quote the URL
            raise StoreError(self._last_error or "error") from exc
        if self._last_error is not None:
            self._recovered()
        return result

    def _failed(self, reason: str) -> None:
        self._failures += 1
        self._fail_fast_until = time.monotonic() + BACKOFF_S
        if self._last_error is None:
            log.warning("quota store %s failed: %s", redact(self._config.store), reason)
        self._last_error = reason
        self._set_up(False)

    def _recovered(self) -> None:
        if self._last_error != "not checked yet":
            log.warning("quota store %s answers again", redact(self._config.store))
        self._failures = 0
        self._last_error = None
        self._set_up(True)

    def _set_up(self, up: bool) -> None:
        if self._metrics is not None:
            self._metrics.quota_store_up.set(1 if up else 0)

    async def _health_loop(self) -> None:
        while not self._closing:
            try:
                await self.ping()
                if self._repairs:
                    await self._repair()
            except StoreError:
                pass
            await asyncio.sleep(HEALTH_INTERVAL_S)

