"""The http backend: forwards an authorised request to an existing model server.

This is the gateway's hot path, so everything that does not depend on the
request is settled once, at construction or ``start``: the header drop set,
the protocol rewrites, one connection pool (``client.Pool``) bounded by
``max_connections``. Per request we build the header list, pick an upstream and
either read the answer whole or hand back a relay that streams it.

Timeouts follow nginx's ``proxy_read_timeout``: ``timeout_s`` is the longest
the upstream may stay silent, before its response headers or between two body
chunks, so a long token stream that keeps producing is never cut while a stuck
upstream is (504). A body read whole must also be complete within ``timeout_s``
of its headers (504) and no larger than ``max_response_bytes`` (502); a stream
is ended after ``max_stream_s``. Retries happen only when the request cannot
have reached the upstream (the connection was never established), or for
GET/HEAD.

What counts against an upstream's health is only what ``eject_on`` names: a
500 a caller's input provoked says nothing about the server, a refused
connection does. Everything else the upstream answered counts as alive.
"""

from __future__ import annotations

import ssl
import time
from typing import TYPE_CHECKING, Any

from gateway.backend import Backend, BackendEnv
from gateway.errors import InvalidRequest, MethodNotAllowed, Unavailable
from gateway.pipeline import BackendResponse, Usage

from .client import InvalidRequestLine, Pool, ReadTimeout, Response, UpstreamError
from .config import NEVER_FORWARDED_METHODS, HttpBackendConfig, eject_condition, raw_methods
from .failures import Failure, while_reading, while_sending
from .headers import RequestHeaders, response_headers
from .protocols import Protocol, answer_usage
from .relay import StreamRelay
from .upstreams import NO_METRIC, Upstream, UpstreamPool

if TYPE_CHECKING:
    from gateway.config import ModelConfig
    from gateway.pipeline import RequestContext

_OUTCOME_OF = {"connect": "error", "timeout": "timeout"}  # eject_on word -> the failure outcome it names


