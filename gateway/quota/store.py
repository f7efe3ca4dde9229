"""The quota store contract, shared by the Redis and the in-memory store.

A store keeps five kinds of state per bucket (one quota entry, one subject,
one model): a request-rate token bucket, the in-flight slots of
``max_concurrent``, an LLM token budget, and the per-day and per-month totals
(UTC calendar windows). ``acquire`` checks every limit an
entry sets and takes from all of them, or from none (a request refused for
concurrency does not spend a rate token); ``release`` gives back the slot and
reconciles the token reservation. Both stores implement exactly the same
arithmetic, so a single instance with ``store: memory`` behaves like a fleet
sharing Redis.

Any failure to reach the store raises ``StoreError``; the quota stage turns it
into 503 or a pass according to ``on_store_error``. This module only defines
the contract: ``gateway.quota.stores`` opens the store a config names, so the
stores import the contract and never the other way round.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import NamedTuple, Protocol

# A Redis slot nobody has refreshed for this long is presumed leaked by a
# crashed replica and freed. The slots of live requests are refreshed every
# TTL/3 (``live_slots``), so a request of any length keeps its slot; the TTL
# only bounds how long a dead replica's slots lock its subjects out. Read when
# a store is opened (tests lower it to prove the refresh).
SLOT_TTL_S = 600.0

# Reasons a request is refused; also the ``reason`` label of maas_quota_rejections_total.
REASONS = ("ok", "rate", "concurrency", "tokens", "day", "month")

_MAX_PART = 128  # longer subject/model/entry names are hashed to keep keys short
_ESCAPE = re.compile(r"[%:{}~]")


class StoreError(Exception):
    """The store could not answer in time (down, frozen, timed out, refused)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one quota entry enforces; 0 means "not limited" for each field."""

    rate_per_s: float = 0.0
    burst: int = 0
    max_concurrent: int = 0
    tokens_per_minute: int = 0
    per_day: int = 0  # total units per UTC calendar day
    per_month: int = 0  # total units per UTC calendar month
    rows: bool = False  # cost: rows (a v2 request costs its batch size in the bucket and the totals)

    @property
    def headline(self) -> int:
        """The ``RateLimit-Limit`` value: burst, else the token budget, else the slot count, else a total."""
        return self.burst or self.tokens_per_minute or self.max_concurrent or self.per_day or self.per_month

    def limit_of(self, reason: str) -> int:
        """The ``RateLimit-Limit`` of the limit that refused (``reason``), else the headline."""
        if reason == "day":
            return self.per_day
        if reason == "month":
            return self.per_month
        return self.headline

    @property
    def totals(self) -> bool:
        return bool(self.per_day or self.per_month)

    @property
    def needs_release(self) -> bool:
        return bool(self.max_concurrent or self.tokens_per_minute)


class Verdict(NamedTuple):
    """A store's answer for one request. (A named tuple: as immutable as a frozen dataclass, and built in a
    quarter of the time, which counts once per request.)"""

    allowed: bool
    reason: str  # one of REASONS
    remaining: int  # whole units left in the headline limit
    reset_s: int  # whole seconds until the headline bucket is full
    retry_after_s: int  # whole seconds >= 1 when refused, 0 when allowed

    @classmethod
    def from_ms(cls, allowed: bool, reason: int, remaining: float, reset_ms: float, retry_ms: float) -> Verdict:
        return cls(allowed, REASONS[reason], max(0, int(remaining)), max(0, math.ceil(reset_ms / 1000)),
                   0 if allowed else max(1, math.ceil(retry_ms / 1000)))


def key_part(value: str) -> str:
    """Escape one component of a bucket key so distinct (entry, subject, model) never collide.

    Subjects come from tokens and may contain anything, including ``:`` (our
    separator) and ``{``/``}`` (Redis Cluster hash-tag delimiters): those are
    percent-escaped. Long values are replaced by a SHA-256 marked with ``~``,
    a character the escaping never leaves in place.
    """
    if len(value) > _MAX_PART:
        return "~" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    if _ESCAPE.search(value):
        value = (value.replace("%", "%25").replace(":", "%3A").replace("{", "%7B")
                 .replace("}", "%7D").replace("~", "%7E"))
    return value


def bucket_id(entry_id: str, subject: str, model: str) -> str:
    """The identity of one bucket: ``entry:subject:model``, each part escaped."""
    return f"{key_part(entry_id)}:{key_part(subject)}:{key_part(model)}"


class QuotaStore(Protocol):
    """Where buckets live. Every method raises ``StoreError`` on a store failure."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def acquire(self, bucket: str, limits: Limits, slot: str, cost: int, units: int = 1) -> Verdict:
        """Admit one request: take ``units`` rate tokens (and as much of the day/month totals), an in-flight
        ``slot`` and ``cost`` LLM tokens, all or nothing."""
        ...

    async def release(self, bucket: str, limits: Limits, slot: str, refund: int) -> None:
        """Free ``slot`` (if the entry limits concurrency) and add ``refund`` (may be negative) to the token budget."""
        ...

    def ready(self) -> str | None:
        """None when the store answered its last call or health check; else why not. Never blocks."""
        ...
