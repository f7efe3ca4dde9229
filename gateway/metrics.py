"""Every Prometheus metric the gateway exposes, defined in one place.

One registry per gateway instance (not the global default) so tests can run
several gateways in one process and read each one's numbers. Under
``serve --workers N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before
the workers start, every worker writes its values there, and ``/metrics`` on
any worker aggregates all of them (gauges say how: live sum, or the minimum
for "is it up" flags).

Hot-path metrics (a handful of increments on every request) are *tallies*: an
increment adds to a plain number in memory, and ``flush`` hands the sums to
prometheus_client. Call sites do not know which metrics are hot: every metric is
used the prometheus_client way, ``metric.labels(...).inc()`` / ``.observe()``
(or ``metric.inc()`` without labels). A hot metric is a ``HotMetric`` whose
``labels()`` answers the child's tally (found in a bounded map by label values,
so no call site keeps its own cache of children), or, without labels, the tally
itself; which metrics are hot is decided here, where they are defined. Each
prometheus_client update takes a lock (and under ``--workers`` writes a shared
file), about a microsecond and a half apiece on a busy machine, which added up
to ~5 % of a proxied request. Nothing is lost: a collector registered ahead of
every metric flushes on each read of the registry (a scrape, a test's
``get_sample_value``), and under ``--workers`` each worker also flushes once a
second, so a scrape is at most that much behind.
"""

from __future__ import annotations

import asyncio
import bisect
import os
from typing import Any, Callable, Generic, Iterator, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

from .cache import ClearWhenFull

# ConnectionCounter attribute -> the `limit` label of maas_client_connections_closed_total
_CONNECTION_LIMITS = (("refused", "max_connections"), ("head_timeouts", "header_timeout_s"),
                      ("heads_too_large", "max_header_bytes"), ("write_timeouts", "client_write_timeout_s"))


class ConnectionTallies(Protocol):
    """What the metrics read of a listener's connection counter (kept structural: no import of the server side)."""

    total: int
    refused: int
    head_timeouts: int
    heads_too_large: int
    write_timeouts: int


FLUSH_EVERY_S = 1.0  # under --workers: how stale another worker's tallies may be at a scrape
MAX_LABEL_SETS = 10_000  # label-value tuples a hot metric remembers (cleared when full: a re-lookup, never a loss)


class Tally:
    """A counter or gauge child whose changes are summed in memory until ``flush``."""

    __slots__ = ("child", "pending")

    def __init__(self, child: Any) -> None:
        self.child = child
        self.pending = 0.0

    def inc(self, amount: float = 1) -> None:
        self.pending += amount

    def dec(self, amount: float = 1) -> None:  # gauges only
        self.pending -= amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0.0
            self.child.inc(amount)


class HistogramTally:
    """A histogram child whose observations are bucketed in memory until ``flush``.

    The flush adds the counts to the child's bucket and sum values directly
    (prometheus_client has no public "observe n values" call); if a future
    prometheus_client lays its histogram out differently, every value is kept
    and replayed through ``observe`` instead (``tests/test_metrics.py`` checks both
    give the same exposition).
    """

    __slots__ = ("child", "_bounds", "_counts", "_sum", "_replay")

    def __init__(self, child: Any) -> None:
        self.child = child
        bounds = getattr(child, "_upper_bounds", None)
        buckets = getattr(child, "_buckets", None)
        direct = (isinstance(bounds, list) and isinstance(buckets, list) and len(bounds) == len(buckets)
                  and hasattr(getattr(child, "_sum", None), "inc"))
        self._bounds: list[float] = list(bounds) if direct and isinstance(bounds, list) else []
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._replay: list[float] | None = None if direct else []

    def observe(self, amount: float) -> None:
        if self._replay is not None:
            self._replay.append(amount)
            return
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1  # the first bucket with amount <= bound
        self._sum += amount

    def flush(self) -> None:
        if self._replay is not None:
            values, self._replay = self._replay, []
            for value in values:
                self.child.observe(value)
            return
        counts = self._counts
        if not any(counts):
            return
        buckets = self.child._buckets
        for i, count in enumerate(counts):
            if count:
                buckets[i].inc(count)
                counts[i] = 0
        total, self._sum = self._sum, 0.0
        self.child._sum.inc(total)


T = TypeVar("T", Tally, HistogramTally)


