"""``GET /v1/models``: the gateway's own answer, in the OpenAI shape, listing what authorisation let the caller see.

It stands where a backend would for a model route: the authorise stage put the
models the caller may ``read`` on ``ctx.visible_models``; this only writes them out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from .pipeline import BackendResponse

if TYPE_CHECKING:
    from .pipeline import RequestContext


class ModelsList:
    name = "models-list"

    async def handle(self, ctx: RequestContext) -> BackendResponse:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "maas-gateway"} for m in ctx.visible_models]
        return BackendResponse(200, body=orjson.dumps({"object": "list", "data": data}))
