"""``GET /v1/models`` and ``GET /api/tags``: the gateway's own answers, listing what authorisation let the caller see.

It stands where a backend would for a model route: the authorise stage put the
models the caller may ``read`` on ``ctx.visible_models``; this only writes them
out, in the OpenAI shape, or in Ollama's (``/api/tags``: only the ``ollama``
models, never an upstream's own list, which would name models nobody may read).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Collection

import orjson

from .pipeline import BackendResponse, RouteKind

if TYPE_CHECKING:
    from .pipeline import RequestContext


class ModelsList:
    name = "models-list"

    def __init__(self, ollama_models: Collection[str] = ()) -> None:
        self.ollama_models = frozenset(ollama_models)

    async def handle(self, ctx: RequestContext) -> BackendResponse:
        route = ctx.route
        if route is not None and route.kind is RouteKind.OLLAMA_TAGS:
            models = [{"name": m, "model": m, "modified_at": "1970-01-01T00:00:00Z", "size": 0, "digest": "",
                       "details": {}} for m in ctx.visible_models if m in self.ollama_models]
            return BackendResponse(200, body=orjson.dumps({"models": models}))
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "maas-gateway"} for m in ctx.visible_models]
        return BackendResponse(200, body=orjson.dumps({"object": "list", "data": data}))
