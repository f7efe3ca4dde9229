"""Every Prometheus metric the gateway exposes, defined in one place.

One registry per gateway instance (not the global default) so tests can run
several gateways in one process and read each one's numbers. Under
``serve --workers N`` the supervisor sets ``PROMETHEUS_MULTIPROC_DIR`` before
the workers start, every worker writes its values there, and ``/metrics`` on
any worker aggregates all of them (gauges say how: live sum, or the minimum
for "is it up" flags).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # requests
        self.requests = Counter("maas_requests_total", "Requests answered, by model, action and status.",
                                ["model", "action", "status"], registry=r)
        self.request_seconds = Histogram("maas_request_duration_seconds", "Time from arrival to the last byte sent.",
                                         ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("maas_inflight_requests", "Requests being handled now.", registry=r,
                              multiprocess_mode="livesum")
        # authenticate
        self.auth_failures = Counter("maas_auth_failures_total", "Requests refused with 401, by reason.",
                                     ["reason"], registry=r)
        self.auth_cache = Counter("maas_auth_token_cache_total", "Verified-token cache lookups.", ["result"], registry=r)
        self.jwks_refreshes = Counter("maas_jwks_refreshes_total", "JWKS fetches, by result.", ["result"], registry=r)
        self.api_key_reloads = Counter("maas_api_key_reloads_total", "API key file reloads, by result.", ["result"], registry=r)
        # authorise
        self.policy_decisions = Counter("maas_policy_decisions_total", "Policy decisions, by deciding rule.",
                                        ["rule", "decision"], registry=r)
        self.policy_shadow = Counter("maas_policy_shadow_decisions_total",
                                     "Shadow rules that matched: what they would have decided.",
                                     ["rule", "would"], registry=r)
        self.policy_reloads = Counter("maas_policy_reloads_total", "Policy reloads, by result.", ["result"], registry=r)
        self.policy_cache = Counter("maas_policy_cache_total", "Decision cache lookups.", ["result"], registry=r)
        self.policy_loaded = Gauge("maas_policy_loaded", "1 when a policy is in force.", registry=r,
                                   multiprocess_mode="livemin")
        # quota
        self.quota_rejections = Counter("maas_quota_rejections_total", "Requests refused with 429.",
                                        ["model", "reason"], registry=r)
        self.quota_store_errors = Counter("maas_quota_store_errors_total",
                                          "Quota store failures (timeouts, connection errors).", registry=r)
        self.quota_tokens = Counter("maas_quota_llm_tokens_total", "LLM tokens charged to budgets.", ["model"], registry=r)
        self.quota_store_up = Gauge("maas_quota_store_up", "1 when the quota store answered its last call.", registry=r,
                                    multiprocess_mode="livemin")
        # validate
        self.validation_failures = Counter("maas_validation_failures_total", "Requests refused by validation.",
                                           ["model", "reason"], registry=r)
        # backends
        self.upstream_requests = Counter("maas_upstream_requests_total", "Calls to upstreams, by outcome.",
                                         ["model", "upstream", "outcome"], registry=r)
        self.upstream_seconds = Histogram("maas_upstream_duration_seconds", "Upstream time to response headers.",
                                          ["model"], buckets=LATENCY_BUCKETS, registry=r)
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
        self.audit_lines = Counter("maas_audit_lines_total", "Audit lines written.", registry=r)
        self.audit_errors = Counter("maas_audit_errors_total", "Audit writes that failed.", registry=r)
        self.config_reloads = Counter("maas_reloads_total", "SIGHUP / watch reloads, by component and result.",
                                      ["component", "result"], registry=r)

    def exposition(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)
