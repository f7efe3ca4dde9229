"""The gateway: builds the stages and backends from config and runs each request through them.

``Gateway.run`` is the whole pipeline, in order: framing -> path ->
authenticate -> route -> body -> model -> llm -> authorise -> quota -> validate ->
backend -> llm (usage, ids) -> harden. A door (``gateway.http_door``) builds the transport-neutral
request, opens the context with ``begin``, runs it, writes the answer (or the
error), and calls ``finish``, which runs every request's cleanups, metrics and
audit line, on every exit path.
"""

from __future__ import annotations

import inspect
import logging
import time
from typing import TYPE_CHECKING, Any

from . import audit as audit_mod
from . import monitors as monitors_mod
from .backend import Backend, BackendEnv
from .config import GatewayConfig
from .errors import ConfigError, Unavailable
from .llm.ownership import Owners, owner_store
from .llm.stage import LlmStage
from .metrics import Metrics
from .models_list import ModelsList
from .pipeline import BackendResponse, RequestContext, RouteKind, Stage
from .plugins import PluggedModel, create_backends, plug
from .redact import redact_text
from .routing import Router
from .services import Services
from .stages import authenticate, authorize, body, framing, harden, path, quota, request_id, route, validate
from .stages.outputs_guard import OutputsGuard
from .v2_routes import ServerEndpoints

if TYPE_CHECKING:
    from .request import Request

log = logging.getLogger("maas.gateway")


