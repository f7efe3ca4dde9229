"""Hot-path tallies behind the one metric API: every increment reaches Prometheus, exactly as a direct update would."""

from __future__ import annotations

import random

import pytest

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import LATENCY_BUCKETS, MAX_LABEL_SETS, HistogramTally, HotMetric, Metrics, Tally


def test_reading_the_registry_flushes_counters_and_gauges() -> None:
    metrics = Metrics()
    hits = metrics.auth_cache.labels(result="hit")
    inflight = metrics.inflight
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
    a = metrics.requests.labels("m", "infer", "200")
    b = metrics.requests.labels("m", "infer", "200")
    c = metrics.requests.labels("m", "infer", 200)  # prometheus_client stringifies: the same child, the same tally
    d = metrics.requests.labels(status="200", model="m", action="infer")
    assert a is b is c is d
    a.inc()
    b.inc()
    c.inc()
    d.inc()
    assert metrics.registry.get_sample_value("maas_requests_total", {"model": "m", "action": "infer",
                                                                     "status": "200"}) == 4


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


# -- the one metric API: hot metrics hide their tallies behind labels() ---------------------------


def _requests(metrics: Metrics, status: str) -> float | None:
    return metrics.registry.get_sample_value("maas_requests_total", {"model": "m", "action": "infer", "status": status})


def test_hot_metrics_answer_tallies_and_plain_metrics_answer_prometheus_children() -> None:
    metrics = Metrics()
    assert isinstance(metrics.requests, HotMetric)
    assert isinstance(metrics.requests.labels("m", "infer", "200"), Tally)
    assert isinstance(metrics.request_seconds.labels("m"), HistogramTally)
    assert isinstance(metrics.inflight, Tally) and isinstance(metrics.audit_lines, Tally)  # unlabelled: the tally
    child = metrics.quota_rejections.labels("m", "rate")  # not hot: prometheus_client's own child, same call shape
    child.inc()
    assert metrics.registry.get_sample_value("maas_quota_rejections_total", {"model": "m", "reason": "rate"}) == 1


def test_a_hot_increment_is_pending_until_the_registry_is_read() -> None:
    metrics = Metrics()
    child = metrics.requests.metric.labels("m", "infer", "200")
    metrics.requests.labels("m", "infer", "200").inc(3)
    assert child._value.get() == 0  # summed in memory: no prometheus_client lock taken per request
    assert _requests(metrics, "200") == 3  # reading the registry flushed it
    assert child._value.get() == 3


def test_hot_histograms_observe_through_labels() -> None:
    metrics = Metrics()
    for value in (0.0004, 0.003, 0.003, 2.0):
        metrics.request_seconds.labels("m").observe(value)
    read = metrics.registry.get_sample_value
    assert read("maas_request_duration_seconds_count", {"model": "m"}) == 4
    assert read("maas_request_duration_seconds_bucket", {"model": "m", "le": "0.005"}) == 3
    assert abs((read("maas_request_duration_seconds_sum", {"model": "m"}) or 0.0) - 2.0064) < 1e-9


def test_the_label_map_is_bounded_and_clearing_it_loses_nothing() -> None:
    metrics = Metrics()
    first = metrics.requests.labels("m", "infer", "200")
    first.inc()
    for i in range(MAX_LABEL_SETS + 5):  # pushes the map past its bound: it empties and starts again
        metrics.requests.labels("m", "infer", str(1000 + i))
    assert len(metrics.requests._children) <= MAX_LABEL_SETS
    again = metrics.requests.labels("m", "infer", "200")
    assert again is first  # the tally lives with its child, not in the map
    again.inc()
    assert _requests(metrics, "200") == 2


def test_labels_take_the_metric_label_names_positionally_or_by_name_and_nothing_else() -> None:
    metrics = Metrics()
    with pytest.raises(TypeError):
        metrics.requests.labels("m", "infer")  # a label missing
    with pytest.raises(TypeError):
        metrics.policy_decisions.labels(rule="r", verdict="allow")  # a label the metric does not have
    assert len(metrics.requests._children) == 0 and len(metrics.policy_decisions._children) == 0
    by_name = metrics.policy_decisions.labels(decision="allow", rule="r")  # any order, like prometheus_client
    assert by_name is metrics.policy_decisions.labels("r", "allow")


def test_each_worker_flush_hands_over_only_new_counts() -> None:
    metrics = Metrics()
    hits = metrics.auth_cache.labels(result="hit")
    hits.inc()
    metrics.flush()
    metrics.flush()
    hits.inc()
    metrics.flush()
    assert metrics.auth_cache.metric.labels(result="hit")._value.get() == 2
