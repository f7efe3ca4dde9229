"""Per-caller query-stream monitors: notice a caller stealing a model, and let the policy react.

A monitor of the policy file (``monitors:``) watches every answered row of the
(subject, model) pairs it selects (roles/subjects/models, as quotas do) and
keeps the suspicion bits of the last ``window`` rows (``signals``: a
``low_confidence`` answer, an ``out_of_distribution`` input). When more than
``alarm_rate`` of a full window is suspicious the monitor is *in alarm* for
that pair for ``alarm_for_s``; ``monitor.ID`` in a rule's or an outputs
entry's ``when`` reads it (true/false, never unknown), the audit line lists it
(``monitors``) and ``maas_monitor_alarms_total{monitor}`` counts each alarm
raised.

Where the windows live. With ``quota.store: memory`` in this process
(``window.slide``). With Redis, in Redis (``monitor.lua``), so every replica
sees one window and one alarm: an answered request's rows are one script call,
batched with the other answers of the next ``FLUSH_S`` (10 ms) and not awaited
by the request (the monitor is off the critical path). What a replica knows of
an alarm is the state its last call for that caller returned; before deciding
for a caller whose state is older than ``REFRESH_S`` the authorise stage reads
it (one call, sent at once with the queued updates), so an alarm raised on
another replica is seen within ``REFRESH_S`` at most, an alarm raised here
within ``FLUSH_S`` + one round trip, and a steady caller never pays for a read
(each of its answers refreshes the state).

Failures: monitors detect, the quota store enforces. A Redis error on a
monitor call keeps the last known state and is logged (rate-limited); it never
fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..cache import ClearWhenFull, Lru
from ..policy.truth import Alarms
from ..quota.redis_scripts import Script, integers
from ..quota.store import bucket_id
from ..specificity import Selector
from .signals import Reference, bits, low_confidence, out_of_distribution
from .window import WindowState, slide

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..policy.document import MonitorRule, PolicyDocument

log = logging.getLogger("maas.monitors")

REFRESH_S = 1.0  # a replica's view of a caller's alarm older than this is read again before deciding
FLUSH_S = 0.01  # answered rows wait this long for others to share one Redis call (reads go at once)
MAX_STATES = 100_000  # (monitor, subject, model) states kept in memory (LRU)
NO_ALARMS = Alarms()


def _load_script() -> Script:
    import hashlib
    import importlib.resources

    source = importlib.resources.files(__package__).joinpath("monitor.lua").read_text(encoding="utf-8")
    return Script("monitor.lua", source, hashlib.sha1(source.encode()).hexdigest())


MONITOR_SCRIPT = _load_script()


@dataclass(frozen=True, slots=True)
class Watch:
    """One monitor, compiled: its selector and, for out_of_distribution, its reference rows."""

    rule: MonitorRule
    selector: Selector
    reference: Reference | None


@dataclass(slots=True)
class _View:
    until: float  # time.monotonic() when the alarm ends
    fetched: float  # time.monotonic() when this was learnt
    pending: asyncio.Future[Any] | None = None  # an update in flight for this key


class Monitors:
    """The monitors of the policy in force, and what this replica knows of their alarms."""

    def __init__(self, metrics: Metrics | None = None, *, client: Any = None, prefix: str = "maas:",
                 timeout_s: float = 0.1, cluster: bool = False) -> None:
        self._metrics = metrics
        self._client = client  # a redis.asyncio client shared with the quota store, or None: memory
        self._prefix = prefix
        self._timeout = timeout_s
        self._cluster = cluster
        self._document: PolicyDocument | None = None
        self._watches: tuple[Watch, ...] = ()
        self._matches: ClearWhenFull[tuple[str, tuple[str, ...], str], tuple[Watch, ...]] = ClearWhenFull(10_000)
        self._windows: Lru[tuple[str, str, str], WindowState] = Lru(MAX_STATES)  # memory mode
        self._views: Lru[tuple[str, str, str], _View] = Lru(MAX_STATES)  # Redis mode
        self._queue: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]] = []
        self._timer: asyncio.TimerHandle | None = None  # the delayed flush of queued updates
        self._keys: ClearWhenFull[tuple[str, str, str], str] = ClearWhenFull(MAX_STATES)  # Redis key per view
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_warning = 0.0

    @property
    def shared(self) -> bool:
        """The windows live in Redis (every replica sees them)."""
        return self._client is not None

    # ---- which monitors watch a caller

    def watching(self, document: PolicyDocument | None, subject: str, roles: Sequence[str],
                 model: str) -> tuple[Watch, ...]:
        if document is None or not document.monitors:
            return ()
        if document is not self._document:  # a reload swapped the policy
            self._watches = tuple(Watch(m, Selector.of(m), Reference(m.reference_rows)
                                        if m.reference_rows is not None else None) for m in document.monitors)
            self._matches.clear()
            self._document = document
        key = (subject, tuple(roles), model)
        found = self._matches.get(key)
        if found is None:
            role_set = frozenset(roles)
            found = self._matches.put(key, tuple(w for w in self._watches
                                                 if w.selector.rank(subject, role_set, model) is not None))
        return found

    # ---- alarms

    def alarms(self, watches: Sequence[Watch], subject: str, model: str) -> Alarms:
        """The monitors of ``watches`` in alarm for (subject, model), as this replica knows them now."""
        if not watches:
            return NO_ALARMS
        ids = []
        if self._client is None:
            now_ms = time.time() * 1000.0
            for w in watches:
                state = self._windows.peek((w.rule.id, subject, model))
                if state is not None and state.until_ms > now_ms:
                    ids.append(w.rule.id)
        else:
            now = time.monotonic()
            for w in watches:
                view = self._views.peek((w.rule.id, subject, model))
                if view is not None and view.until > now:
                    ids.append(w.rule.id)
        return Alarms(ids) if ids else NO_ALARMS

    async def settle(self, watches: Sequence[Watch], subject: str, model: str) -> None:
        """Make a stale view of (subject, model) current: wait for the call in flight for it, or read it
        from Redis (batched with whatever is queued). A fresh view is used as is (no wait: a steady caller's
        own answers keep it fresh, at most ``FLUSH_S`` + one round trip behind). Memory mode: nothing to do."""
        if self._client is None or not watches:
            return
        now = time.monotonic()
        waits: list[asyncio.Future[Any]] = []
        for w in watches:
            key = (w.rule.id, subject, model)
            view = self._views.peek(key)
            if view is not None and now - view.fetched <= REFRESH_S:
                continue
            if view is not None and view.pending is not None and not view.pending.done():
                waits.append(view.pending)
                self._flush_now()
            else:
                waits.append(self._send(w, subject, model, "r", ""))
        if waits:
            await asyncio.wait([asyncio.shield(f) for f in waits], timeout=self._timeout * 2)

    # ---- observing answers

    def observe(self, watches: Sequence[Watch], subject: str, model: str, scores: np.ndarray | None,
                inputs: np.ndarray | None) -> None:
        """Count one answer's rows: ``scores`` [n, classes] before hardening, ``inputs`` [n, features]."""
        for w in watches:
            rule = w.rule
            if rule.signal == "low_confidence":
                if scores is None:
                    continue
                flags = low_confidence(scores, rule.threshold)
            else:
                if inputs is None or w.reference is None or rule.distance is None:
                    continue
                flags = out_of_distribution(inputs, w.reference, rule.distance)
            new = bits(flags)
            if not new:
                continue
            if self._client is None:
                key = (rule.id, subject, model)
                state = self._windows.get(key)
                if state is None:
                    state = WindowState()
                    self._windows.put(key, state)
                if slide(state, new, rule.window, rule.alarm_rate, rule.alarm_for_s * 1000.0, time.time() * 1000.0):
                    self._raised(rule.id)
            else:
                self._send(w, subject, model, "u", new)

    def _raised(self, monitor_id: str) -> None:
        if self._metrics is not None:
            self._metrics.monitor_alarms.labels(monitor_id).inc()
        log.warning("monitor %s raised an alarm", monitor_id)

    # ---- Redis: calls batched per event-loop turn

    def _send(self, watch: Watch, subject: str, model: str, op: str, new: str) -> asyncio.Future[Any]:
        rule = watch.rule
        view_key = (rule.id, subject, model)
        key = self._keys.get(view_key)
        if key is None:
            key = self._keys.put(view_key, f"{self._prefix}mon:{{{bucket_id(rule.id, subject, model)}}}")
        args = (f"{op} {rule.window} {float(rule.alarm_rate)!r} {int(rule.alarm_for_s * 1000)} {new}",)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        future.add_done_callback(lambda f: self._settled(view_key, f))
        view = self._views.peek(view_key)
        if view is None:
            view = _View(0.0, 0.0)
            self._views.put(view_key, view)
        view.pending = future
        self._queue.append((key, args, future))
        if op == "r":  # someone is waiting for it: now, with the updates queued so far
            self._flush_now()
        elif self._timer is None:
            self._timer = loop.call_later(FLUSH_S, self._flush)
        return future

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_soon(self._flush)  # type: ignore[assignment]

    def _settled(self, key: tuple[str, str, str], future: asyncio.Future[Any]) -> None:
        view = self._views.peek(key)
        if future.cancelled() or future.exception() is not None:
            if view is not None:  # keep the last known alarm; do not ask again before REFRESH_S
                view.fetched = time.monotonic()
                if view.pending is future:
                    view.pending = None
            return
        remaining_ms, raised = future.result()
        now = time.monotonic()
        if view is None:
            view = _View(0.0, 0.0)
            self._views.put(key, view)
        view.until, view.fetched = now + remaining_ms / 1000.0, now
        if view.pending is future:
            view.pending = None
        if raised:
            self._raised(key[0])

    def _flush(self) -> None:
        self._timer = None
        batch, self._queue = self._queue, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        groups = [batch] if not self._cluster else [[call] for call in batch]  # Cluster: one key per call
        try:
            async with asyncio.timeout(self._timeout):
                replies = await asyncio.gather(*(self._evalsha(g) for g in groups))
        except Exception as exc:  # monitors detect, they never fail a request
            now = time.monotonic()
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning("monitor store call failed (keeping the last known alarms): %s: %s",
                            type(exc).__name__, exc)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved: nobody else may look
            return
        for group, reply in zip(groups, replies):
            values = integers(reply)
            for i, (_, _, future) in enumerate(group):
                if not future.done():
                    future.set_result((values[2 * i], values[2 * i + 1]))

    async def _evalsha(self, group: list[tuple[str, tuple[Any, ...], asyncio.Future[Any]]]) -> Any:
        from redis.exceptions import NoScriptError

        keys = [key for key, _, _ in group]
        args = [a for _, call_args, _ in group for a in call_args]
        try:
            return await self._client.evalsha(MONITOR_SCRIPT.sha, len(keys), *keys, *args)
        except NoScriptError:  # first use, or Redis restarted / SCRIPT FLUSH
            await self._client.script_load(MONITOR_SCRIPT.source)
            return await self._client.evalsha(MONITOR_SCRIPT.sha, len(keys), *keys, *args)

    async def flush(self) -> None:
        """Send what is queued now and wait (bounded) for every call in flight."""
        if self._timer is not None:
            self._timer.cancel()
        if self._queue:
            self._flush()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self._timeout * 2)

    async def close(self) -> None:
        """Let the calls in flight finish (bounded), so a graceful stop keeps the last answers' rows."""
        await self.flush()


def build(metrics: Metrics | None, store: Any) -> Monitors:
    """Monitors sharing the quota store: in Redis when it is Redis, else in this process."""
    client = getattr(store, "client", None)
    if client is None:
        return Monitors(metrics)
    config = store.config
    return Monitors(metrics, client=client, prefix=config.key_prefix, timeout_s=config.timeout_ms / 1000,
                    cluster=bool(getattr(store, "is_cluster", False)))
