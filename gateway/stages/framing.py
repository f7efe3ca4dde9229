"""Framing: refuse a request whose headers could be read two ways, before anyone reads them.

Runs first, before authentication, and is the one home of these checks:

* a header that may be sent once (credentials, framing, the request id) sent
  twice is a smuggling attempt, never resolved by taking the first: 400;
* a ``Transfer-Encoding`` other than ``chunked`` is a coding we would not
  apply: 400;
* a declared body over ``server.max_body_bytes`` is refused (413) before a byte
  of it is read, and before authentication, so nobody can make the gateway wait
  for a body it will refuse anyway.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidRequest, PayloadTooLarge

if TYPE_CHECKING:
    from ..pipeline import RequestContext
    from ..services import Services

# Headers a request may carry once. Authenticate reads the credentials with ``get``: this stage has refused a second.
SINGLETON_HEADERS = ("Authorization", "X-API-Key", "Content-Length", "Content-Type", "Host",
                     "Transfer-Encoding", "X-Request-ID", "Inference-Header-Content-Length")
_NONE: tuple[str, ...] = ()


class Framing:
    name = "framing"

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    async def __call__(self, ctx: RequestContext) -> None:
        request = ctx.request
        headers = request.headers
        for name in SINGLETON_HEADERS:
            if len(headers.getall(name, _NONE)) > 1:
                raise InvalidRequest(f"header {name} sent more than once")
        coding = headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            raise InvalidRequest("unsupported Transfer-Encoding")
        declared = request.declared_length
        if declared is not None and declared > self.max_body_bytes:
            raise PayloadTooLarge(f"request body exceeds {self.max_body_bytes} bytes")


def build(services: Services) -> Framing:
    # a model's own max_body_bytes (audio uploads) may be larger: the body stage holds each route to its own
    limits = [m.max_body_bytes for m in services.config.models.values() if m.max_body_bytes is not None]
    return Framing(max([services.config.server.max_body_bytes, *limits]))
