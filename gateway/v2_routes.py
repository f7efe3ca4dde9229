"""The Open Inference Protocol's paths beyond a model's own: versions, Triton's admin endpoints, /v2 itself.

* Versioned paths (``/v2/models/{m}/versions/{v}/...``) are the model's own
  routes: authorised as the model, forwarded with the version in the path.
  ``unversioned`` gives the route table's key; the path forwarded is the
  normalised one, version and all.
* Triton's model-control, shared-memory, logging, trace and statistics
  endpoints (``never_forwarded``) are refused by the router before any other
  match, a raw backend's glob included: they load and unload models, map
  server memory and change what the server logs, none of which a caller of a
  security gateway may do.
* ``GET /v2`` and ``/v2/health/live|ready`` describe the gateway, not a model
  server behind it: ``ServerEndpoints`` answers them (for any authenticated
  caller, no policy), readiness from the gateway's own checks.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import TYPE_CHECKING, Callable

import orjson

from .errors import NotFound
from .pipeline import BackendResponse

if TYPE_CHECKING:
    from .pipeline import RequestContext

MODELS_PREFIX = "/v2/models/"
SERVER_PATHS = ("/v2", "/v2/health/live", "/v2/health/ready")
# what this gateway implements of the protocol's extensions (Triton's names)
EXTENSIONS = ("binary_tensor_data", "parameters", "generate")
_VERSION = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ADMIN_PREFIXES = ("/v2/repository", "/v2/systemsharedmemory", "/v2/cudasharedmemory", "/v2/logging", "/v2/trace")
_MODEL_ADMIN_TAILS = frozenset({"stats", "trace", "config"})  # /v2/models/{m}[/versions/{v}]/stats, /trace/setting


def unversioned(path: str) -> tuple[str, str | None]:
    """(``path`` without its ``/versions/{v}`` segment pair, ``v``); ``(path, None)`` when it names no version."""
    if not path.startswith(MODELS_PREFIX):
        return path, None
    parts = path.split("/")  # "", "v2", "models", m, "versions", v, ...
    if len(parts) >= 6 and parts[4] == "versions" and _VERSION.fullmatch(parts[5]) and parts[5] not in (".", ".."):
        return "/".join(parts[:4] + parts[6:]), parts[5]
    return path, None


def never_forwarded(path: str) -> bool:
    """Triton's admin endpoints: never routed to any backend, whatever a raw backend's paths say."""
    for prefix in _ADMIN_PREFIXES:
        if path == prefix or path.startswith(prefix + "/"):
            return True
    if path == "/v2/models/stats" or path.startswith("/v2/models/stats/"):  # every model's statistics
        return True
    if path.startswith(MODELS_PREFIX):
        plain, _ = unversioned(path)
        parts = plain.split("/")
        return len(parts) >= 5 and parts[4] in _MODEL_ADMIN_TAILS
    return False


def version_of(path: str) -> str | None:
    """The version a v2 model path names, if any."""
    return unversioned(path)[1]


def _package_version() -> str:
    try:
        return metadata.version("maas-gateway")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "0"


class ServerEndpoints:
    """Answers ``GET /v2`` (server metadata) and ``/v2/health/live|ready`` in place of a backend."""

    name = "v2-server"

    def __init__(self, ready: Callable[[], bool]) -> None:
        self._ready = ready
        self._metadata = orjson.dumps({"name": "maas-gateway", "version": _package_version(),
                                       "extensions": list(EXTENSIONS)})

    async def handle(self, ctx: RequestContext) -> BackendResponse:
        path = ctx.path
        if path == "/v2":
            return BackendResponse(200, body=self._metadata)
        if path == "/v2/health/live":
            return BackendResponse(200, body=b'{"live":true}')
        if path == "/v2/health/ready":
            ready = self._ready()
            return BackendResponse(200 if ready else 503, body=b'{"ready":true}' if ready else b'{"ready":false}')
        raise NotFound("unknown route")