class HotMetric(Generic[T]):
    """A labelled prometheus_client metric whose ``labels()`` answers tallies, not children.

    ``labels`` is a function generated for the metric's label names (as
    ``namedtuple`` generates its ``__new__``), so ``labels("m", "infer", 200)``
    and ``labels(model="m", action="infer", status=200)`` both cost one tuple
    and one dict read, with no ``*args``/``**kwargs`` packing: a generic
    ``labels(*values, **named)`` measured up to ~2x slower, which on two or three
    metrics per request undid the tallies' gain. A miss asks prometheus_client
    for the child (which validates and stringifies the values) and takes that
    child's one tally, so ``labels(200)`` and ``labels("200")`` count into the
    same number. The map is bounded (``ClearWhenFull``): clearing it forgets
    only the shortcut; the tallies (and their pending sums) live on in
    ``Metrics`` with their children.
    """

    __slots__ = ("metric", "labels", "_children")

    def __init__(self, metric: Any, tally: Callable[[Any], T]) -> None:
        self.metric = metric  # the prometheus_client metric, for anything that is not counting
        children: ClearWhenFull[Any, T] = ClearWhenFull(MAX_LABEL_SETS)
        self._children: ClearWhenFull[Any, T] = children  # for tests and introspection

        def miss(key: Any, *values: Any) -> T:
            return children.put(key, tally(metric.labels(*values)))

        self.labels: Callable[..., T] = _labels_function(tuple(metric._labelnames), children.get, miss)


def _labels_function(names: tuple[str, ...], get: Callable[[Any], Any], miss: Callable[..., Any]) -> Callable[..., Any]:
    """``def labels(<names>): return get(<key>) or miss(<key>, <names>)``, compiled once per hot metric.

    The key is the tuple of values, or the value itself for a one-label metric
    (no tuple to build or hash). The names are the metric's own label names,
    identifiers prometheus_client has already validated, never request input.
    """
    if not names or not all(name.isidentifier() for name in names):
        raise ValueError(f"a hot metric needs identifier label names, got {names!r}")
    args = ", ".join(names)
    key = names[0] if len(names) == 1 else f"({args})"
    # the helpers' names start with "__", which prometheus_client reserves: no label name can shadow them
    source = (f"def labels({args}):\n"
              f"    __found = __get({key})\n"
              f"    return __miss({key}, {args}) if __found is None else __found\n")
    namespace: dict[str, Any] = {"__get": get, "__miss": miss}
    exec(source, namespace)  # noqa: S102 - fixed template over validated identifiers (see docstring)
    function: Callable[..., Any] = namespace["labels"]
    return function


