"""Micro-benchmark of the authorise stage: cost per request, cached and uncached.

Runs the real ``gateway.stages.authorize.Authorize`` over the shipped example
policy (``policies/policy.yaml``: inheritance, ABAC conditions, a shadow rule),
loaded by the real ``PolicyStore`` (Casbin underneath), in a plain
``time.perf_counter`` loop. "cached" is steady traffic (decision cache on, same
callers over and over); "uncached" has the cache off, so every request pays
Casbin's matcher and the conditions; "request-dependent" is a contractor, whose
decision reads ``request.hour`` and is never cached. Compare with the
end-to-end numbers of ``bench/overhead.py`` (auth vs auth+policy) to see the
stage's share of a request.

    python bench/bench_policy.py --iterations 20000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from types import MappingProxyType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import ModelConfig, PolicyConfig  # noqa: E402
from gateway.errors import Forbidden  # noqa: E402
from gateway.metrics import Metrics  # noqa: E402
from gateway.pipeline import Identity, RequestContext, Route, RouteKind  # noqa: E402
from gateway.policy.store import PolicyStore  # noqa: E402
from gateway.request import BufferedRequest  # noqa: E402
from gateway.stages.authorize import Authorize  # noqa: E402
from gateway.typedyaml import Section, Source  # noqa: E402

CALLERS = [  # (subject, roles, extra claims, model): a mix of allows and denies
    ("alice", (), {}, "digits"),
    ("erin", ("analyst",), {"employment": "staff"}, "sentiment-en"),
    ("carol", ("ml-lead",), {"clearance": 5}, "chat"),
    ("nobody", (), {}, "digits"),
]
CONTRACTOR = ("dave", ("analyst",), {"employment": "contractor"}, "digits")
LABELS = {"digits": {"sensitivity": "internal"}, "sentiment-en": {"sensitivity": "public"},
          "chat": {"sensitivity": "confidential"}}


def context(subject: str, roles: tuple[str, ...], claims: dict, model: str) -> RequestContext:
    request = BufferedRequest("POST", f"/v2/models/{model}/infer")
    ctx = RequestContext(request, "bench", time.monotonic())
    ctx.path = request.path
    ctx.route = Route(RouteKind.V2_INFER, "infer", model, True)
    ctx.model_name = model
    ctx.model = ModelConfig(backend=Section({"type": "http"}, "backend", Source("bench")), labels=LABELS[model], name=model)
    ctx.identity = Identity(subject, roles, MappingProxyType({"sub": subject, "roles": list(roles), **claims}), "jwt")
    return ctx


async def measure(stage: Authorize, contexts: list[RequestContext], iterations: int, rounds: int) -> list[float]:
    per_request: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(iterations):
            try:
                await stage(contexts[i % len(contexts)])
            except Forbidden:
                pass
        per_request.append((time.perf_counter() - start) / iterations * 1e6)
    return per_request


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policy", default=str(ROOT / "policies" / "policy.yaml"))
    args = parser.parse_args()
    contexts = [context(*c) for c in CALLERS]
    for label, cache_size, ctxs in [("cached", 10_000, contexts), ("uncached", 0, contexts),
                                    ("request-dependent (contractor)", 10_000, [context(*CONTRACTOR)])]:
        metrics = Metrics()
        store = PolicyStore(PolicyConfig(file=Path(args.policy), watch=False, decision_cache_size=cache_size), metrics)
        await store.start()
        stage = Authorize(store, metrics)
        await measure(stage, ctxs, 200, 1)  # warm up
        times = await measure(stage, ctxs, args.iterations, args.rounds)
        print(f"{label:32} {statistics.median(times):8.1f} us/request  (rounds: {', '.join(f'{t:.1f}' for t in times)})")
        await store.close()


if __name__ == "__main__":
    asyncio.run(main())
