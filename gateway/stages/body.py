"""Read the request body, whole and under a hard size limit, then parse JSON routes safely.

The one stage that reads the body. The door's ``read_body`` enforces the limit
while the body arrives: a chunked or lying body is cut off the moment it
passes ``max_body_bytes`` (a declared one over it was refused by the framing
stage before authentication), so an attacker can never make the gateway
buffer more than that; a body that stops arriving is refused after
``body_timeout_s`` instead of holding the connection forever.
"""

from __future__ import annotations

from .. import jsonsafe
from ..errors import InvalidRequest, UnsupportedMediaType
from ..metrics import Metrics
from ..pipeline import RequestContext, RouteKind
from ..services import Services


def is_json_type(content_type: str) -> bool:
    main = content_type.partition(";")[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


class Body:
    name = "body"

    def __init__(self, max_bytes: int, timeout_s: float, metrics: Metrics | None = None) -> None:
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.metrics = metrics

    async def __call__(self, ctx: RequestContext) -> None:
        request = ctx.request
        route = ctx.route
        if request.method in ("GET", "HEAD") and not request.has_body:
            return
        json_body = route is not None and route.json_body
        if json_body:
            content_type = request.headers.get("Content-Type")
            if content_type is None:
                if route is None or route.kind is not RouteKind.V2_INFER:  # stock Triton clients send none
                    raise UnsupportedMediaType("Content-Type must be application/json")
            elif not is_json_type(content_type):
                raise UnsupportedMediaType("Content-Type must be application/json")
        ctx.body = await request.read_body(self.max_bytes, self.timeout_s)
        if json_body:
            if not ctx.body:
                raise InvalidRequest("request body is empty; expected JSON")
            try:
                ctx.json = jsonsafe.parse(ctx.body)
            except jsonsafe.MalformedJson as exc:
                if self.metrics is not None:
                    model = route.model if route is not None else None
                    self.metrics.validation_failures.labels(model or "-", exc.reason).inc()
                raise


def build(services: Services) -> Body:
    server = services.config.server
    return Body(server.max_body_bytes, server.body_timeout_s, services.metrics)
