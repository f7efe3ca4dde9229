"""The LLM stage: response-id ownership before the backend, usage and ids from its answer after.

Before (runs right after the model stage, before authorisation):

* ``/v1/responses/{id}[...]``: the id's record names its creator and model;
  anyone else, or an id the gateway never saw or whose record expired, gets
  404 and nothing is forwarded. The caller's own id is then authorised like
  any request on the recorded model (``read`` or ``infer``);
* ``POST /v1/responses`` naming ``previous_response_id`` or ``conversation``:
  the same rule for the id it names.

After (``answer``, on the backend's answer): a 2xx Responses answer's id (and
a conversation id it reports) is recorded for the caller, from the JSON body
or, for a stream, from ``response.created`` before that event is relayed; a
deleted id is forgotten. For the surfaces whose usage the HTTP relay does not
read (everything but chat/completions/embeddings), the tokens the answer
reports are put on ``Usage`` (a stream's as its events pass, see ``events``),
so the quota stage settles every surface alike.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping

import orjson

from ..errors import InvalidRequest, NotFound, PayloadTooLarge
from ..pipeline import RouteKind
from ..usage import Usage
from . import paths
from .events import WATCHERS, WatchedStream
from .ownership import DEFAULT_TTL_S, Owners
from .surfaces import surface_for

if TYPE_CHECKING:
    from ..config import ModelConfig
    from ..pipeline import BackendResponse, RequestContext

RESPONSE = "response"
CONVERSATION = "conversation"
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,256}")
UNKNOWN_RESPONSE = "unknown response id"


def response_id_of(path: str) -> str:
    """The ``{id}`` of ``/v1/responses/{id}[/...]`` (the router matched the shape)."""
    return path[len(paths.RESPONSES_PREFIX):].partition("/")[0]


class LlmStage:
    name = "llm"

    def __init__(self, owners: Owners, models: Mapping[str, ModelConfig]) -> None:
        self.owners = owners
        self.models = models

    def _ttl(self, model: str | None) -> int:
        config = self.models.get(model or "")
        ttl = getattr(config, "responses_ttl_s", None)
        return int(ttl) if isinstance(ttl, int) and ttl > 0 else DEFAULT_TTL_S

    # ---- before the backend

    async def __call__(self, ctx: RequestContext) -> None:
        route = ctx.route
        if route is None:
            return
        model = ctx.model
        limit = model.max_body_bytes if model is not None else None
        if limit is not None and len(ctx.body) > limit:
            # a JSON body names its model anywhere, so it was read under the server's limit; the model's own,
            # when smaller, holds from here (multipart and path-model routes were held to it while reading)
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        if route.kind is RouteKind.RESPONSE_ID:
            await self._resolve_id(ctx)
        elif route.kind is RouteKind.OPENAI and ctx.path == paths.RESPONSES and isinstance(ctx.json, dict):
            await self._check_named_ids(ctx, ctx.json)

    async def _owned(self, ctx: RequestContext, kind: str, rid: Any) -> str:
        """The model of ``rid`` when the caller created it; else 404 (never 403: nothing about it is told)."""
        identity = ctx.identity
        if identity is None or not isinstance(rid, str) or not _ID.fullmatch(rid):
            raise NotFound(UNKNOWN_RESPONSE if kind == RESPONSE else "unknown conversation")
        record = await self.owners.owner(kind, rid)
        if record is None or record[0] != identity.subject or record[1] not in self.models:
            raise NotFound(UNKNOWN_RESPONSE if kind == RESPONSE else "unknown conversation")
        return record[1]

    async def _resolve_id(self, ctx: RequestContext) -> None:
        model = await self._owned(ctx, RESPONSE, response_id_of(ctx.path))
        ctx.model_name = model
        ctx.model = self.models[model]

    async def _check_named_ids(self, ctx: RequestContext, doc: dict[str, Any]) -> None:
        previous = doc.get("previous_response_id")
        conversation = doc.get("conversation")
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        for name, value in (("previous_response_id", previous), ("conversation", conversation)):
            if value is not None and not isinstance(value, str):  # checked here: ownership runs before validate
                raise InvalidRequest(f"/{name}: must be a string id")
        if previous is not None:
            if await self._owned(ctx, RESPONSE, previous) != ctx.model_name:
                raise NotFound(UNKNOWN_RESPONSE)  # stored for another model: that model's server does not have it
        if conversation is not None:
            await self._owned(ctx, CONVERSATION, conversation)

    # ---- after the backend

    async def answer(self, ctx: RequestContext, response: BackendResponse) -> BackendResponse:
        route = ctx.route
        if route is None:
            return response
        ok = 200 <= response.status < 300
        if route.kind is RouteKind.RESPONSE_ID:
            if ok and ctx.request.method == "DELETE" and not ctx.path.endswith(("/cancel", "/input_items")):
                await self.owners.forget(RESPONSE, response_id_of(ctx.path))
            return response
        if route.kind is not RouteKind.OPENAI and route.kind is not RouteKind.OLLAMA:
            return response
        surface = surface_for(ctx.path)
        if surface is None:
            return response
        owns_ids = surface.name == "responses" and ok
        if not surface.gateway_usage and not owns_ids:
            return response
        usage = response.usage
        if usage is None:
            usage = response.usage = Usage(answered=ok)
        if response.stream is not None:
            watcher_class = WATCHERS.get(surface.name)
            if watcher_class is not None and ok:
                watcher = watcher_class(usage)
                claim = self._claimer(ctx, watcher) if owns_ids else None
                response.stream = WatchedStream(response.stream, watcher, claim)
            return response
        body = response.body
        if not ok or not body or not response.content_type.startswith("application/json"):
            return response
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return response
        if surface.gateway_usage:
            total = surface.usage(doc)
            if total is not None:
                usage.total_tokens = total
        if owns_ids and isinstance(doc, dict):
            await self._claim_answer(ctx, doc)
        return response

    def _claimer(self, ctx: RequestContext, watcher: Any) -> Any:
        async def claim(rid: str) -> None:
            await self._claim(ctx, RESPONSE, rid)
            conversation = getattr(watcher, "conversation", None)
            if isinstance(conversation, str):  # a conversation the stream's response.created reports
                await self._claim(ctx, CONVERSATION, conversation)
        return claim

    async def _claim(self, ctx: RequestContext, kind: str, rid: str) -> None:
        identity = ctx.identity
        if identity is None or ctx.model_name is None or not _ID.fullmatch(rid):
            return
        await self.owners.claim(kind, rid, identity.subject, ctx.model_name, self._ttl(ctx.model_name))

    async def _claim_answer(self, ctx: RequestContext, doc: dict[str, Any]) -> None:
        rid = doc.get("id")
        if isinstance(rid, str):
            await self._claim(ctx, RESPONSE, rid)
        conversation = doc.get("conversation")
        if isinstance(conversation, dict):
            conversation = conversation.get("id")
        if isinstance(conversation, str):
            await self._claim(ctx, CONVERSATION, conversation)
