"""Small local allowances of a busy rate-only bucket, so most of its requests need no Redis round trip.

A replica asks Redis for a few rate tokens at once (``lease_size``) and hands
them out locally until they are spent or ``LEASE_WINDOW_S`` has passed. The
tokens leave the global bucket before they are used, so leasing never admits
more than the global limit. While an allowance is on its way, the bucket's
other requests wait for it rather than each asking Redis for a token: under
load a burst of requests costs one round trip, not one each. Buckets that hold a slot or a token reservation are
never leased: every such request is one exact ``acquire.lua`` run.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Callable

from ..cache import ClearWhenFull
from .store import Limits, Verdict

LEASE_WINDOW_S = 0.1  # a leased allowance covers this much of a bucket's refill, and lives this long
MAX_LEASE = 64  # rate tokens taken at once, at most
MAX_LEASES = 100_000  # buckets with an allowance kept (cleared when full: an allowance is only an optimisation)


@dataclass(slots=True)
class Lease:
    """Rate tokens this replica took from a bucket ahead of use (see ``lease_size``)."""

    tokens: int  # left to hand out
    expires: float  # on the Leases' clock (time.monotonic); unspent tokens are dropped then (never returned)
    remaining: int  # the bucket's whole tokens in Redis when granted (for RateLimit-Remaining)
    reset_s: int


def lease_size(limits: Limits) -> int:
    """How many rate tokens to take from Redis at once for a busy bucket.

    A bucket refilling at ``rate_per_s`` is asked for what it refills in
    ``LEASE_WINDOW_S`` (at most ``MAX_LEASE``, at most an eighth of the burst);
    below 2 there is no lease and every request is one exact Redis call. The
    tokens come out of the global bucket before they are used, so leasing never
    admits more than the global limit; it can admit less — by at most one
    unspent allowance per replica and bucket, dropped when its window ends —
    and ``RateLimit-Remaining`` counts a replica's unspent allowance as available.
    """
    return max(1, min(MAX_LEASE, int(limits.rate_per_s * LEASE_WINDOW_S), limits.burst // 8))


class Leases:
    """This replica's unspent allowances, by bucket, and the buckets asking Redis for one."""

    __slots__ = ("_leases", "_asking", "_clock")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock  # the seam for tests: a fake clock instead of waiting out LEASE_WINDOW_S
        self._leases: ClearWhenFull[str, Lease] = ClearWhenFull(MAX_LEASES)
        # one allowance request in flight per bucket, done with whether it granted one; the bucket's other
        # requests meanwhile wait for it instead of each asking Redis for a token of its own
        self._asking: dict[str, asyncio.Future[bool]] = {}

    def spend(self, bucket: str, limits: Limits) -> tuple[Verdict | None, int]:
        """(the verdict when admitted from an allowance, else None; rate tokens to ask Redis for)."""
        size = lease_size(limits)
        if size <= 1:
            return None, 1
        lease = self._leases.get(bucket)
        if lease is not None and lease.tokens > 0 and self._clock() < lease.expires:
            lease.tokens -= 1  # admitted from this replica's allowance: no round trip
            return Verdict(True, "ok", lease.remaining + lease.tokens, lease.reset_s, 0), 1
        return None, (1 if bucket in self._asking else size)

    def pending(self, bucket: str) -> asyncio.Future[bool] | None:
        """The allowance request in flight for ``bucket`` (done with whether it granted one), if any."""
        return self._asking.get(bucket)

    def asking(self, bucket: str) -> None:
        self._asking[bucket] = asyncio.get_running_loop().create_future()

    def done(self, bucket: str, *, granted: bool) -> None:
        """The allowance request for ``bucket`` came back (answered or failed)."""
        waiting = self._asking.pop(bucket, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(granted)

    def grant(self, bucket: str, reply: list[int]) -> Verdict | None:
        """Keep what ``acquire.lua`` granted beyond this request's token; the verdict, if it got more than one."""
        if reply[0] <= 1:
            return None
        lease = self._leases[bucket] = Lease(reply[0] - 1, self._clock() + LEASE_WINDOW_S, reply[2],
                                             math.ceil(reply[3] / 1000))
        return Verdict(True, "ok", lease.remaining + lease.tokens, lease.reset_s, 0)
