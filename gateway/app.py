"""The gateway: builds the stages and backends from config and runs each request through them.

``Gateway.handle`` is the whole request path, in order:
request id -> path -> route -> authenticate -> body -> authorise -> quota ->
validate -> backend -> harden -> (response) -> audit. It is the one place where
a ``GatewayError`` becomes the JSON error shape, and the one place that runs
every request's cleanups, on every exit path.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from . import audit as audit_mod
from .backend import Backend, BackendEnv
from .config import GatewayConfig
from .errors import ConfigError, GatewayError, InternalError, InvalidRequest, NotFound, MethodNotAllowed, Unavailable
from .metrics import Metrics
from .pipeline import BackendResponse, Decision, RequestContext, RouteKind
from .plugins import PluggedModel, create_backends, plug
from .redact import redact_text
from .routing import Router
from .services import Services
from .stages import authenticate, authorize, body, harden, path, quota, request_id, validate

log = logging.getLogger("maas.gateway")

# Headers a request may carry once: a second copy is a smuggling attempt, never resolved by taking the first.
SINGLETON_HEADERS = ("Authorization", "X-API-Key", "Content-Length", "Content-Type", "Host",
                     "Transfer-Encoding", "X-Request-ID")
JSON_HEADERS = {"Content-Type": "application/json"}
SET_BY_GATEWAY = frozenset({"x-request-id", "content-type"})  # never taken from a backend's headers


def error_body(error_type: str, message: str, rid: str) -> bytes:
    return orjson.dumps({"error": {"type": error_type, "message": message, "request_id": rid}})


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
        # the checks between reading the body and calling the backend, in order
        self.checks = [s for s in (self.authorize, self.quota, self.validate) if s is not None]
        self.max_body = config.server.max_body_bytes
        self._tls = config.server.tls is not None
        self._inflight = self.metrics.inflight
        self.audit: audit_mod.AuditLog | None = None
        if config.audit and config.audit.enabled and config.audit.file:
            self.audit = audit_mod.AuditLog.from_config(config.audit, self.metrics)
        self._components = [c for c in (self.policy, self.authenticate, self.body, self.authorize, self.quota,
                                        self.validate, self.harden) if c is not None]

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

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.monotonic()
        ctx = RequestContext(request, request_id.choose(request.headers.get("X-Request-ID")), started,
                             client_ip=request.remote or "")
        transport = request.transport if self._tls else None  # plain-HTTP listener: no certificate to look for
        if transport is not None and transport.get_extra_info("sslcontext") is not None:
            cert = transport.get_extra_info("peercert")
            if cert:
                ctx.mtls = True
                ctx.client_cert_subject = _common_name(cert)
        inflight = self._inflight
        inflight.inc()
        try:
            return await self._run(ctx)
        except GatewayError as exc:
            return self._error(ctx, exc)
        except asyncio.CancelledError:
            ctx.status = 499  # client went away; nothing is sent
            raise
        except (ConnectionResetError, BrokenPipeError):
            ctx.status = 499
            raise
        except Exception:
            log.exception("unhandled error (request %s)", ctx.request_id)
            return self._error(ctx, InternalError("internal error"))
        finally:
            inflight.dec()
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
            self.metrics.request_seconds.labels(model).observe(now - started)
            if self.audit is not None:
                self.audit.record(ctx, now)

    async def _run(self, ctx: RequestContext) -> web.StreamResponse:
        if self.audit is not None and self.audit.refusing:  # audit.required: no request goes un-audited
            raise Unavailable("audit log not writable")
        request = ctx.request
        headers = request.headers
        for header in SINGLETON_HEADERS:
            if len(headers.getall(header, ())) > 1:
                raise InvalidRequest(f"header {header} sent more than once")
        coding = headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":  # a coding we would not apply is refused
            raise InvalidRequest("unsupported Transfer-Encoding")
        raw_path, ctx.query = path.split_target(request.raw_path)
        ctx.path = path.normalise(raw_path)
        route_error: GatewayError | None = None
        try:
            ctx.route = route = self.router.match(request.method, ctx.path)
        except (NotFound, MethodNotAllowed) as exc:
            route_error, route = exc, None  # answered after authentication: no model enumeration without credentials
        body.check_declared_length(ctx, self.max_body)
        await self.authenticate(ctx)
        if route_error is not None or route is None:
            raise route_error or NotFound("unknown route")
        await self.body(ctx)
        if route.kind is RouteKind.MODELS_LIST:
            return self._models_list(ctx)
        name = route.model
        if name is None:  # openai: the model is named in the body
            requested = ctx.json.get("model") if isinstance(ctx.json, dict) else None
            if not isinstance(requested, str):
                raise InvalidRequest("'model' must be a string naming the model")
            if not self.router.openai_model(requested):
                raise NotFound("unknown model")
            name = requested
        ctx.model_name = name
        ctx.model = self.config.models[name]
        for check in self.checks:
            await check(ctx)
        response = await self.backends[name].handle(ctx)
        if self.harden is not None:
            response = await self.harden(ctx, response)
        return await self._send(ctx, response)

    def _models_list(self, ctx: RequestContext) -> web.Response:
        allowed = self.authorize.allowed_models(ctx, self.config.models) if self.authorize else []
        created = 0
        data = [{"id": m, "object": "model", "created": created, "owned_by": "maas-gateway"} for m in allowed]
        payload = orjson.dumps({"object": "list", "data": data})
        ctx.decision = Decision(True, "models-list")  # answered, filtered per model by policy: an allow
        ctx.status, ctx.bytes_out = 200, len(payload)
        return web.Response(status=200, body=payload, headers={**ctx.response_headers, **JSON_HEADERS,
                                                               "X-Request-ID": ctx.request_id})

    async def _send(self, ctx: RequestContext, response: BackendResponse) -> web.StreamResponse:
        added = ctx.response_headers  # the gateway's own headers replace a backend's of the same name
        replaced = SET_BY_GATEWAY.union(name.lower() for name in added) if added else SET_BY_GATEWAY
        headers = [(k, v) for k, v in response.headers if k.lower() not in replaced]
        headers.extend(added.items())
        headers.append(("X-Request-ID", ctx.request_id))
        headers.append(("Content-Type", response.content_type))
        if response.stream is None:
            payload = response.body or b""
            ctx.status, ctx.bytes_out = response.status, len(payload)
            return web.Response(status=response.status, body=payload, headers=headers)
        out = web.StreamResponse(status=response.status, headers=headers)
        ctx.status = response.status
        try:
            await out.prepare(ctx.request)
            async for chunk in response.stream:
                if chunk:
                    await out.write(chunk)
                    ctx.bytes_out += len(chunk)
            await out.write_eof()
        except (ConnectionResetError, BrokenPipeError, asyncio.CancelledError):
            raise
        except Exception as exc:  # the answer has started: the only honest signal left is to cut the stream
            log.warning("stream to client cut (request %s): %s", ctx.request_id, exc)
            out.force_close()
        finally:
            if response.release is not None:
                result = response.release()
                if inspect.isawaitable(result):
                    await result
        return out

    def _error(self, ctx: RequestContext, exc: GatewayError) -> web.Response:
        ctx.status, ctx.error_type = exc.status, exc.type
        payload = error_body(exc.type, exc.message, ctx.request_id)
        ctx.bytes_out = len(payload)
        headers = {**ctx.response_headers, **exc.headers, **JSON_HEADERS, "X-Request-ID": ctx.request_id}
        return web.Response(status=exc.status, body=payload, headers=headers)


def _common_name(cert: dict[str, Any]) -> str | None:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


async def _maybe(obj: Any, method: str) -> Any:
    fn = getattr(obj, method, None)
    if fn is None:
        return None
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result
