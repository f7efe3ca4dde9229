"""The request context and the contract every pipeline stage keeps.

A request flows through ordered stages: request id -> framing -> path ->
authenticate -> route -> body -> model -> llm -> authorise -> quota -> validate ->
backend -> harden -> audit. Each stage reads the transport-neutral request
(``ctx.request``, see ``gateway.request``) and what earlier stages wrote to the
``RequestContext``, and writes its own fields there (each field below names
its writer); it either returns or raises a ``GatewayError``. A stage never
writes a response and never reaches into another stage's objects: the context
is the only thing they share. A backend reads the context and answers with a
``BackendResponse``; it writes nothing on the context.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Protocol

import numpy as np

# at run time, not only for the type checker: compiled (gateway/native.py), a dataclass needs its fields' types
from .config import ModelConfig
from .request import Request
from .usage import Usage as Usage  # re-exported: a backend answers with it


class RouteKind(enum.Enum):
    """What a request is, by its normalised path and method."""

    V2_INFER = "v2_infer"  # POST /v2/models/{model}/infer
    V2_METADATA = "v2_metadata"  # GET /v2/models/{model}
    V2_READY = "v2_ready"  # GET /v2/models/{model}/ready
    V2_GENERATE = "v2_generate"  # POST /v2/models/{model}/generate (Triton generate extension)
    V2_GENERATE_STREAM = "v2_generate_stream"  # POST /v2/models/{model}/generate_stream (SSE)
    V2_SERVER = "v2_server"  # GET /v2, /v2/health/live, /v2/health/ready: answered by the gateway itself
    OPENAI = "openai"  # POST /v1/chat/completions, /v1/responses, /v1/messages, ... (gateway.llm.surfaces)
    MODELS_LIST = "models_list"  # GET /v1/models
    RAW = "raw"  # a raw backend's configured path
    OLLAMA = "ollama"  # POST /api/chat | /api/generate | /api/embed | /api/embeddings | /api/show (model from the body)
    OLLAMA_TAGS = "ollama_tags"  # GET /api/tags: the gateway's own list of the ollama models the caller may read
    RESPONSE_ID = "response_id"  # /v1/responses/{id}[/input_items|/cancel]: model and owner from the id's record


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    action: str  # "infer" | "read"
    model: str | None  # known from the path; None when it comes from the body (openai)
    json_body: bool  # the body must be JSON


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as proven by the authenticate stage."""

    subject: str
    roles: tuple[str, ...]
    claims: Mapping[str, Any]  # every token claim (or API key attrs), plus sub and roles
    method: str  # "jwt" | "api_key" | "mtls"
    credential_id: str | None = None  # API key id, JWT kid: for audit, never the secret
    # Names the credential for the policy decision memo: set by the authenticator that built the identity,
    # "<method>:<credential>", equal only for credentials that yield equal identities; None: never memoised.
    cache_key: str | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """The authorise stage's verdict; ``rule`` is the deciding rule id or ``default-deny``."""

    allowed: bool
    rule: str
    roles: tuple[str, ...] = ()  # the subject's effective roles after inheritance
    shadow: tuple[tuple[str, bool], ...] = ()  # (shadow rule id, would-allow) that matched


@dataclass(slots=True)
class RequestContext:
    """Everything the stages know about one request. Created per request, never shared."""

    request: Request  # the door's transport-neutral request: method, path, headers, peer, certificate, body
    request_id: str
    started: float  # time.monotonic() at arrival
    path: str = ""  # path stage: the normalised path, what every check and the backend see
    route: Route | None = None  # route stage
    model_name: str | None = None  # model stage: from the path, or the body of an openai request
    model: ModelConfig | None = None  # model stage
    identity: Identity | None = None  # authenticate stage
    body: bytes = b""  # body stage: the body as received (after the size limit); what the backend forwards
    json: Any = None  # body stage: the parsed body, for JSON routes (a binary v2 request: its JSON header)
    # body stage, binary v2 infer (``gateway.v2_binary``): the JSON header's length; the tensors' bytes follow it
    binary_header: int | None = None
    # validate stage, v2 infer: the checked floating-point inputs of ``json``, by input name, as flat float64
    # arrays (the same numbers, converted once); a backend may take them instead of converting ``json`` again
    validated_inputs: Mapping[str, np.ndarray] | None = None
    decision: Decision | None = None  # authorise stage
    params: dict[str, Any] | None = None  # request.params (gateway.request_params), read once when first needed
    monitors: tuple[str, ...] = ()  # authorise stage: the monitors in alarm for this caller and model (audit)
    visible_models: tuple[str, ...] = ()  # authorise stage, GET /v1/models: the models the caller may read
    quota: str = "none"  # quota stage: "none" | "ok" | "limited" | "store_error" | "error"
    response_headers: dict[str, str] = field(default_factory=dict)  # added to the final response
    usage: Usage | None = None  # the gateway, from the backend's answer (or its error)
    status: int = 0  # the door, as it answers
    bytes_out: int = 0  # the door, as it answers
    _cleanups: list[Callable[[RequestContext], Awaitable[None] | None]] = field(default_factory=list)

    @property
    def action(self) -> str | None:
        return self.route.action if self.route else None

    @property
    def bytes_in(self) -> int:
        return len(self.body)

    @property
    def roles(self) -> tuple[str, ...]:
        """The caller's effective roles: the policy's (after inheritance) once authorised, else the credential's."""
        decision = self.decision
        if decision is not None and decision.roles:
            return decision.roles
        identity = self.identity
        return identity.roles if identity is not None else ()

    def on_finish(self, callback: Callable[[RequestContext], Awaitable[None] | None]) -> None:
        """Run ``callback`` when the request ends, on every exit path (success, error, disconnect)."""
        self._cleanups.append(callback)


class Stage(Protocol):
    """One step of the pipeline. Raises ``GatewayError`` to stop the request."""

    name: str

    async def __call__(self, ctx: RequestContext) -> None: ...


# A stream that can be written on from its upstream's own callback has ``push(write)``: ``write(chunk)``
# answers False to go on, True when the client can take no more (chunks then queue for ``__anext__``), or
# HOLD when it did not write the chunk and must wait for something first (a response id's claim): the
# stream then hands that chunk back, first, out of ``__anext__``.
HOLD = 2


@dataclass(slots=True)
class BackendResponse:
    """What a backend answered. Exactly one of ``body``/``stream`` is set.

    ``json`` may carry the already-decoded answer (the local runner has it for
    free) so the harden stage need not parse ``body`` again.
    """

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)  # in order; a name may repeat (Set-Cookie)
    body: bytes | None = None
    stream: Any = None  # AsyncIterator[bytes]; relayed chunk by chunk, never buffered
    json: Any = None
    content_type: str = "application/json"
    release: Callable[[], Awaitable[None] | None] | None = None  # frees the upstream connection
    usage: Usage | None = None  # openai: what the call cost (a stream's relay fills it in as it goes)


class ResponseStage(Protocol):
    """A stage after the backend (harden): may rewrite a non-streaming answer."""

    name: str

    async def __call__(self, ctx: RequestContext, response: BackendResponse) -> BackendResponse: ...
