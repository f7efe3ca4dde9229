"""Which upstream path a request goes to, and what body it carries, per protocol.

The gateway has already normalised the path and matched the route, so the
upstream gets that one normalised path (never a URL rebuilt from ``Host``).
Two rewrites exist: ``model_name`` (the upstream knows the model by another
name: the v2 path segment or the openai body's ``model``), and, for an openai
stream, asking the upstream to report token usage (``stream_options.include_usage:
true``) so the quota stage can charge real tokens. That is asked even of a client
that said ``false``: its usage chunk is then hidden from it (see ``relay``), and
the budget cannot be dodged by turning usage off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from gateway.llm.multipart import boundary_of, replace_field
from gateway.llm.paths import OLLAMA_CHAT, OLLAMA_GENERATE
from gateway.openai_paths import STREAMING_PATHS
from gateway.pipeline import RequestContext, RouteKind

OLLAMA_STREAMING = frozenset({OLLAMA_CHAT, OLLAMA_GENERATE})  # NDJSON unless the body says "stream": false
V2_KINDS = frozenset({RouteKind.V2_INFER, RouteKind.V2_METADATA, RouteKind.V2_READY, RouteKind.V2_GENERATE,
                      RouteKind.V2_GENERATE_STREAM})


@dataclass(slots=True)
class Outgoing:
    """One request as it will be sent upstream (minus the upstream's base URL and headers)."""

    target: str  # path and query, percent-encoded
    body: bytes
    stream: bool  # the client asked the upstream for a stream (openai ``"stream": true``)
    usage: bool  # watch the answer for openai token usage
    hide_usage: bool = False  # the gateway asked for stream usage the client did not: keep it from the client
    relay_usage: bool = True  # the relay reads the stream's usage (chat/completions); else gateway.llm does


class Protocol:
    """Turns a routed request into an ``Outgoing`` for one backend."""

    __slots__ = ("name", "_model_name", "_model_segment")

    def __init__(self, name: str, model_name: str | None) -> None:
        self.name = name
        self._model_name = model_name
        self._model_segment = quote(model_name, safe="-._~") if model_name else None

    def outgoing(self, ctx: RequestContext) -> Outgoing:
        body = ctx.body
        path = ctx.path
        kind = ctx.route.kind if ctx.route is not None else RouteKind.RAW
        stream = usage = hide = False
        relay_usage = True
        if kind is RouteKind.OPENAI or kind is RouteKind.OLLAMA:
            usage = True  # the answer carries a Usage (the relay reads chat/completions, gateway.llm the others)
            body, stream = self._openai_body(ctx, body)
            # only chat/completions streams carry a usage chunk the gateway asked for on the client's behalf
            hide = path in STREAMING_PATHS and not client_asked_usage(ctx.json)
            relay_usage = path in STREAMING_PATHS
        elif kind in V2_KINDS:
            stream = kind is RouteKind.V2_GENERATE_STREAM  # SSE, relayed as it comes
            if self._model_segment is not None:
                path = self._v2_path(path)
        query = ctx.request.query
        target = f"{path}?{query}" if query else path
        return Outgoing(target, body, stream, usage, hide, relay_usage)

    def _v2_path(self, path: str) -> str:
        # /v2/models/{model}[/...] -> /v2/models/{model_name}[/...]
        parts = path.split("/", 4)
        if len(parts) >= 4 and parts[1] == "v2" and parts[2] == "models":
            parts[3] = self._model_segment  # type: ignore[assignment]
            return "/".join(parts)
        return path

    def _openai_body(self, ctx: RequestContext, body: bytes) -> tuple[bytes, bool]:
        doc = ctx.json
        if not isinstance(doc, dict):
            return body, False
        if ctx.route is not None and not ctx.route.json_body:  # multipart (audio): the upload passes as it came
            if self._model_name is not None and doc.get("model") != self._model_name:
                boundary = boundary_of(ctx.request.headers.get("Content-Type"))
                body = replace_field(body, boundary, "model", self._model_name)
            return body, False
        stream = doc.get("stream") is True
        if ctx.route is not None and ctx.route.kind is RouteKind.OLLAMA:
            stream = doc.get("stream") is not False and ctx.path in OLLAMA_STREAMING  # Ollama streams by default
        changes: dict[str, Any] = {}
        if self._model_name is not None and doc.get("model") != self._model_name:
            changes["model"] = self._model_name
        if stream and ctx.path in STREAMING_PATHS and not client_asked_usage(doc):
            options = doc.get("stream_options")
            changes["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        if changes:
            body = orjson.dumps({**doc, **changes})
        return body, stream


def client_asked_usage(doc: Any) -> bool:
    """Whether an openai request itself asked for stream usage (``stream_options.include_usage: true``).

    When it did not, the gateway asks for it anyway and the relay hides it."""
    if not isinstance(doc, dict):
        return False
    options = doc.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def total_tokens(doc: Any) -> int | None:
    """``usage.total_tokens`` of a decoded openai answer (or stream chunk), if it carries one
    (else prompt + completion tokens, for an upstream that leaves the total out)."""
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return None
    total = usage.get("total_tokens")
    if type(total) is int and total >= 0:
        return total
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is int and type(completion) is int and prompt >= 0 and completion >= 0:
        return prompt + completion
    return None


def answer_usage(body: bytes) -> int | None:
    """Token usage from a whole (non-streamed) openai answer; None when absent or unparsable."""
    if b'"usage"' not in body:
        return None
    try:
        return total_tokens(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None
