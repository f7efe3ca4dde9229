"""Authorise: may this subject perform this action on this model? Casbin decides.

Runs after authentication and body parsing, before quotas and the backend: a
denied request never touches a quota bucket or an upstream. The decision (with
the deciding rule id and the subject's effective roles) is put on the context
for audit and metrics; the client only learns "denied by policy" — rule ids
and conditions are the security team's business, not an attacker's map.

Conditions may read ``request.params.*`` (derived once from the parsed body,
``request_params``) and ``monitor.*``: before deciding for a watched caller the
stage asks the monitors (``gateway.monitors``) which are in alarm for it and
this model, and records them on the context for the audit line.

``GET /v1/models`` is authorised here too, model by model: it is allowed (rule
``models-list``) and ``ctx.visible_models`` holds the models the caller may
``read``, in config order; the answer lists exactly those.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Mapping

from ..errors import Forbidden
from ..llm.surfaces import surface_for
from ..pipeline import Decision, RequestContext, RouteKind
from ..policy.compile import DEFAULT_DENY
from ..request_params import llm_params, v2_params
from ..services import Services

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..metrics import Metrics
    from ..monitors import Monitors

log = logging.getLogger("maas.policy")

NO_POLICY = Decision(False, DEFAULT_DENY)
MODELS_LIST = Decision(True, "models-list")  # answered, filtered per model by policy: an allow
_V2_KINDS = frozenset(k for k in RouteKind if k.name.startswith("V2_"))
V2_SERVER = Decision(True, "v2-server")  # GET /v2, /v2/health/*: the gateway's own, no model, no policy


def utc_hour() -> int:
    return int(time.time() // 3600 % 24)  # epoch time has no leap offsets: this is the UTC hour


def request_params(ctx: RequestContext) -> dict[str, Any]:
    """``request.params`` (``gateway.request_params``), derived once per request from the parsed body."""
    params = ctx.params
    if params is None:
        route = ctx.route
        if route is None or ctx.json is None:
            params = {}
        elif route.kind is RouteKind.V2_INFER:
            params = v2_params(ctx.json, ctx.binary_header is not None)
        elif route.kind in _V2_KINDS:
            params = {}
        elif not route.json_body:  # audio uploads: the form's text fields, read as their surface reads them
            surface = surface_for(ctx.path)
            params = surface.params(ctx.json) if surface is not None and surface.multipart else {}
        else:  # the LLM surfaces: OpenAI, Anthropic Messages, Responses, Ollama
            params = llm_params(ctx.json)
        ctx.params = params
    return params


def request_facts(ctx: RequestContext) -> dict[str, Any]:
    """What a ``when`` condition may read as ``request.*``."""
    request = ctx.request
    return {"ip": request.peer, "mtls": request.client_subject is not None, "hour": utc_hour(),
            "method": request.method, "path": ctx.path, "params": request_params(ctx)}


class Authorize:
    name = "authorize"

    def __init__(self, policy: Any, metrics: Metrics, models: Mapping[str, ModelConfig] | None = None) -> None:
        self.policy = policy  # a PolicyStore (gateway.policy.store) or None: then everything is denied
        self.metrics = metrics
        self.models: Mapping[str, ModelConfig] = models or {}  # every configured model, for GET /v1/models
        self.monitors: Monitors | None = None  # set by the gateway: monitor.* alarms for `when`

    async def __call__(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is not None and (route.kind is RouteKind.MODELS_LIST or route.kind is RouteKind.OLLAMA_TAGS):
            ctx.visible_models = tuple(self.allowed_models(ctx, self.models))
            ctx.decision = MODELS_LIST
            return
        if route is not None and route.kind is RouteKind.V2_SERVER:  # about the gateway: any authenticated caller
            ctx.decision = V2_SERVER
            return
        monitors = self.monitors
        alarms = None
        if monitors is not None and ctx.model_name and ctx.identity is not None and self.policy is not None:
            current = getattr(self.policy, "current", None)
            document = current.document if current is not None else None
            roles = current.enforcer.compiled.effective_roles(ctx.identity.subject, ctx.identity.roles) \
                if current is not None and document is not None and document.monitors else ()
            watches = monitors.watching(document, ctx.identity.subject, roles, ctx.model_name)
            if watches:
                await monitors.settle(watches, ctx.identity.subject, ctx.model_name)
                alarms = monitors.alarms(watches, ctx.identity.subject, ctx.model_name)
                ctx.monitors = tuple(alarms)
        decision = self.decide(ctx, ctx.model_name, ctx.model, ctx.action, alarms)
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
               action: str | None, alarms: Mapping[str, bool] | None = None) -> Decision:
        """The decision for ``ctx``'s caller on (model, action); denies when anything is missing."""
        current = getattr(self.policy, "current", None) if self.policy is not None else None
        identity = ctx.identity
        if current is None or identity is None or not model_name or not action:
            return NO_POLICY
        labels = model.labels if model is not None else None
        decision: Decision = current.enforcer.decide_for(identity, model_name, labels, action,
                                                         lambda: request_facts(ctx), alarms)
        return decision

    def allowed_models(self, ctx: RequestContext, models: Mapping[str, ModelConfig]) -> list[str]:
        """Names of the models the caller may ``read`` (for ``GET /v1/models``), in config order."""
        return [name for name, model in models.items() if self.decide(ctx, name, model, "read").allowed]


def build(services: Services) -> Authorize:
    """Always built: with no policy configured every request is denied (fail closed)."""
    return Authorize(services.policy, services.metrics, services.config.models)
