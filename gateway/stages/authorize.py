"""Authorise: may this subject perform this action on this model? Casbin decides.

Runs after authentication and body parsing, before quotas and the backend: a
denied request never touches a quota bucket or an upstream. The decision (with
the deciding rule id and the subject's effective roles) is put on the context
for audit and metrics; the client only learns "denied by policy" — rule ids
and conditions are the security team's business, not an attacker's map.

``GET /v1/models`` is authorised here too, model by model: it is allowed (rule
``models-list``) and ``ctx.visible_models`` holds the models the caller may
``read``, in config order; the answer lists exactly those.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import Forbidden
from ..pipeline import Decision, RequestContext, RouteKind
from ..policy.compile import DEFAULT_DENY
from ..services import Services

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..metrics import Metrics

log = logging.getLogger("maas.policy")

NO_POLICY = Decision(False, DEFAULT_DENY)
MODELS_LIST = Decision(True, "models-list")  # answered, filtered per model by policy: an allow


def utc_hour() -> int:
    return int(time.time() // 3600 % 24)  # epoch time has no leap offsets: this is the UTC hour


def request_facts(ctx: RequestContext) -> dict[str, Any]:
    """What a ``when`` condition may read as ``request.*``."""
    request = ctx.request
    return {"ip": request.peer, "mtls": request.client_subject is not None, "hour": utc_hour(),
            "method": request.method, "path": ctx.path}


class Authorize:
    name = "authorize"

    def __init__(self, policy: Any, metrics: Metrics, models: Mapping[str, ModelConfig] | None = None) -> None:
        self.policy = policy  # a PolicyStore (gateway.policy.store) or None: then everything is denied
        self.metrics = metrics
        self.models: Mapping[str, ModelConfig] = models or {}  # every configured model, for GET /v1/models

    async def __call__(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is not None and route.kind is RouteKind.MODELS_LIST:
            ctx.visible_models = tuple(self.allowed_models(ctx, self.models))
            ctx.decision = MODELS_LIST
            return
        decision = self.decide(ctx, ctx.model_name, ctx.model, ctx.action)
        ctx.decision = decision
        self.metrics.policy_decisions.labels(decision.rule, "allow" if decision.allowed else "deny").inc()
        for rule_id, would_allow in decision.shadow:
            would = "allow" if would_allow else "deny"
            self.metrics.policy_shadow.labels(rule=rule_id, would=would).inc()
            log.info("shadow rule %s would %s (request %s, model %s, action %s, enforced: %s by %s)",
                     rule_id, would, ctx.request_id, ctx.model_name, ctx.action,
                     "allow" if decision.allowed else "deny", decision.rule)
        if not decision.allowed:
            raise Forbidden("denied by policy")

    def decide(self, ctx: RequestContext, model_name: str | None, model: ModelConfig | None,
               action: str | None) -> Decision:
        """The decision for ``ctx``'s caller on (model, action); denies when anything is missing."""
        current = getattr(self.policy, "current", None) if self.policy is not None else None
        identity = ctx.identity
        if current is None or identity is None or not model_name or not action:
            return NO_POLICY
        labels = model.labels if model is not None else None
        decision: Decision = current.enforcer.decide_for(identity, model_name, labels, action, lambda: request_facts(ctx))
        return decision

    def allowed_models(self, ctx: RequestContext, models: Mapping[str, ModelConfig]) -> list[str]:
        """Names of the models the caller may ``read`` (for ``GET /v1/models``), in config order."""
        return [name for name, model in models.items() if self.decide(ctx, name, model, "read").allowed]


def build(services: Services) -> Authorize:
    """Always built: with no policy configured every request is denied (fail closed)."""
    return Authorize(services.policy, services.metrics, services.config.models)
