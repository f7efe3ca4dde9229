"""The gateway's error hierarchy and the one table that maps it to HTTP.

Stages raise; exactly one place per door (``gateway.http_door``) turns a ``GatewayError`` into
the JSON error shape. Configuration errors are deliberately *outside* this
hierarchy: they stop the process (or a reload), they never become a response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import orjson

if TYPE_CHECKING:
    from .usage import Usage

# Protocols whose clients read ``error`` as a string: the Open Inference Protocol (``tritonclient`` cannot even
# print an object there) and Ollama's native API. Their error fields are flat; everywhere else they are nested.
FLAT_ERROR_PREFIXES = ("/v2", "/api")


def flat_errors(path: str) -> bool:
    """Whether errors on ``path`` take the flat shape (``{"error": "<message>", "type", "request_id"}``)."""
    for prefix in FLAT_ERROR_PREFIXES:
        if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
            return True
    return False


def error_body(error_type: str, message: str, rid: str, path: str = "") -> bytes:
    """The JSON error document, the one place its shape is decided: flat on ``flat_errors`` paths, else nested."""
    if flat_errors(path):
        return orjson.dumps({"error": message, "type": error_type, "request_id": rid})
    return orjson.dumps({"error": {"type": error_type, "message": message, "request_id": rid}})


class GatewayError(Exception):
    """A request failed in a way the client is told about."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    usage: Usage | None = None  # set by a backend that failed after the model ran: what the call cost

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request"


class Unauthenticated(GatewayError):
    """401. ``error`` is the RFC 6750 error code for WWW-Authenticate (None when no credentials came)."""

    status = 401
    type = "unauthenticated"

    def __init__(self, message: str, *, error: str | None = "invalid_token") -> None:
        challenge = 'Bearer realm="maas-gateway"'
        if error:
            challenge += f', error="{error}"'
        super().__init__(message, headers={"WWW-Authenticate": challenge})
        self.error = error


class Forbidden(GatewayError):
    status = 403
    type = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "payload_too_large"


class RequestTimeout(GatewayError):
    """The client stopped sending its body (slowloris): refuse instead of holding the connection."""

    status = 408
    type = "request_timeout"


class RequestHeaderFieldsTooLarge(GatewayError):
    """431: the request line and headers exceed ``server.max_header_bytes`` (or more than 128 header lines)."""

    status = 431
    type = "request_header_fields_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "unsupported_media_type"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int, headers: dict[str, str] | None = None) -> None:
        merged = dict(headers or {})
        merged["Retry-After"] = str(max(1, int(retry_after_s)))
        super().__init__(message, headers=merged)


class BackendError(GatewayError):
    status = 502
    type = "backend_error"


class Unavailable(GatewayError):
    status = 503
    type = "unavailable"


class BackendTimeout(GatewayError):
    status = 504
    type = "backend_timeout"


class InternalError(GatewayError):
    status = 500
    type = "internal_error"


class ConfigError(Exception):
    """A config, policy or key file is wrong. ``str()`` is one line: ``file:line: key: message``."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, key: str | None = None) -> None:
        self.file, self.line, self.key, self.reason = file, line, key, message
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        if key:
            where += f"{key}: "
        super().__init__(f"{where}{message}")


class CliError(Exception):
    """A command failed on bad input; printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
