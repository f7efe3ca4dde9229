"""Read the request body, whole and under a hard size limit, then parse JSON routes safely.

The one stage that reads the body. The door's ``read_body`` enforces the limit
while the body arrives: a chunked or lying body is cut off the moment it
passes ``max_body_bytes`` (a declared one over it was refused by the framing
stage before authentication), so an attacker can never make the gateway
buffer more than that; a body that stops arriving is refused after
``body_timeout_s`` instead of holding the connection forever.

A model's ``max_body_bytes`` replaces the server's on that model's routes: known
from the path (v2, raw), or, for an audio upload (``multipart/form-data``),
from its ``model`` field, read from the first bytes while the rest arrives.
"""

from __future__ import annotations

from typing import Mapping

from .. import jsonsafe, v2_binary
from ..errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from ..llm import multipart
from ..metrics import Metrics
from ..pipeline import RequestContext, RouteKind
from ..services import Services


def is_json_type(content_type: str) -> bool:
    main = content_type.partition(";")[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


class Body:
    name = "body"

    def __init__(self, max_bytes: int, timeout_s: float, metrics: Metrics | None = None,
                 model_limits: Mapping[str, int] | None = None) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.model_limits = dict(model_limits or {})  # models.X.max_body_bytes: that model's routes only
        self._largest = max([max_bytes, *self.model_limits.values()])

    def limit_for(self, model: str | None) -> int:
        return self.model_limits.get(model, self.max_bytes) if model is not None else self.max_bytes

    async def _multipart(self, ctx: RequestContext) -> None:
        """An audio upload: its model's ``max_body_bytes`` holds while it arrives (``model`` is sent first);
        only its text fields are decoded (``ctx.json``), the bytes forwarded are the bytes received."""
        request = ctx.request
        boundary = multipart.boundary_of(request.headers.get("Content-Type"))
        sniffer = multipart.ModelSniffer(boundary)

        def refine(head: bytes) -> int | None:
            model = sniffer.feed(head)
            return self.limit_for(model) if model is not None else None

        ctx.body = await request.read_body(self._largest, self.timeout_s, refine)
        ctx.json = fields = multipart.form_fields(ctx.body, boundary)
        model = fields.get("model")
        limit = self.limit_for(model if isinstance(model, str) else None)
        if len(ctx.body) > limit:  # a model field sent after the file: its limit, now that it is known
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")

    async def __call__(self, ctx: RequestContext) -> None:
        request = ctx.request
        route = ctx.route
        if request.method in ("GET", "HEAD") and not request.has_body:
            return
        if route is not None and route.kind is RouteKind.OPENAI and not route.json_body:
            await self._multipart(ctx)  # the OpenAI routes that take multipart/form-data (audio)
            return
        json_body = route is not None and route.json_body
        binary = None
        if json_body:
            content_type = request.headers.get("Content-Type")
            binary = v2_binary.binary_header(route, request.headers)  # a binary-tensor v2 request: that header
            if binary is not None:
                if not v2_binary.media_type_ok(content_type):
                    raise UnsupportedMediaType("Content-Type of a binary tensor request must be "
                                               "application/octet-stream (or none)")
            elif content_type is None:
                if route is None or route.kind not in v2_binary.ANY_MEDIA:  # stock Triton clients send none
                    raise UnsupportedMediaType("Content-Type must be application/json")
            elif not is_json_type(content_type) and not v2_binary.form_ok(route, content_type):
                raise UnsupportedMediaType("Content-Type must be application/json")
        ctx.body = await request.read_body(self.limit_for(route.model if route is not None else None), self.timeout_s)
        if json_body:
            if not ctx.body:
                raise InvalidRequest("request body is empty; expected JSON")
            try:
                if binary is not None:
                    ctx.binary_header = length = v2_binary.header_length(binary, len(ctx.body))
                    ctx.json = jsonsafe.parse(ctx.body[:length])
                else:
                    ctx.json = jsonsafe.parse(ctx.body)
            except jsonsafe.MalformedJson as exc:
                if self.metrics is not None:
                    model = route.model if route is not None else None
                    self.metrics.validation_failures.labels(model or "-", exc.reason).inc()
                raise


def build(services: Services) -> Body:
    server = services.config.server
    limits = {name: m.max_body_bytes for name, m in services.config.models.items() if m.max_body_bytes is not None}
    return Body(server.max_body_bytes, server.body_timeout_s, services.metrics, limits)
