"""Quota buckets in Redis, shared by every replica: one global limit across the fleet.

Each request is one run of ``acquire.lua`` (rate bucket, in-flight slot and
token reservation together, atomically, on Redis server time); a request that
holds a slot or a token reservation is one run of ``release.lua`` when it
ends. Requests arriving together share one ``EVALSHA`` (see ``redis_batch``),
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
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ..cache import ClearWhenFull
from ..redact import redact_text
from .live_slots import LiveSlots, Snapshot
from .redis_batch import MAX_BATCH, MAX_IN_FLIGHT, Batcher, Commands  # noqa: F401 - MAX_IN_FLIGHT: re-exported
from .redis_connect import connect, redact
from .redis_lease import LEASE_WINDOW_S, Leases, lease_size  # noqa: F401 - LEASE_WINDOW_S, lease_size: re-exported
from .redis_scripts import ACQUIRE, RELEASE, SCRIPTS, Requests, Script, command_args, refresh_commands
from .store import SLOT_TTL_S, Limits, StoreError, Verdict

if TYPE_CHECKING:
    from ..config import QuotaConfig
    from ..metrics import Metrics

log = logging.getLogger("maas.quota")

BACKOFF_S = 0.2  # after 2+ failures in a row, fail fast this long before trying Redis again
HEALTH_INTERVAL_S = 1.0  # background PING period (readiness, maas_quota_store_up, slot repairs)
MAX_REPAIRS = 100_000  # slot releases owed to Redis while it is unreachable
REFRESH_BATCH = 1000  # slots per refresh.lua call (all calls of one refresh share one pipeline)


class RedisStore:
    """The shared store. Safe to use from many requests at once.

    Requests that reach the store in the same event-loop turn go to Redis
    together (``redis_batch.Batcher``). Slots are never leaked by a failure on
    our side: a call whose outcome is unknown (timeout, connection lost) has
    its slot put on the repair list, freed once Redis answers again (the
    health loop drains these repairs).
    """

    def __init__(self, config: QuotaConfig, metrics: Metrics | None = None, *, client: Any = None,
                 slot_ttl_s: float = SLOT_TTL_S, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        # clock and sleep: the seam for tests (lease windows and slot refreshes on a fake clock); Redis keeps
        # its own time (TIME) for buckets and slot expiry, which no fake clock moves.
        self._config = config
        self._slot_ttl_ms = str(max(1, int(slot_ttl_s * 1000)))
        self._live = LiveSlots(slot_ttl_s, self.refresh_slots, sleep=sleep)
        self._metrics = metrics
        self._timeout = config.timeout_ms / 1000
        self._prefix = config.key_prefix
        self._client = client if client is not None else connect(config)
        # Redis Cluster: one request per script call (its keys share one slot; a batch's would not).
        self._batch_max = 1 if isinstance(self._client, RedisCluster) else MAX_BATCH
        self._repairs: deque[tuple[str, str]] = deque(maxlen=MAX_REPAIRS)
        self._batcher = Batcher(self._exchange, self._repairs, timeout_s=self._timeout,
                                batch_max=self._batch_max, late=self._late)
        self._limit_args: ClearWhenFull[Limits, str] = ClearWhenFull(10_000)  # wire form of each distinct limit
        self._keys: ClearWhenFull[str, tuple[str, str, str, str, str]] = ClearWhenFull(100_000)  # Redis keys of each bucket
        self._leases = Leases(clock)  # this replica's unspent allowances of busy rate-only buckets
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
        await self._batcher.drain()
        with contextlib.suppress(Exception):
            await self._client.aclose()

    @property
    def client(self) -> Any:
        """The Redis client, shared with the monitors (``gateway.monitors``): one connection pool."""
        return self._client

    @property
    def config(self) -> QuotaConfig:
        return self._config

    @property
    def is_cluster(self) -> bool:
        return self._batch_max == 1

    def ready(self) -> str | None:
        if self._last_error is None:
            return None
        return f"quota store {redact(self._config.store)} unreachable: {self._last_error}"

    async def ping(self) -> None:
        """One bounded PING; raises ``StoreError``. Also what the health loop runs."""
        await self._call(self._client.ping)

    # ---- the two operations

    def keys(self, bucket: str) -> tuple[str, str, str, str, str]:
        """Rate bucket, in-flight slots, token budget, day and month totals: one hash tag, so one Cluster slot."""
        keys = self._keys.get(bucket)
        if keys is None:
            p = self._prefix
            keys = self._keys.put(bucket, (f"{p}tb:{{{bucket}}}", f"{p}cc:{{{bucket}}}", f"{p}tk:{{{bucket}}}",
                                           f"{p}pd:{{{bucket}}}", f"{p}pm:{{{bucket}}}"))
        return keys

    async def acquire(self, bucket: str, limits: Limits, slot: str, cost: int, units: int = 1) -> Verdict:
        want = 1
        if limits.rate_per_s and not limits.needs_release and not limits.totals and units == 1:
            verdict, want = self._leases.spend(bucket, limits)
            if verdict is not None:  # admitted from this replica's allowance: no round trip
                return verdict
            pending = self._leases.pending(bucket)
            if pending is not None:
                # An allowance for this bucket is on its way: wait for it (one round trip for the many
                # requests that arrive meanwhile, not one each). Refused, or spent before this request's
                # turn: one exact call for one token, as without leases. (Shielded: a waiter whose client
                # goes away must not cancel the allowance the others wait for.)
                if await asyncio.shield(pending):
                    verdict, _ = self._leases.spend(bucket, limits)
                    if verdict is not None:
                        return verdict
                want = 1
        keys = self.keys(bucket)
        wire = self._limit_args.get(limits)
        if wire is None:
            wire = self._limit_args[limits] = (f"{limits.rate_per_s!r} {limits.burst} {limits.max_concurrent} "
                                               f"{limits.tokens_per_minute} {limits.per_day} {limits.per_month}")
        if want > 1:
            self._leases.asking(bucket)
            verdict = None
            try:
                r = await self._submit(ACQUIRE, keys, (wire, slot, cost, want, 1), None)
                verdict = self._leases.grant(bucket, r)
            finally:
                self._leases.done(bucket, granted=verdict is not None)
            if verdict is not None:
                return verdict
        else:
            r = await self._submit(ACQUIRE, keys, (wire, slot, cost, 1, max(1, units)),
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

    # ---- response-id ownership (gateway.llm.ownership): one plain key per id, global across replicas

    async def claim_owner(self, key: str, value: str, ttl_s: int) -> bool:
        """``SET NX EX``: record ``value`` unless ``key`` holds a record; True when it now holds ``value``."""
        name = f"{self._prefix}own:{{{key}}}"
        if await self._call(functools.partial(self._client.set, name, value, nx=True, ex=max(1, int(ttl_s)))):
            return True
        held = await self._call(functools.partial(self._client.get, name))
        return _text(held) == value

    async def owner_of(self, key: str) -> str | None:
        return _text(await self._call(functools.partial(self._client.get, f"{self._prefix}own:{{{key}}}")))

    async def forget_owner(self, key: str) -> None:
        await self._call(functools.partial(self._client.delete, f"{self._prefix}own:{{{key}}}"))

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

    # ---- to Redis (requests are batched by redis_batch.Batcher)

    async def _submit(self, script: Script, keys: tuple[str, ...], args: tuple[Any, ...],
                      slot: tuple[str, str] | None) -> Any:
        if self._failures >= 2 and time.monotonic() < self._fail_fast_until:
            if slot is not None and script is RELEASE:
                self._repairs.append(slot)
            raise StoreError(self._last_error or "quota store unavailable")
        return await self._batcher.submit(script, keys, args, slot)

    async def _exchange(self, commands: Commands, timeout: float) -> list[Any]:
        """The batcher's way to Redis: the script calls sent under its deadline."""
        replies: list[Any] = await self._call(lambda: self._send(commands), timeout=timeout)
        return replies

    def _late(self) -> StoreError:
        """Calls waited a whole timeout for a batch slot: Redis is too slow, count it as a failure."""
        self._failed(f"no answer within {self._config.timeout_ms} ms")
        return StoreError(self._last_error or "timeout")

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


def _text(value: Any) -> str | None:
    """A Redis reply as text (the client may or may not decode replies)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None