class Gateway:
    """One gateway instance: its stages, backends, policy and audit log, built from one config."""

    def __init__(self, config: GatewayConfig, plugged: dict[str, PluggedModel] | None = None) -> None:
        self.config = config
        self.plugged = plug(config) if plugged is None else plugged
        self.metrics = Metrics()
        self.policy = None
        if config.policy is not None:
            from .policy.store import PolicyStore

            self.policy = PolicyStore(config.policy, self.metrics)
        services = Services(config, self.metrics, self.policy)
        env = BackendEnv(config.server, self.metrics)
        self.backends: dict[str, Backend] = create_backends(self.plugged, env)
        self.router = Router({n: b.protocol() for n, b in self.backends.items()},
                             {n: b.raw_paths() for n, b in self.backends.items()},
                             {n: b.raw_methods() for n, b in self.backends.items()})
        self.authenticate = authenticate.build(services)
        self.body = body.build(services)
        self.authorize = authorize.build(services)
        self.quota = quota.build(services)
        self.validate = validate.build(services, declared_inputs=self._declared_inputs)
        self.harden = harden.build(services)
        # query-stream monitors (issue 14): windows in the quota store (Redis: shared by every replica)
        self.monitors = monitors_mod.build(self.metrics, self.quota.store if self.quota is not None else None)
        self.authorize.monitors = self.monitors
        guard = None
        if self.harden is not None and self.policy is not None:
            self.harden.monitors = self.monitors
            guard = OutputsGuard(self.policy, self.harden)
        route_stage, model_stage = route.build(self.router, config.models)
        # response-id ownership (before authorise), usage and ids of every LLM surface's answer (after the backend)
        self.llm = LlmStage(Owners(owner_store(self.quota.store if self.quota is not None else None)),
                            config.models)
        # every stage before the backend, in order
        self.stages: list[Stage] = [s for s in (
            framing.build(services), path.Path(), self.authenticate, route_stage, self.body, model_stage, self.llm,
            self.authorize, guard, self.quota, self.validate) if s is not None]
        # answers GET /v1/models and /api/tags, where a model route has its backend
        self.models_list = ModelsList(self.router.ollama_models())
        self.v2_server = ServerEndpoints(lambda: not self.not_ready())  # GET /v2, /v2/health/live|ready
        self._inflight = self.metrics.inflight
        self.audit: audit_mod.AuditLog | None = None
        if config.audit and config.audit.enabled and config.audit.file:
            self.audit = audit_mod.AuditLog.from_config(config.audit, self.metrics)
        self._components = [c for c in (self.policy, self.authenticate, self.body, self.authorize, self.quota,
                                        self.validate, self.harden, self.monitors) if c is not None]

    def _declared_inputs(self, model: str) -> Any:
        """The inputs a backend knows its model takes (the local runner, once loaded); None otherwise."""
        backend = self.backends.get(model)
        return backend.declared_inputs() if backend is not None else None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        from .preflight import check_requirements

        problems = check_requirements(self.config, plugged=self.plugged)
        if problems:
            raise ConfigError(problems[0])
        for component in self._components:
            await _maybe(component, "start")
        for name, backend in self.backends.items():
            try:
                await backend.start()
            except ConfigError:
                raise
            except Exception as exc:  # a backend that cannot start refuses to serve, in one line
                raise ConfigError(f"model {name}: {exc}") from None
        if self.audit:
            await self.audit.start()
        self.metrics.start_flushing()

    async def close(self) -> None:
        self.metrics.stop_flushing()
        for backend in self.backends.values():
            try:
                await backend.close()
            except Exception:
                log.exception("closing backend %s", backend.name)
        for component in reversed(self._components):
            try:
                await _maybe(component, "close")
            except Exception:
                log.exception("closing %s", type(component).__name__)
        if self.audit:
            await self.audit.close()

    async def reload(self) -> None:
        """SIGHUP: re-read the policy and API keys. A bad file keeps the last good state."""
        for component in self._components:
            if hasattr(component, "reload"):
                name = getattr(component, "name", type(component).__name__)
                try:
                    ok = await _maybe(component, "reload")
                    self.metrics.config_reloads.labels(name, "error" if ok is False else "ok").inc()
                except Exception as exc:
                    self.metrics.config_reloads.labels(name, "error").inc()
                    log.error("reload of %s failed, keeping the last good state: %s", name, exc)

    def not_ready(self) -> list[str]:
        """Reasons this instance should not get traffic (empty when ready)."""
        reasons = []
        if self.config.policy is None:
            reasons.append("no policy configured: every request is denied")
        for component in self._components:
            check = getattr(component, "ready", None)
            if callable(check):
                reason = check()
                if reason:
                    reasons.append(redact_text(reason))  # /readyz is read by probes and people: no credentials
        audit_down = self.audit.not_ready() if self.audit is not None else None
        if audit_down:
            reasons.append(audit_down)
        return reasons

    # -- the request path ------------------------------------------------------------

    def begin(self, request: Request) -> RequestContext:
        """The context of a request a door has just received; ``finish`` must follow, whatever happens."""
        ctx = RequestContext(request, request_id.choose(request.headers.get("X-Request-ID")), time.monotonic())
        self._inflight.inc()
        return ctx

    async def run(self, ctx: RequestContext) -> BackendResponse:
        """Every stage, the backend and harden: the answer to write, or a ``GatewayError``."""
        if self.audit is not None and self.audit.refusing:  # audit.required: no request goes un-audited
            raise Unavailable("audit log not writable")
        for stage in self.stages:
            await stage(ctx)
        name = ctx.model_name
        if name is not None:
            backend: Any = self.backends[name]
        else:
            route = ctx.route
            backend = self.v2_server if route is not None and route.kind is RouteKind.V2_SERVER else self.models_list
        try:
            response = await backend.handle(ctx)
        except BaseException as exc:  # a backend that failed after the model ran says what it cost on its error
            ctx.usage = getattr(exc, "usage", None)
            raise
        response = await self.llm.answer(ctx, response)
        ctx.usage = response.usage
        if self.harden is not None:
            response = await self.harden(ctx, response)
        return response

    async def finish(self, ctx: RequestContext) -> None:
        """The request has ended (answered, refused, or its client gone): cleanups, metrics, audit."""
        self._inflight.dec()
        for callback in ctx._cleanups:
            try:
                result = callback(ctx)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("cleanup failed (request %s)", ctx.request_id)
        now = time.monotonic()
        model = ctx.model_name or "-"
        self.metrics.requests.labels(model, ctx.action or "-", ctx.status).inc()  # hot metrics: summed in memory
        self.metrics.request_seconds.labels(model).observe(now - ctx.started)
        if self.audit is not None:
            self.audit.record(ctx, now)



async def _maybe(obj: Any, method: str) -> Any:
    fn = getattr(obj, method, None)
    if fn is None:
        return None
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result
