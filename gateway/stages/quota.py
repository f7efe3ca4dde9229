"""The quota stage: hold each subject to the most specific quota entry of the policy in force.

Runs after authorise (so the caller's effective roles are known) and before
validation. Per request it reads the live policy document once, picks the
governing entry (``gateway.quota.matching``), and makes one store call that
takes a rate token, an in-flight slot and an LLM token reservation together.
It writes ``ctx.quota`` for the audit line:

* ``none``        no entry governs this request (or there is no model / no policy);
* ``ok``          admitted;
* ``limited``     refused with 429 (``Retry-After`` from the bucket, >= 1 s);
* ``store_error`` the store failed and ``on_store_error: allow`` let the request through;
* ``error``       the store failed and ``on_store_error: deny`` answered 503.

An entry with ``cost: rows`` charges a v2 infer request its batch size (``request.params.batch``: the
largest first dimension of its inputs) in the rate bucket and in its ``per_day``/``per_month`` totals
(UTC calendar windows, counted in the same store call); what extraction leaks is rows, not requests.

Every quota-governed answer, admitted or refused, carries ``RateLimit-Limit``
(the bucket's burst), ``RateLimit-Remaining`` (whole tokens left) and
``RateLimit-Reset`` (whole seconds until the bucket is full). For an entry
with no ``rate_per_s`` the headers describe its token budget, else its
``max_concurrent`` slots (with ``RateLimit-Reset: 0``), else its day/month total. A refusal by a spent
day or month describes that window: its limit, what is left of it, and ``Retry-After`` = ``RateLimit-Reset``
= the seconds to the window's end.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ..cache import ClearWhenFull
from ..errors import RateLimited, Unavailable
from ..pipeline import RouteKind
from ..llm.surfaces import surface_for
from ..quota import llm_tokens
from ..quota.concurrency import Hold, new_slot_id
from ..quota.concurrency import drain as drain_releases
from ..quota.matching import MatcherCache
from ..quota.store import Limits, QuotaStore, StoreError, bucket_id
from ..quota.stores import open_store
from .authorize import request_params

if TYPE_CHECKING:
    from ..config import QuotaConfig
    from ..metrics import Metrics
    from ..pipeline import RequestContext
    from ..services import PolicySource, Services


_LLM_KINDS = frozenset({RouteKind.OPENAI, RouteKind.OLLAMA})
BUCKET_CACHE_SIZE = 100_000  # escaped bucket ids kept (cleared when full)


def build(services: Services) -> Quota | None:
    """The stage, or None when the config has no ``quota`` section (no quotas are enforced)."""
    config = services.config.quota
    if config is None:
        return None
    return Quota(config, services.metrics, services.policy, open_store(config, services.metrics))


class Quota:
    name = "quota"

    def __init__(self, config: QuotaConfig, metrics: Metrics, policy: PolicySource | None, store: QuotaStore) -> None:
        self.config = config
        self.metrics = metrics
        self.policy = policy
        self.store = store
        self._deny = config.on_store_error == "deny"
        self._matchers = MatcherCache()
        # (entry id, subject, model) -> bucket id: cheap to rebuild, so emptied when full
        self._buckets: ClearWhenFull[tuple[str, str, str], str] = ClearWhenFull(BUCKET_CACHE_SIZE)
        self._on_store_error = self._count_store_error

    # ---- lifecycle (called by the app)

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        await drain_releases()  # slots still being given back: before the store goes
        await self.store.close()

    def ready(self) -> str | None:
        """A reason when the store is required (``on_store_error: deny``) and down; never blocks."""
        return self.store.ready() if self._deny else None

    # ---- the request path

    async def __call__(self, ctx: RequestContext) -> None:
        policy = self.policy
        document = policy.document if policy is not None else None
        identity = ctx.identity
        model = ctx.model_name
        if document is None or not document.quotas or identity is None or model is None:
            ctx.quota = "none"
            return
        entry = self._matchers.get(document).match(identity.subject, ctx.roles, model)
        if entry is None:
            ctx.quota = "none"
            return
        limits = entry.limits

        cost = 0
        if limits.tokens_per_minute:
            route = ctx.route
            surface = surface_for(ctx.path) if route is not None and route.kind in _LLM_KINDS else None
            if surface is not None:  # every LLM API family estimates its own way (gateway.llm.surfaces)
                cap = ctx.model.max_tokens if ctx.model is not None else None
                cost = surface.estimate(ctx.json, self.config.default_tokens_per_request, cap)
            elif route is not None and route.kind is RouteKind.OPENAI:
                cap = ctx.model.max_tokens if ctx.model is not None else None
                _, cost = llm_tokens.estimate(ctx.json, ctx.path, self.config.default_tokens_per_request, cap)
            else:  # token budgets govern LLM calls only
                limits = _without_tokens(limits)
                if not (limits.burst or limits.max_concurrent or limits.totals):
                    ctx.quota = "none"
                    return

        units = 1
        if limits.rows:  # cost: rows: a v2 request costs its batch size (what an extraction attack spends)
            route = ctx.route
            if route is not None and route.kind is RouteKind.V2_INFER:
                units = max(1, int(request_params(ctx).get("batch") or 1))

        bucket_key = (entry.id, identity.subject, model)
        bucket = self._buckets.get(bucket_key)
        if bucket is None:
            bucket = self._buckets.put(bucket_key, bucket_id(entry.id, identity.subject, model))
        slot = new_slot_id() if limits.needs_release else ""
        try:
            verdict = await self.store.acquire(bucket, limits, slot, cost, units)
        except StoreError as exc:
            self.metrics.quota_store_errors.inc()
            if self._deny:
                ctx.quota = "error"
                raise Unavailable("quota store unavailable") from exc
            ctx.quota = "store_error"
            return

        headers = {
            "RateLimit-Limit": str(limits.limit_of(verdict.reason)),  # a refusal: the limit that refused
            "RateLimit-Remaining": str(verdict.remaining),
            "RateLimit-Reset": str(verdict.reset_s),
        }
        ctx.response_headers.update(headers)
        if not verdict.allowed:
            ctx.quota = "limited"
            self.metrics.quota_rejections.labels(model, verdict.reason).inc()
            message = _MESSAGES.get(verdict.reason, "rate limit exceeded")
            raise RateLimited(message, retry_after_s=verdict.retry_after_s, headers=headers)
        ctx.quota = "ok"
        if limits.needs_release:
            hold = Hold(self.store, bucket, limits, slot, reserved=cost, model=model,
                        on_error=self._on_store_error, on_tokens=self._count_tokens)
            ctx.on_finish(hold.release)

    def _count_store_error(self, exc: StoreError) -> None:
        self.metrics.quota_store_errors.inc()

    def _count_tokens(self, model: str, used: int) -> None:
        if used > 0:
            self.metrics.quota_tokens.labels(model).inc(used)


_MESSAGES = {
    "rate": "rate limit exceeded",
    "concurrency": "too many concurrent requests",
    "tokens": "token budget exceeded",
    "day": "daily quota exhausted",
    "month": "monthly quota exhausted",
}


def _without_tokens(limits: Limits) -> Limits:
    return dataclasses.replace(limits, tokens_per_minute=0)