class HttpBackend(Backend):
    config_class = HttpBackendConfig
    config: HttpBackendConfig

    def __init__(self, name: str, model: ModelConfig, config: HttpBackendConfig, env: BackendEnv) -> None:
        super().__init__(name, model, config, env)
        server = env.server
        timeout_s = config.timeout_s if config.timeout_s is not None else server.upstream_timeout_s
        connect_s = (config.connect_timeout_s if config.connect_timeout_s is not None
                     else server.upstream_connect_timeout_s)
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_s
        self._protocol = Protocol(config.protocol, config.model_name)
        self._headers = RequestHeaders(config.headers)
        self._pool = UpstreamPool(
            name,
            config.upstreams,
            eject_after_failures=config.eject_after_failures,
            eject_for_s=config.eject_for_s,
            health_path=config.health_path,
            max_ejection_percent=config.max_ejection_percent,
            metrics=env.metrics,
        )
        conditions = {eject_condition(item) for item in config.eject_on}
        self._eject_outcomes = frozenset(_OUTCOME_OF[c] for c in conditions if c in _OUTCOME_OF)
        self._eject_statuses = frozenset(int(c) for c in conditions if c is not None and c.isdigit())
        self._max_response = config.max_response_bytes
        self._max_stream_s = config.max_stream_s
        # raw: only the configured methods; openai/v2: their routes fix the method, only the never-forwarded are refused
        self._methods = raw_methods(config) if config.protocol == "raw" else None
        self._retries = config.retries
        self._seconds: Any = (env.metrics.upstream_seconds.labels(name)
                              if env.metrics is not None else NO_METRIC)
        self._client: Pool | None = None

    # -- Backend contract ----------------------------------------------------

    def protocol(self) -> str:
        return self.config.protocol

    def raw_paths(self) -> list[str]:
        return list(self.config.paths) if self.config.protocol == "raw" else []

    def raw_methods(self) -> list[str]:
        return sorted(self._methods) if self._methods is not None else []

    def ready(self) -> bool:
        return self._client is not None and self._pool.ready()

    @property
    def upstreams(self) -> list[Upstream]:
        """The upstreams and their health (for tests and diagnostics)."""
        return self._pool.upstreams

    async def start(self) -> None:
        if self._client is not None:
            return
        self._client = Pool(
            limit=self.config.max_connections,
            keepalive_s=self.config.keepalive_timeout_s,
            connect_timeout_s=self._connect_timeout_s,
            ssl_context=self._ssl(),
        )
        self._pool.bind(self._client, list(self.config.headers.items()))

    async def close(self) -> None:
        await self._pool.close()
        if self._client is not None:
            client, self._client = self._client, None
            client.close()

    def _ssl(self) -> ssl.SSLContext:
        if not self.config.tls_verify:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            return context
        if self.config.tls_ca_file is not None:
            return ssl.create_default_context(cafile=str(self.config.tls_ca_file))
        return ssl.create_default_context()

    # -- the hot path ----------------------------------------------------------

    async def handle(self, ctx: RequestContext) -> BackendResponse:
        client = self._client
        if client is None:
            raise Unavailable("backend not started")
        request = ctx.request
        method = request.method
        methods = self._methods
        if (methods is not None and method not in methods) or method in NEVER_FORWARDED_METHODS:
            raise MethodNotAllowed(f"{method} is not forwarded to this model")
        out = self._protocol.outgoing(ctx)
        identity = ctx.identity
        headers = self._headers.build(
            request.headers, request_id=ctx.request_id, client_ip=request.peer, secure=request.secure,
            subject=identity.subject if identity is not None else None, roles=ctx.roles,
        )
        pool = self._pool
        data = out.body or None
        up = pool.pick()
        tried: list[Upstream] = []
        while True:
            try:
                resp = await self._send(client, up, method, out.target, data, headers)
                break
            except Failure as failure:
                self._failed(up, failure)
                tried.append(up)
                if failure.retryable and len(tried) <= self._retries:
                    try:
                        up = pool.pick(exclude=tried)  # always another upstream
                        continue
                    except Unavailable:
                        pass
                raise failure.error from None
        return await self._answer(ctx, up, resp, out.stream, out.usage, out.hide_usage, out.relay_usage)

    async def _send(
        self,
        client: Pool,
        up: Upstream,
        method: str,
        target: str,
        data: bytes | None,
        headers: list[tuple[str, str]],
    ) -> Response:
        started = time.monotonic()
        try:
            resp = await client.request(up.origin, method, target, headers, data, self._timeout_s)
        except UpstreamError as exc:
            raise while_sending(exc, method) from None
        except InvalidRequestLine:
            self._pool.abandoned(up)
            raise InvalidRequest("a header for the upstream would contain a control character") from None
        except BaseException:
            self._pool.abandoned(up)  # cancelled: no verdict on the upstream
            raise
        self._seconds.observe(time.monotonic() - started)
        return resp

    async def _answer(
        self, ctx: RequestContext, up: Upstream, resp: Response, stream: bool, scan_usage: bool, hide_usage: bool,
        relay_usage: bool = True,
    ) -> BackendResponse:
        status = resp.status
        pool = self._pool
        usage: Usage | None = None
        if scan_usage:  # an openai call: its usage travels back on the answer (or on the error raised after it)
            # answered 2xx: the model ran, charged its reported usage or else its whole reservation
            usage = Usage(answered=200 <= status < 300)
        content_type = resp.header("Content-Type") or "application/octet-stream"
        headers = response_headers(resp.headers)
        if content_type.startswith("text/event-stream") or (stream and not content_type.startswith("application/json")):
            # Scored on the headers: a stream may run for minutes. (A JSON error answer to a
            # stream request is read whole, so the client gets it with a Content-Length.)
            self._score(up, status)
            resp.expire_after(self._max_stream_s)
            # relay_usage False: the gateway's LLM stage reads this stream's usage (Responses, Messages, Ollama)
            relay = StreamRelay(resp, usage=usage if relay_usage else None, hide_usage=hide_usage,
                                on_failure=lambda: self._stream_broke(up, resp))
            ctx.on_finish(lambda _ctx: relay.release())
            return BackendResponse(status, headers, stream=relay, content_type=content_type, release=relay.release,
                                   usage=usage)
        try:
            body = await resp.read(max_bytes=self._max_response, total_s=self._timeout_s)
        except UpstreamError as exc:
            failure = while_reading(exc)
            self._failed(up, failure)
            raise _after(failure.error, usage) from None
        except BaseException as exc:  # cancelled (the client went away): what the model cost still counts
            pool.abandoned(up)
            _after(exc, usage)
            raise
        finally:
            resp.release()
        self._score(up, status)
        if usage is not None and usage.answered:
            usage.total_tokens = answer_usage(body)
        return BackendResponse(status, headers, body=body, content_type=content_type, usage=usage)

    def _score(self, up: Upstream, status: int) -> None:
        """An answer came: it counts against the upstream only if ``eject_on`` names its status."""
        if status >= 500:
            up.outcome["5xx"].inc()
        else:
            up.outcome["ok"].inc()
        if status in self._eject_statuses:
            self._pool.failed(up)
        else:
            self._pool.succeeded(up)

    def _failed(self, up: Upstream, failure: Failure) -> None:
        """Count a failed attempt; score it only if the failure can be the upstream's fault."""
        up.outcome[failure.outcome].inc()
        if failure.blames:
            self._verdict(up, failure.outcome)
        else:
            self._pool.abandoned(up)

    def _verdict(self, up: Upstream, outcome: str) -> None:
        """A failure before or while reading the answer ("error" / "timeout"): counted if ``eject_on`` says so."""
        if outcome in self._eject_outcomes:
            self._pool.failed(up)
        else:
            self._pool.abandoned(up)

    def _stream_broke(self, up: Upstream, resp: Response) -> None:
        self._verdict(up, "timeout" if isinstance(resp.error, ReadTimeout) else "error")


def _after(error: BaseException, usage: Usage | None) -> BaseException:
    """``error``, carrying the usage of a call whose answer had begun (``exc.usage``, read by the gateway)."""
    if usage is not None:
        error.usage = usage  # type: ignore[attr-defined]  # a GatewayError declares it; a CancelledError takes it
    return error
