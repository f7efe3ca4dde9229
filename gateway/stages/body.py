"""Read the request body under a hard size limit, then parse JSON routes safely.

The limit is enforced while the body streams in: a declared Content-Length
over the limit is refused before a byte is read, and a chunked or lying body
is cut off the moment it passes the limit, so an attacker can never make the
gateway buffer more than ``max_body_bytes``. A body that stops arriving is
refused after ``body_timeout_s`` instead of holding the connection forever.
"""

from __future__ import annotations

import asyncio

from .. import jsonsafe
from ..errors import InvalidRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from ..pipeline import RequestContext, RouteKind
from ..metrics import Metrics
from ..services import Services

READ_CHUNK = 65_536  # bytes per read from the socket buffer


def is_json_type(content_type: str) -> bool:
    main = content_type.partition(";")[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


def check_declared_length(ctx: RequestContext, limit: int) -> None:
    """Refuse an oversized declared body before authentication even runs: nothing is read."""
    declared = ctx.request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")


class Body:
    name = "body"

    def __init__(self, max_bytes: int, timeout_s: float, metrics: Metrics | None = None) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.metrics = metrics

    async def __call__(self, ctx: RequestContext) -> None:
        request = ctx.request
        route = ctx.route
        if request.method in ("GET", "HEAD") and not request.body_exists:
            return
        check_declared_length(ctx, self.max_bytes)
        if route is not None and route.json_body:
            content_type = request.headers.get("Content-Type")
            if content_type is None:
                if route.kind is not RouteKind.V2_INFER:  # stock Triton clients send none
                    raise UnsupportedMediaType("Content-Type must be application/json")
            elif not is_json_type(content_type):
                raise UnsupportedMediaType("Content-Type must be application/json")
        content = request.content
        if content.is_eof() and content.exception() is None:
            # already all received (the usual small body): take it without the timeout machinery (~5 us/request)
            ctx.body = self._take_buffered(ctx, content.read_nowait(-1))
        else:
            try:
                async with asyncio.timeout(self.timeout_s):  # no extra Task per request, unlike wait_for on 3.11
                    ctx.body = await self._read(ctx)
            except TimeoutError:
                raise RequestTimeout("request body not received in time") from None
        if route is not None and route.json_body:
            if not ctx.body:
                raise InvalidRequest("request body is empty; expected JSON")
            try:
                ctx.json = jsonsafe.parse(ctx.body)
            except jsonsafe.MalformedJson as exc:
                if self.metrics is not None:
                    self.metrics.validation_failures.labels(route.model or "-", exc.reason).inc()
                raise

    def _take_buffered(self, ctx: RequestContext, data: bytes) -> bytes:
        """A body aiohttp has already received whole: the same checks ``_read`` makes as it streams."""
        declared = ctx.request.content_length
        if declared is not None:
            if len(data) != declared:
                raise InvalidRequest("request body shorter than its Content-Length")
        elif len(data) > self.max_bytes:
            raise PayloadTooLarge(f"request body exceeds {self.max_bytes} bytes")
        return data

    async def _read(self, ctx: RequestContext) -> bytes:
        content = ctx.request.content
        limit = self.max_bytes
        declared = ctx.request.content_length
        if declared is not None:
            try:
                data = await content.readexactly(declared)
            except asyncio.IncompleteReadError:
                raise InvalidRequest("request body shorter than its Content-Length") from None
            return data  # bytes past Content-Length are parsed as the next request (and refused there)
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = await content.read(READ_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)


def build(services: Services) -> Body:
    server = services.config.server
    return Body(server.max_body_bytes, server.body_timeout_s, services.metrics)
