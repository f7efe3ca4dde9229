"""Helpers for the http backend's tests: request contexts and hand-made upstream misbehaviour."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import orjson

from backends.http import HttpBackend, HttpBackendConfig
from gateway.backend import BackendEnv
from gateway.config import ServerConfig
from gateway.metrics import Metrics
from gateway.pipeline import Decision, Identity, RequestContext, Route, RouteKind
from gateway.request import BufferedRequest
from tests.clock import FakeClock

ROUTES = {
    RouteKind.V2_INFER: ("POST", "infer", True),
    RouteKind.V2_METADATA: ("GET", "read", False),
    RouteKind.V2_READY: ("GET", "read", False),
    RouteKind.OPENAI: ("POST", "infer", True),
    RouteKind.RAW: ("POST", "infer", False),
}


def make_ctx(
    kind: RouteKind,
    path: str,
    *,
    model: str | None = "digits",
    query: str = "",
    body: bytes = b"",
    json: Any = None,
    headers: list[tuple[str, str]] | None = None,
    method: str | None = None,
    subject: str | None = "alice",
    roles: tuple[str, ...] = ("analyst",),
    decision_roles: tuple[str, ...] | None = None,
    client_ip: str = "203.0.113.7",
    secure: bool = False,
    request_id: str = "req-1",
) -> RequestContext:
    """A RequestContext as the stages before the backend would leave it."""
    default_method, action, json_body = ROUTES[kind]
    method = method or default_method
    if json is not None and not body:
        body = orjson.dumps(json)
    request = BufferedRequest(method, path, query=query, headers=headers or [], peer=client_ip, secure=secure,
                              body=body)
    identity = Identity(subject, roles, {"sub": subject, "roles": list(roles)}, "jwt") if subject is not None else None
    decision = Decision(True, "test-rule", roles=decision_roles) if decision_roles is not None else None
    return RequestContext(
        request=request, request_id=request_id, started=time.monotonic(),
        path=path, route=Route(kind, action, model if kind is not RouteKind.OPENAI else None, json_body),
        model_name=model, identity=identity, body=body, json=json, decision=decision,
    )


def make_backend(
    upstreams: list[str],
    *,
    protocol: str = "v2",
    name: str = "digits",
    metrics: Metrics | None = None,
    clock: FakeClock | None = None,
    **options: Any,
) -> HttpBackend:
    """An http backend over ``upstreams``; with ``clock``, its upstream pool (ejection, probes) runs on that clock."""
    config = HttpBackendConfig(type="http", protocol=protocol, upstreams=upstreams, **options)  # type: ignore[arg-type]
    problem = config.validate()
    assert problem is None, problem
    backend = HttpBackend(name, None, config, BackendEnv(server=ServerConfig(upstream_timeout_s=5), metrics=metrics))  # type: ignore[arg-type]
    if clock is not None:
        backend._pool.clock = clock
        backend._pool.sleep = clock.sleep
    return backend


async def read_all(response: Any) -> bytes:
    if response.stream is None:
        return response.body
    return b"".join([chunk async for chunk in response.stream])


class RawServer:
    """A TCP server that answers with whatever ``script`` does: for upstreams that break HTTP."""

    def __init__(self, script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self._script = script
        self._server: asyncio.base_events.Server | None = None
        self.connections = 0

    async def start(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self._script(reader, writer)
            finally:
                writer.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")
