"""The request context and the contract every pipeline stage keeps.

A request flows through ordered stages: request id -> path -> route ->
authenticate -> body -> authorise -> quota -> validate -> backend -> harden ->
audit. Each stage reads what earlier stages wrote to the ``RequestContext`` and
writes its own result there; it either returns or raises a ``GatewayError``. A
stage never writes a response and never reaches into another stage's objects:
the context is the only thing they share.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Protocol

if TYPE_CHECKING:
    from aiohttp import web

    from .config import ModelConfig


class RouteKind(enum.Enum):
    """What a request is, by its normalised path and method."""

    V2_INFER = "v2_infer"  # POST /v2/models/{model}/infer
    V2_METADATA = "v2_metadata"  # GET /v2/models/{model}
    V2_READY = "v2_ready"  # GET /v2/models/{model}/ready
    OPENAI = "openai"  # POST /v1/chat/completions | /v1/completions | /v1/embeddings
    MODELS_LIST = "models_list"  # GET /v1/models
    RAW = "raw"  # a raw backend's configured path


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

    request: web.BaseRequest  # the low-level server (gateway.server) hands the app a BaseRequest
    request_id: str
    started: float  # time.monotonic() at arrival
    client_ip: str
    mtls: bool = False
    client_cert_subject: str | None = None
    path: str = ""  # normalised path: what every check and the backend see
    query: str = ""  # raw query string, forwarded as is
    route: Route | None = None
    model_name: str | None = None
    model: ModelConfig | None = None
    identity: Identity | None = None
    body: bytes = b""  # the body as received (after the size limit)
    json: Any = None  # the parsed body, for JSON routes
    forward_body: bytes | None = None  # what the backend sends upstream (validated bytes); None => body
    tensors: dict[str, Any] | None = None  # v2: checked floating-point inputs as flat float64 arrays, by name
    decision: Decision | None = None
    quota: str = "none"  # "none" | "ok" | "limited" | "store_error" | "error"
    response_headers: dict[str, str] = field(default_factory=dict)  # added to the final response
    status: int = 0
    bytes_out: int = 0
    error_type: str | None = None
    llm_usage_tokens: int | None = None  # openai: usage.total_tokens reported by the upstream
    llm_answered: bool = False  # openai: the upstream answered 2xx (no usage then: the whole reservation is charged)
    _cleanups: list[Callable[[RequestContext], Awaitable[None] | None]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # stage-private values, keyed by stage name

    @property
    def action(self) -> str | None:
        return self.route.action if self.route else None

    @property
    def bytes_in(self) -> int:
        return len(self.body)

    def on_finish(self, callback: Callable[[RequestContext], Awaitable[None] | None]) -> None:
        """Run ``callback`` when the request ends, on every exit path (success, error, disconnect)."""
        self._cleanups.append(callback)


class Stage(Protocol):
    """One step of the pipeline. Raises ``GatewayError`` to stop the request."""

    name: str

    async def __call__(self, ctx: RequestContext) -> None: ...


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


class ResponseStage(Protocol):
    """A stage after the backend (harden): may rewrite a non-streaming answer."""

    name: str

    async def __call__(self, ctx: RequestContext, response: BackendResponse) -> BackendResponse: ...
