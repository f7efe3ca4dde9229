"""Quota buckets in this process's memory: for one instance with no Redis (``store: memory``, the demo).

The arithmetic is a line-by-line mirror of ``acquire.lua``/``release.lua`` so
both stores admit exactly the same requests; the clock is ``time.monotonic``
instead of Redis ``TIME``. Memory is bounded: past ``MAX_BUCKETS`` the least
recently used bucket is dropped. The one idle longest has almost always
refilled to full, and a full bucket is indistinguishable from no bucket;
otherwise dropping it hands its subject a full bucket early (never fewer tokens).

In-flight slots carry no expiry here: they live and die with this process, and
every request gives its slot back on every exit path (``concurrency.Hold``), so
a slot is held for the whole life of its request, however long it streams. The
Redis store needs a TTL (refreshed while the request lives) only because a
replica can die holding slots that other replicas count.
"""

from __future__ import annotations

import datetime
import functools
import math
import time
from typing import TYPE_CHECKING, Callable

from ..cache import Lru
from .store import Limits, Verdict

if TYPE_CHECKING:
    from ..metrics import Metrics

MAX_BUCKETS = 100_000  # per kind (rate, tokens): ~100 bytes each


def calendar(wall_ms: float) -> tuple[int, float, int, float]:
    """(UTC day number, its end in ms, month id = year * 12 + month - 1, its end in ms) at ``wall_ms``."""
    return _day(int(wall_ms // 86_400_000))


@functools.lru_cache(maxsize=4)
def _day(today: int) -> tuple[int, float, int, float]:
    """``calendar`` of one UTC day: the same every call that day (a datetime is not built per request)."""
    day = datetime.datetime.fromtimestamp(today * 86400, datetime.timezone.utc)
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    month_end = datetime.datetime(year, month, 1, tzinfo=datetime.timezone.utc).timestamp() * 1000.0
    return today, (today + 1) * 86_400_000.0, day.year * 12 + day.month - 1, month_end


class _Buckets:
    """Token buckets keyed by bucket id: (tokens, last update in ms), LRU-bounded (by last store)."""

    def __init__(self, limit: int) -> None:
        self._data: Lru[str, tuple[float, float]] = Lru(limit)

    def level(self, key: str, capacity: float, per_ms: float, now: float) -> float:
        got = self._data.peek(key)  # a refused request's look does not keep its bucket alive
        if got is None:
            return capacity
        tokens, ts = got
        elapsed = max(0.0, now - ts)
        return min(capacity, tokens + elapsed * per_ms)

    def store(self, key: str, tokens: float, now: float) -> None:
        self._data.put(key, (tokens, now))

    def __len__(self) -> int:
        return len(self._data)


class MemoryStore:
    """Same contract as ``RedisStore``; never fails, so it is always ready."""

    def __init__(self, metrics: Metrics | None = None, *, max_buckets: int = MAX_BUCKETS,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._clock = clock  # seconds; the seam for tests (a fake clock instead of waiting for a refill)
        self._rate = _Buckets(max_buckets)
        self._tokens = _Buckets(max_buckets)
        # per-day / per-month totals: bucket id -> (window id, units used in it); calendar windows read the wall
        # clock (``wall``, seconds since the epoch: UTC days and months), never the monotonic one
        self._wall = wall
        self._days: Lru[str, tuple[int, int]] = Lru(max_buckets)
        self._months: Lru[str, tuple[int, int]] = Lru(max_buckets)
        self._inflight: dict[str, set[str]] = {}  # bucket id -> slots held; bounded by requests in flight
        if metrics is not None:
            metrics.quota_store_up.set(1)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def ready(self) -> str | None:
        return None

    def _now(self) -> float:
        return self._clock() * 1000.0

    @staticmethod
    def _used(totals: Lru[str, tuple[int, int]], bucket: str, window: int) -> int:
        got = totals.peek(bucket)
        return got[1] if got is not None and got[0] == window else 0

    async def acquire(self, bucket: str, limits: Limits, slot: str, cost: int, units: int = 1) -> Verdict:
        now = self._now()
        units = max(1, units)
        rate, burst, maxc, tpm = limits.rate_per_s, limits.burst, limits.max_concurrent, limits.tokens_per_minute
        pday, pmonth = limits.per_day, limits.per_month
        rate_ms, tok_ms = rate / 1000.0, tpm / 60000.0
        wall = self._wall() * 1000.0
        today, day_end, month_id, month_end = calendar(wall)
        dused = self._used(self._days, bucket, today) if pday > 0 else 0
        mused = self._used(self._months, bucket, month_id) if pmonth > 0 else 0
        if pday > 0 and dused + units > pday:  # a spent calendar window decides first (acquire.lua does the same)
            return Verdict.from_ms(False, 4, max(0, pday - dused), day_end - wall, day_end - wall)
        if pmonth > 0 and mused + units > pmonth:
            return Verdict.from_ms(False, 5, max(0, pmonth - mused), month_end - wall, month_end - wall)
        rtokens = self._rate.level(bucket, burst, rate_ms, now) if rate > 0 else 0.0
        ttokens = self._tokens.level(bucket, tpm, tok_ms, now) if tpm > 0 else 0.0
        held = self._inflight.get(bucket)
        inflight = len(held) if (maxc > 0 and held) else 0

        def headline(allowed: bool, reason: int, retry_ms: float) -> Verdict:
            if rate > 0:
                return Verdict.from_ms(allowed, reason, math.floor(rtokens), math.ceil((burst - rtokens) / rate_ms), retry_ms)
            if tpm > 0:
                return Verdict.from_ms(allowed, reason, max(0, math.floor(ttokens)), math.ceil((tpm - ttokens) / tok_ms), retry_ms)
            if maxc > 0:
                return Verdict.from_ms(allowed, reason, max(0, maxc - inflight), 0, retry_ms)
            if pday > 0:
                return Verdict.from_ms(allowed, reason, max(0, pday - dused), day_end - wall, retry_ms)
            return Verdict.from_ms(allowed, reason, max(0, pmonth - mused), month_end - wall, retry_ms)

        if rate > 0 and rtokens < units:
            if units > burst:  # more rows than the burst: never admissible
                return headline(False, 1, math.ceil(burst / rate_ms))
            return headline(False, 1, math.ceil((units - rtokens) / rate_ms))
        if maxc > 0 and inflight >= maxc:
            return headline(False, 2, 1000)
        if tpm > 0 and ttokens < cost:
            if cost > tpm:
                return headline(False, 3, 60000)
            return headline(False, 3, math.ceil((cost - ttokens) / tok_ms))

        if rate > 0:
            rtokens -= units
            self._rate.store(bucket, rtokens, now)
        if pday > 0:
            dused += units
            self._days.put(bucket, (today, dused))
        if pmonth > 0:
            mused += units
            self._months.put(bucket, (month_id, mused))
        if maxc > 0:
            self._inflight.setdefault(bucket, set()).add(slot)
            inflight += 1
        if tpm > 0:
            ttokens -= cost
            self._tokens.store(bucket, ttokens, now)
        return headline(True, 0, 0)

    async def release(self, bucket: str, limits: Limits, slot: str, refund: int) -> None:
        held = self._inflight.get(bucket)
        if held is not None:
            held.discard(slot)
            if not held:
                del self._inflight[bucket]
        tpm = limits.tokens_per_minute
        if tpm > 0 and refund != 0:
            now = self._now()
            tokens = self._tokens.level(bucket, tpm, tpm / 60000.0, now)
            self._tokens.store(bucket, min(tpm, tokens + refund), now)

    # introspection for tests and the bench
    def inflight(self, bucket: str) -> int:
        return len(self._inflight.get(bucket, ()))

    def bucket_count(self) -> int:
        return len(self._rate) + len(self._tokens)