class _FlushFirst:
    """Registered before every metric: any read of the registry first flushes the tallies."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        self._metrics.flush()
        return iter(())

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self._tallies: dict[int, Tally | HistogramTally] = {}  # by id(child); a tally keeps its child alive
        self._flusher: asyncio.TimerHandle | None = None
        self._connections: ConnectionTallies | None = None  # set before any metric: registering one flushes
        self._connections_seen: dict[str, int] = {}
        r.register(_FlushFirst(self))  # type: ignore[arg-type]  # a collector needs only collect()
        # requests
        # hot (HotMetric, or a Tally when unlabelled): updated on every request, summed in memory
        self.requests = self._hot(Counter("maas_requests_total", "Requests answered, by model, action and status.",
                                          ["model", "action", "status"], registry=r))
        self.request_seconds = self._hot_histogram(Histogram(
            "maas_request_duration_seconds", "Time from arrival to the last byte sent.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r))
        self.inflight = self._tally(Gauge("maas_inflight_requests", "Requests being handled now.", registry=r,
                                          multiprocess_mode="livesum"))
        # authenticate
        self.auth_failures = Counter("maas_auth_failures_total", "Requests refused with 401, by reason.",
                                     ["reason"], registry=r)
        self.auth_cache = self._hot(Counter("maas_auth_token_cache_total", "Verified-token cache lookups.", ["result"],
                                            registry=r))
        self.jwks_refreshes = Counter("maas_jwks_refreshes_total", "JWKS fetches, by result.", ["result"], registry=r)
        self.api_key_reloads = Counter("maas_api_key_reloads_total", "API key file reloads, by result.", ["result"], registry=r)
        # authorise
        self.policy_decisions = self._hot(Counter("maas_policy_decisions_total", "Policy decisions, by deciding rule.",
                                                  ["rule", "decision"], registry=r))
        self.policy_shadow = Counter("maas_policy_shadow_decisions_total",
                                     "Shadow rules that matched: what they would have decided.",
                                     ["rule", "would"], registry=r)
        self.policy_reloads = Counter("maas_policy_reloads_total", "Policy reloads, by result.", ["result"], registry=r)
        self.policy_cache = self._hot(Counter("maas_policy_cache_total", "Decision cache lookups.", ["result"],
                                              registry=r))
        self.policy_loaded = Gauge("maas_policy_loaded", "1 when a policy is in force.", registry=r,
                                   multiprocess_mode="livemin")
        # quota
        self.quota_rejections = Counter("maas_quota_rejections_total", "Requests refused with 429.",
                                        ["model", "reason"], registry=r)
        self.quota_store_errors = Counter("maas_quota_store_errors_total",
                                          "Quota store failures (timeouts, connection errors).", registry=r)
        self.quota_tokens = self._hot(Counter("maas_quota_llm_tokens_total", "LLM tokens charged to budgets.",
                                              ["model"], registry=r))
        self.quota_store_up = Gauge("maas_quota_store_up", "1 when the quota store answered its last call.", registry=r,
                                    multiprocess_mode="livemin")
        # validate
        self.validation_failures = Counter("maas_validation_failures_total", "Requests refused by validation.",
                                           ["model", "reason"], registry=r)
        # backends
        self.upstream_requests = self._hot(Counter("maas_upstream_requests_total", "Calls to upstreams, by outcome.",
                                                   ["model", "upstream", "outcome"], registry=r))
        self.upstream_seconds = self._hot_histogram(Histogram(
            "maas_upstream_duration_seconds", "Upstream time to response headers.", ["model"],
            buckets=LATENCY_BUCKETS, registry=r))
        self.upstream_healthy = Gauge("maas_upstream_healthy", "1 when the upstream is in rotation.",
                                      ["model", "upstream"], registry=r, multiprocess_mode="livemin")
        self.upstream_ejections = Counter("maas_upstream_ejections_total", "Upstreams ejected after failures.",
                                          ["model", "upstream"], registry=r)
        self.runner_batch_size = Histogram("maas_runner_batch_size", "Requests per batch run by the local runner.",
                                           ["model"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.runner_queue_depth = Gauge("maas_runner_queue_depth", "Requests waiting for the local runner.",
                                        ["model"], registry=r, multiprocess_mode="livesum")
        self.runner_rejections = Counter("maas_runner_rejections_total", "Requests refused because the queue was full.",
                                         ["model"], registry=r)
        # harden, audit
        self.hardened = Counter("maas_hardened_responses_total", "Answers rewritten by output hardening.",
                                ["model", "rule"], registry=r)
        self.monitor_alarms = Counter("maas_monitor_alarms_total", "Alarms raised by query-stream monitors.",
                                      ["monitor"], registry=r)
        self.audit_lines = self._tally(Counter("maas_audit_lines_total", "Audit lines written to the file.", registry=r))
        self.audit_errors = Counter("maas_audit_errors_total", "Audit flushes that failed (lines kept and retried).",
                                    registry=r)
        self.audit_dropped = Counter("maas_audit_dropped_lines_total",
                                     "Audit lines dropped: the file was unwritable and the memory bound reached.",
                                     registry=r)
        self.audit_witness_errors = Counter("maas_audit_witness_errors_total",
                                            "Audit witness reads or writes that failed.", registry=r)
        self.config_reloads = Counter("maas_reloads_total", "SIGHUP / watch reloads, by component and result.",
                                      ["component", "result"], registry=r)
        # client connections (server.* limits): read from the listener's counter at each flush, never per request
        self.client_connections = Gauge("maas_client_connections", "Open client connections.", registry=r,
                                        multiprocess_mode="livesum")
        self.client_limit_closes = Counter("maas_client_connections_closed_total",
                                           "Client connections closed by a server limit, by limit.", ["limit"],
                                           registry=r)

    # -- tallies ------------------------------------------------------------------------

    def _hot(self, metric: Counter | Gauge) -> HotMetric[Tally]:
        return HotMetric(metric, self._tally)

    def _hot_histogram(self, metric: Histogram) -> HotMetric[HistogramTally]:
        return HotMetric(metric, self._histogram_tally)

    def _tally(self, child: Any) -> Tally:
        """The one tally of a counter or gauge child (or of an unlabelled metric).

        One per child, however often asked for: as bounded as prometheus_client's own children."""
        tally = self._tallies.get(id(child))
        if tally is None:
            tally = self._tallies[id(child)] = Tally(child)
        assert isinstance(tally, Tally)
        return tally

    def _histogram_tally(self, child: Any) -> HistogramTally:
        """The one tally of a histogram child."""
        tally = self._tallies.get(id(child))
        if tally is None:
            tally = self._tallies[id(child)] = HistogramTally(child)
        assert isinstance(tally, HistogramTally)
        return tally

    def watch_connections(self, counter: ConnectionTallies) -> None:
        """Export a listener's connection counts (``gateway.connection_limits.ConnectionCounter``) at each flush."""
        self._connections = counter

    def flush(self) -> None:
        for tally in list(self._tallies.values()):
            tally.flush()
        counter = self._connections
        if counter is not None:
            self.client_connections.set(counter.total)
            for attribute, limit in _CONNECTION_LIMITS:
                now = getattr(counter, attribute)
                delta = now - self._connections_seen.get(attribute, 0)
                if delta > 0:
                    self.client_limit_closes.labels(limit).inc(delta)
                    self._connections_seen[attribute] = now

    def start_flushing(self) -> None:
        """Under --workers, flush every second so any worker's scrape sees every worker's numbers."""
        if self._flusher is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            loop = asyncio.get_running_loop()

            def tick() -> None:
                self.flush()
                self._flusher = loop.call_later(FLUSH_EVERY_S, tick)

            self._flusher = loop.call_later(FLUSH_EVERY_S, tick)

    def stop_flushing(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.flush()

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # the merged registry reads files: put this worker's in first
            self.flush()
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)
