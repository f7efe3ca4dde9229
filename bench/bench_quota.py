"""Micro-benchmark of the quota stage against a real store: calls/s and per-call latency.

Runs the real ``gateway.stages.quota.Quota`` (matching, the store call,
headers) from 1 and from ``--concurrency`` asyncio tasks for ``--seconds``
each, with a bucket large enough that nothing is refused, and prints ops/s and
p50/p99 per call, for rate-only entries and for rate + max_concurrent entries
(which add the release call). With many callers the Redis store sends the
calls of one event-loop turn as one EVALSHA, so ops/s rises while each call
waits for its batch. Compare with ``bench/overhead.py --variants
quota-off,quota-redis`` for the stage's share of a whole request.

    python bench/bench_quota.py --store redis://127.0.0.1:6379/0 --seconds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import QuotaConfig  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.pipeline import Decision, Identity, RequestContext, Route, RouteKind  # noqa: E402
from gateway.policy.document import PolicyDocument, QuotaRule  # noqa: E402
from gateway.quota.stores import open_store  # noqa: E402
from gateway.request import BufferedRequest  # noqa: E402
from gateway.stages.quota import Quota  # noqa: E402


@dataclass
class _Policy:
    document: PolicyDocument


async def run(store_url: str, seconds: float, concurrency: int, subjects: int, with_slots: bool) -> None:
    prefix = f"bench:{os.getpid()}:{int(with_slots)}:"
    config = QuotaConfig(store=store_url, key_prefix=prefix, timeout_ms=1000)
    rule = QuotaRule(models=["*"], roles=["analyst"], rate_per_s=1e9, burst=1_000_000_000,
                     max_concurrent=10_000 if with_slots else None)
    metrics = Metrics()
    stage = Quota(config, metrics, _Policy(PolicyDocument(quotas=[rule])), open_store(config, metrics))
    await stage.start()
    route = Route(RouteKind.V2_INFER, "infer", "digits", True)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        identity = Identity(f"user-{n % subjects}", ("analyst",), {}, "jwt")
        request = BufferedRequest("POST", "/v2/models/digits/infer")
        decision = Decision(True, "r", ("analyst",))
        while time.perf_counter() < deadline:
            ctx = RequestContext(request, "rid", 0.0, route=route, model_name="digits", identity=identity,
                                 decision=decision)
            t0 = time.perf_counter()
            await stage(ctx)
            for cb in ctx._cleanups:
                await cb(ctx)  # type: ignore[misc]
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    await stage.close()
    if store_url != "memory":
        import redis.asyncio as aioredis

        client = aioredis.from_url(store_url)
        async for key in client.scan_iter(match=prefix + "*", count=1000):
            await client.delete(key)
        await client.aclose()
    latencies.sort()
    kind = "rate+max_concurrent (acquire+release)" if with_slots else "rate only (acquire)"
    print(f"{store_url:<28} {kind:<40} conc={concurrency:<3} {len(latencies) / elapsed:>9.0f} ops/s  "
          f"p50={statistics.median(latencies) * 1e6:>7.0f} us  p99={latencies[int(len(latencies) * 0.99)] * 1e6:>7.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", default="redis://127.0.0.1:6379/0", help='a Redis URL or "memory"')
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--subjects", type=int, default=100)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    for store in (args.store, "memory") if args.store != "memory" else ("memory",):
        for concurrency in sorted({1, args.concurrency}):
            for with_slots in (False, True):
                asyncio.run(run(store, args.seconds, concurrency, args.subjects, with_slots))


if __name__ == "__main__":
    main()
