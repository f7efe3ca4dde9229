"""Routing: what a request is, and which model it is for. The one home of both decisions.

Two steps of one idea, run in this order by the pipeline:

* ``Route`` (after authenticate): the route of the normalised path and method,
  from the route table (``gateway.routing``); an unknown route is 404, a known
  one with another method 405. It runs after authentication so that nobody
  learns which models exist without credentials.
* ``Model`` (after body): the model the request is for: the one its path names,
  or, for the OpenAI and Ollama routes, the one its body names (``"model"``;
  an audio upload's form field), which can only be read once the body is, and
  only among the models of the protocol that serves the route. ``GET /v1/models``
  and ``/api/tags`` name none; ``/v1/responses/{id}`` gets the model of the id's
  record from the LLM stage (``gateway.llm.stage``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from ..errors import InvalidRequest, NotFound
from ..pipeline import RouteKind

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..pipeline import RequestContext
    from ..routing import Router


class Route:
    name = "route"

    def __init__(self, router: Router) -> None:
        self.router = router

    async def __call__(self, ctx: RequestContext) -> None:
        ctx.route = self.router.match(ctx.request.method, ctx.path)


class Model:
    name = "model"

    def __init__(self, router: Router, models: Mapping[str, ModelConfig]) -> None:
        self.router = router
        self.models = models

    async def __call__(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is None:
            raise NotFound("unknown route")
        name = route.model
        if name is None:
            if route.kind is not RouteKind.OPENAI and route.kind is not RouteKind.OLLAMA:
                # GET /v1/models, /api/tags: about every model the caller may read, none in particular;
                # /v1/responses/{id}: the model of the id's record (gateway.llm.stage, next)
                return
            document = ctx.json
            requested = document.get("model") if isinstance(document, dict) else None
            if not isinstance(requested, str):
                raise InvalidRequest("'model' must be a string naming the model")
            if not self.router.serves(route.kind, requested):
                raise NotFound("unknown model")
            name = requested
        ctx.model_name = name
        ctx.model = self.models[name]


def build(router: Router, models: Mapping[str, ModelConfig]) -> tuple[Route, Model]:
    return Route(router), Model(router, models)
