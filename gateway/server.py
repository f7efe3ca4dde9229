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
import signal
import ssl
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .app import Gateway
from .config import GatewayConfig, TlsConfig
from .connection_limits import ClientLimits, ConnectionCounter
from .http_connection import ClientConnection
from .http_door import HttpDoor
from .plugins import PluggedModel

log = logging.getLogger("maas.server")


class PublicListener:
    """The public port: accepts connections, gives each a ``ClientConnection``, drains them on stop."""

    def __init__(self, door: HttpDoor, counter: ConnectionCounter, *, keepalive_timeout_s: float) -> None:
        self.door = door
        self.counter = counter
        self.keepalive_timeout_s = keepalive_timeout_s
        self.draining = False  # answers say Connection: close; idle connections are closed
        self._connections: set[ClientConnection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._emptied: asyncio.Event | None = None

    def opened(self, connection: ClientConnection) -> None:
        self._connections.add(connection)

    def closed(self, connection: ClientConnection) -> None:
        self._connections.discard(connection)
        if not self._connections and self._emptied is not None:
            self._emptied.set()

    async def listen(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None, reuse_port: bool,
                     handshake_timeout_s: float) -> int:
        """Listen; the bound port. The TLS handshake is held to the head deadline: a peer that opens a
        TLS connection and never finishes the handshake would otherwise hold it for asyncio's 60 s,
        before the connection (and its head deadline and caps) ever sees it."""
        loop = asyncio.get_running_loop()
        self._server = server = await loop.create_server(
            lambda: ClientConnection(self), host, port, backlog=1024, reuse_address=True,
            reuse_port=reuse_port or None, ssl=ssl_context,
            ssl_handshake_timeout=handshake_timeout_s if ssl_context is not None else None)
        return int(server.sockets[0].getsockname()[1]) if server.sockets else port

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting; let requests under way finish (up to ``timeout_s``); then close what is left."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        self._emptied = asyncio.Event()
        for connection in list(self._connections):
            connection.close_when_idle()
        if self._connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._emptied.wait(), timeout_s)
        left = [connection.task for connection in self._connections if connection.task is not None]
        for connection in list(self._connections):
            connection.abort()
        if left:  # their cleanups (quota, audit) run before the gateway closes
            await asyncio.wait(left, timeout=2.0)


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
    listener: PublicListener
    runners: list[web.BaseRunner]  # the admin port's
    port: int
    admin_port: int | None
    connections: ConnectionCounter | None = None  # the main listener's open connections and refusals

    async def stop(self) -> None:
        """Graceful: stop listening, drain in-flight requests, then close backends and flush audit."""
        await self.listener.stop(self.gateway.config.server.shutdown_timeout_s)
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
    counter = ConnectionCounter(ClientLimits.from_config(server_cfg))
    gateway.metrics.watch_connections(counter)
    listener = PublicListener(HttpDoor(gateway), counter, keepalive_timeout_s=server_cfg.keepalive_timeout_s)
    runners: list[web.BaseRunner] = []
    try:
        ssl_context = tls_context(server_cfg.tls) if server_cfg.tls else None
        bound = await listener.listen(server_cfg.host, server_cfg.port if port is None else port,
                                      ssl_context=ssl_context, reuse_port=reuse_port,
                                      handshake_timeout_s=server_cfg.header_timeout_s)
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
        await listener.stop(0)
        for r in runners:
            await r.cleanup()
        await gateway.close()
        raise
    return Running(gateway, listener, runners, bound, bound_admin, counter)


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
