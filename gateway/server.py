"""Running a gateway: sockets, TLS, the admin port, signals, graceful drain, workers.

SIGTERM/SIGINT stop accepting connections, let in-flight requests finish (up
to ``server.shutdown_timeout_s``), flush the audit log and exit 0. SIGHUP
reloads the policy and API keys. ``--workers N`` runs N processes that share
the port through SO_REUSEPORT; ``gateway.workers`` supervises them (relays
signals, replaces a worker that dies) and ``gateway.launch`` chooses between
the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .app import Gateway
from .config import GatewayConfig, TlsConfig
from .connection_limits import ClientLimits, ConnectionCounter, GuardedRequestHandler, head_refusal
from .http_door import HttpDoor, error_body
from .plugins import PluggedModel

log = logging.getLogger("maas.server")


class _JsonErrorRequestHandler(GuardedRequestHandler):
    """aiohttp answers unparseable HTTP itself (bad framing, two Content-Lengths); keep our JSON shape there too."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        kind = "invalid_request" if 400 <= status < 500 else "internal_error"
        text = "malformed HTTP request" if kind == "invalid_request" else "internal error"
        if status == 413:
            kind, text = "payload_too_large", "request too large"
        refusal = head_refusal(exc)  # 408/431 from the connection limits, or aiohttp's own header limits
        if refusal is not None:
            status, kind, text = refusal.status, refusal.type, refusal.message
        rid = os.urandom(12).hex()
        headers = {"Content-Type": "application/json", "Connection": "close", "X-Request-ID": rid}
        response = web.Response(status=status, body=error_body(kind, text, rid), headers=headers)
        response.force_close()
        return response


class _Server(web.Server):
    def __init__(self, handler: Any, *, counter: ConnectionCounter, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.counter = counter  # the listener's open connections, shared by all its handlers

    def __call__(self) -> RequestHandler:  # type: ignore[override]
        return _JsonErrorRequestHandler(self, loop=self._loop, counter=self.counter, **self._kwargs)


class _Site(web.TCPSite):
    """aiohttp's TCP site, with the TLS handshake held to the head deadline.

    A peer that opens a TLS connection and never finishes the handshake would
    otherwise hold it for asyncio's default 60 s, before our protocol (and its
    head deadline and connection caps) ever sees it.
    """

    __slots__ = ("_handshake_timeout_s",)

    def __init__(self, *args: Any, handshake_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handshake_timeout_s = handshake_timeout_s

    async def start(self) -> None:
        if self._ssl_context is None:
            return await super().start()
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
            ssl_handshake_timeout=self._handshake_timeout_s)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


def tls_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.client_ca_file is not None:
        context.load_verify_locations(cafile=str(tls.client_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def admin_app(gateway: Gateway) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        reasons = gateway.not_ready()
        if reasons:
            return web.json_response({"status": "not ready", "reasons": reasons}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=gateway.metrics.exposition(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def openapi(_: web.Request) -> web.Response:
        from .openapi import build_document

        return web.Response(body=orjson.dumps(build_document(gateway.config, gateway.backends)),
                            headers={"Content-Type": "application/json"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app


@dataclass
class Running:
    """A started gateway and its listeners (used by ``serve`` and by the tests)."""

    gateway: Gateway
    runners: list[web.BaseRunner]
    port: int
    admin_port: int | None
    connections: ConnectionCounter | None = None  # the main listener's open connections and refusals

    async def stop(self) -> None:
        """Graceful: stop listening, drain in-flight requests, then close backends and flush audit."""
        for runner in self.runners:
            await runner.cleanup()
        await self.gateway.close()


async def start(config: GatewayConfig, *, port: int | None = None, admin_port: int | None = None,
                reuse_port: bool = False, plugged: dict[str, PluggedModel] | None = None) -> Running:
    """Build the gateway (from ``plugged`` when the caller has already resolved its backends) and listen."""
    gateway = Gateway(config, plugged)
    try:
        await gateway.start()
    except BaseException:  # what it opened (the audit file's lock, upstream pools) must not outlive a failed start
        await gateway.close()
        raise
    server_cfg = config.server
    jwt = config.auth.jwt
    # headers up to 32 KiB reach us, so a too-long token is our 401 rather than the HTTP parser's 400
    max_field = max(32_768, (jwt.max_token_bytes if jwt else 0) * 2)
    counter = ConnectionCounter(ClientLimits.from_config(server_cfg))
    gateway.metrics.watch_connections(counter)
    door = HttpDoor(gateway, tls=server_cfg.tls is not None)
    server = _Server(door.handle, handler_cancellation=True, access_log=None, max_field_size=max_field,
                     keepalive_timeout=server_cfg.keepalive_timeout_s, counter=counter)
    runner = web.ServerRunner(server, shutdown_timeout=server_cfg.shutdown_timeout_s)
    runners: list[web.BaseRunner] = []
    try:
        await runner.setup()
        runners.append(runner)
        ssl_context = tls_context(server_cfg.tls) if server_cfg.tls else None
        site = _Site(runner, server_cfg.host, server_cfg.port if port is None else port,
                     ssl_context=ssl_context, reuse_port=reuse_port or None, backlog=1024,
                     handshake_timeout_s=server_cfg.header_timeout_s)
        await site.start()
        bound = _bound_port(runner)
        bound_admin = None
        if config.admin is not None:
            arunner = web.AppRunner(admin_app(gateway), access_log=None, shutdown_timeout=2)
            await arunner.setup()
            runners.append(arunner)
            asite = web.TCPSite(arunner, config.admin.host, config.admin.port if admin_port is None else admin_port,
                                reuse_port=reuse_port or None)
            await asite.start()
            bound_admin = _bound_port(arunner)
    except BaseException:
        for r in runners:
            await r.cleanup()
        await gateway.close()
        raise
    return Running(gateway, runners, bound, bound_admin, counter)


def _bound_port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            return int(addr[1])
    return 0


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: GatewayConfig, *, reuse_port: bool, ready: Any = None,
                 plugged: dict[str, PluggedModel] | None = None) -> None:
    running = await start(config, reuse_port=reuse_port, plugged=plugged)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(running.gateway.reload()))
    log.info("maas-gateway listening on %s:%s (admin %s)", config.server.host, running.port, running.admin_port)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("draining (up to %ss)", config.server.shutdown_timeout_s)
    await running.stop()
