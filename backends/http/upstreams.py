"""The upstreams of one model: round-robin balancing with passive health checks.

Passive, because the traffic already tells us: ``eject_after_failures``
consecutive failures of the kinds the backend's ``eject_on`` names (connect
errors, timeouts, 502/503/504 by default; the backend decides what is a
failure, this module only counts) take an upstream out of rotation for
``eject_for_s``. It comes back either through an active probe (``GET
health_path`` answered 2xx) or, without a health path, by letting exactly one
real request try it once the ejection has run out: success readmits it,
failure ejects it again.

Two guards, both Envoy's, keep ejection from turning one bad upstream (or a
burst of bad requests) into an outage: at most ``max_ejection_percent`` of the
upstreams are out at once (rounded down: with one upstream and 50 %, none),
and when every upstream is out anyway the pool routes to all of them (panic
routing) instead of answering 503, so a recovered upstream answers the very
next request. Everything here runs on the event loop thread, so plain
attributes need no locks.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Collection, Sequence

from gateway.errors import Unavailable

from .client import Origin, UpstreamError

if TYPE_CHECKING:
    from gateway.metrics import Metrics

    from .client import Pool

OUTCOMES = ("ok", "error", "timeout", "5xx")
PROBE_TIMEOUT_S = 5.0  # an active health probe that takes longer counts as failed
PROBE_MAX_BYTES = 1_048_576  # a health probe's body is read (to keep the connection) but never held past this


class _NoMetric:
    """Stands in for a Prometheus child when the backend runs without metrics (unit tests)."""

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


NO_METRIC = _NoMetric()


class Upstream:
    """One upstream server and its health. ``base`` is its URL without a trailing slash."""

    __slots__ = ("base", "origin", "label", "failures", "in_rotation", "ejected_until", "trial", "outcome",
                 "healthy_gauge", "ejections")

    def __init__(self, url: str, model: str, metrics: Metrics | None) -> None:
        self.base = url.rstrip("/")
        self.origin = Origin.parse(self.base)
        self.label = self.base
        self.failures = 0  # consecutive
        self.in_rotation = True
        self.ejected_until = 0.0  # on the pool's clock (time.monotonic)
        self.trial = False  # a request is trying this ejected upstream now
        if metrics is None:
            self.outcome: dict[str, Any] = {o: NO_METRIC for o in OUTCOMES}
            self.healthy_gauge: Any = NO_METRIC
            self.ejections: Any = NO_METRIC
        else:
            self.outcome = {o: metrics.upstream_requests.labels(model, self.label, o) for o in OUTCOMES}
            self.healthy_gauge = metrics.upstream_healthy.labels(model, self.label)
            self.ejections = metrics.upstream_ejections.labels(model, self.label)
        self.healthy_gauge.set(1)

    def __repr__(self) -> str:
        return f"Upstream({self.label!r}, in_rotation={self.in_rotation})"


class UpstreamPool:
    """Chooses an upstream per attempt and keeps score of how each one is doing."""

    def __init__(
        self,
        model: str,
        urls: Sequence[str],
        *,
        eject_after_failures: int,
        eject_for_s: float,
        health_path: str | None,
        max_ejection_percent: float = 50.0,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.upstreams = [Upstream(u, model, metrics) for u in urls]
        # The seam for tests (a fake clock instead of waiting out eject_for_s); read only while something is ejected.
        self.clock = clock
        self.sleep = sleep
        self._eject_after = eject_after_failures
        self._eject_for = eject_for_s
        self._max_ejected = int(len(self.upstreams) * max_ejection_percent // 100)  # floor, like Envoy
        self._health_path = health_path
        self._next = 0
        self._ejected = 0  # how many are out of rotation; the fast path skips all checks at 0
        self._client: Pool | None = None
        self._probe_headers: list[tuple[str, str]] = []
        self._probes: dict[Upstream, asyncio.Task[None]] = {}

    # -- lifecycle ---------------------------------------------------------

    def bind(self, client: Pool, probe_headers: Sequence[tuple[str, str]] = ()) -> None:
        """Give the pool the backend's client for active probes (and the backend's configured headers)."""
        self._client = client
        self._probe_headers = list(probe_headers)

    async def close(self) -> None:
        tasks = list(self._probes.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._probes.clear()

    # -- choosing ----------------------------------------------------------

    def pick(self, exclude: Collection[Upstream] = ()) -> Upstream:
        """The next upstream to try, skipping ``exclude``; ``Unavailable`` (503) when none may be tried.

        When every upstream is out of rotation, any of them may be (panic
        routing): a guess at a possibly recovered upstream beats a certain 503.
        """
        ups = self.upstreams
        ejected = self._ejected
        if ejected and self._health_path is None:
            now = self.clock()
            for up in ups:
                if not up.in_rotation and not up.trial and now >= up.ejected_until and up not in exclude:
                    up.trial = True
                    return up
        n = len(ups)
        start = self._next
        panic = ejected >= n
        for i in range(n):
            up = ups[(start + i) % n]
            if (panic or up.in_rotation) and up not in exclude:
                self._next = (start + i + 1) % n
                return up
        raise Unavailable("no healthy upstream")

    def ready(self) -> bool:
        """True while some upstream is in rotation or may be tried (its ejection ran out).

        False means degraded, not refusing: requests are then panic-routed to every upstream.
        """
        if not self._ejected:
            return True
        now = self.clock()
        for up in self.upstreams:
            if up.in_rotation or (self._health_path is None and now >= up.ejected_until):
                return True
        return False

    # -- scoring -----------------------------------------------------------

    def succeeded(self, up: Upstream) -> None:
        up.failures = 0
        if not up.in_rotation:
            self._readmit(up)

    def failed(self, up: Upstream) -> None:
        """A failure of a kind ``eject_on`` names: counts towards ejection, within ``max_ejection_percent``."""
        up.failures += 1
        if up.trial:
            up.trial = False
            up.ejected_until = self.clock() + self._eject_for
        elif up.in_rotation and up.failures >= self._eject_after and self._ejected < self._max_ejected:
            self._eject(up)

    def abandoned(self, up: Upstream) -> None:
        """The attempt ended without a verdict (the client went away): let another request try."""
        up.trial = False

    def _eject(self, up: Upstream) -> None:
        up.in_rotation = False
        up.trial = False
        up.ejected_until = self.clock() + self._eject_for
        self._ejected += 1
        up.healthy_gauge.set(0)
        up.ejections.inc()
        if self._health_path is not None and up not in self._probes:
            task = asyncio.get_running_loop().create_task(self._probe_until_healthy(up))
            self._probes[up] = task
            task.add_done_callback(lambda _t: self._probes.pop(up, None))

    def _readmit(self, up: Upstream) -> None:
        if up.in_rotation:  # a panic-routed request and a probe can both see it recover
            return
        up.in_rotation = True
        up.trial = False
        up.failures = 0
        self._ejected -= 1
        up.healthy_gauge.set(1)

    # -- active probing ----------------------------------------------------

    async def _probe_until_healthy(self, up: Upstream) -> None:
        while not up.in_rotation:
            await self.sleep(max(0.0, up.ejected_until - self.clock()))
            if up.in_rotation:
                return
            if await self.probe(up):
                self._readmit(up)
                return
            up.ejected_until = self.clock() + self._eject_for

    async def probe(self, up: Upstream) -> bool:
        """One ``GET health_path``: healthy on a 2xx answer."""
        if self._client is None or self._health_path is None:
            return False
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                resp = await self._client.request(up.origin, "GET", self._health_path, self._probe_headers, None,
                                                  PROBE_TIMEOUT_S)
                try:
                    await resp.read(max_bytes=PROBE_MAX_BYTES)
                finally:
                    resp.release()
                return 200 <= resp.status < 300
        except (UpstreamError, TimeoutError):
            return False
