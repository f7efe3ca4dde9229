"""Hot-path tallies: every increment reaches Prometheus, exactly as a direct update would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import LATENCY_BUCKETS, HistogramTally, Metrics


def test_reading_the_registry_flushes_counters_and_gauges() -> None:
    metrics = Metrics()
    hits = metrics.tally(metrics.auth_cache.labels(result="hit"))
    inflight = metrics.tally(metrics.inflight)
    for _ in range(5):
        hits.inc()
    inflight.inc()
    inflight.inc()
    inflight.dec()
    assert metrics.registry.get_sample_value("maas_auth_token_cache_total", {"result": "hit"}) == 5
    assert metrics.registry.get_sample_value("maas_inflight_requests") == 1
    hits.inc(2)
    assert b'maas_auth_token_cache_total{result="hit"} 7.0' in metrics.exposition()


def test_one_tally_per_child() -> None:
    metrics = Metrics()
    a = metrics.tally(metrics.requests.labels("m", "infer", "200"))
    b = metrics.tally(metrics.requests.labels("m", "infer", "200"))
    assert a is b
    a.inc()
    b.inc()
    assert metrics.registry.get_sample_value("maas_requests_total", {"model": "m", "action": "infer",
                                                                     "status": "200"}) == 2


def _exposition_of(observe_into) -> bytes:  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    histogram = Histogram("h_seconds", "h", ["model"], buckets=LATENCY_BUCKETS, registry=registry)
    observe_into(histogram.labels("m"))
    text = generate_latest(registry)
    return b"\n".join(line for line in text.splitlines() if b"_created" not in line)


def test_histogram_tally_matches_direct_observation_including_bucket_edges() -> None:
    rng = random.Random(7)
    values = [rng.uniform(0, 40) ** 2 / 100 for _ in range(500)] + list(LATENCY_BUCKETS) + [0.0, 1e9]

    def direct(child) -> None:  # type: ignore[no-untyped-def]
        for v in values:
            child.observe(v)

    def tallied(child) -> None:  # type: ignore[no-untyped-def]
        tally = HistogramTally(child)
        assert tally._replay is None  # this prometheus_client: counts go straight into its buckets
        for i, v in enumerate(values):
            tally.observe(v)
            if i % 97 == 0:
                tally.flush()
        tally.flush()

    expected = _exposition_of(direct)
    assert _exposition_of(tallied) == expected


def test_histogram_tally_replays_when_the_layout_is_unknown() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, value: float) -> None:
            self.seen.append(value)

    child = Plain()
    tally = HistogramTally(child)
    tally.observe(0.5)
    tally.observe(2.0)
    assert child.seen == []
    tally.flush()
    assert child.seen == [0.5, 2.0]
