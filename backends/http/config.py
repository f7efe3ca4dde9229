"""The ``backend:`` section of a model served by an existing HTTP model server.

Built by ``gateway.typedyaml`` so every mistake names file, line and key; the
checks here are the ones a type hint cannot express (URL shapes, ranges, which
keys belong to which protocol).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from yarl import URL

PROTOCOLS = ("openai", "v2", "ollama", "raw")
# Never forwarded, whatever a config says: TRACE/TRACK echo the request (the backend's secret headers
# included) and CONNECT would turn the gateway into a tunnel.
NEVER_FORWARDED_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})
DEFAULT_RAW_METHODS = ("POST",)
DEFAULT_EJECT_ON = ("connect", "timeout", "502", "503", "504")
EJECT_WORDS = frozenset({"connect", "timeout"})
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")


@dataclass(frozen=True, slots=True)
class HttpBackendConfig:
    type: str
    protocol: Literal["openai", "v2", "ollama", "raw"]
    upstreams: list[str]
    headers: dict[str, str] = field(default_factory=dict)  # added to every forwarded request; they win
    paths: list[str] = field(default_factory=list)  # raw only: the public paths forwarded as is
    methods: list[str] | None = None  # raw only: the methods forwarded (None: POST); others are 405
    timeout_s: float | None = None  # None => server.upstream_timeout_s
    connect_timeout_s: float | None = None  # None => server.upstream_connect_timeout_s
    max_connections: int = 256  # pooled connections across all upstreams of this model
    keepalive_timeout_s: float = 4.0  # idle pooled connections closed after this; below common upstream defaults (5 s)
    max_response_bytes: int = 67_108_864  # a non-streamed answer larger than this => 502 (never buffered past it)
    max_stream_s: float = 3600.0  # a streamed answer is ended (cleanly, for the client) after this long
    # what counts against an upstream: "connect" (refused, reset, closed early, invalid HTTP), "timeout", or an
    # answer status 500-599. Not 500 by default: a caller's input can provoke it, and that says nothing of health.
    eject_on: list[str | int] = field(default_factory=lambda: _default_eject_on())
    max_ejection_percent: float = 50.0  # at most this share of upstreams out at once (floor, like Envoy)
    eject_after_failures: int = 3  # consecutive failures (of the eject_on kinds) that eject an upstream
    eject_for_s: float = 10.0
    health_path: str | None = None  # active probe (GET, 2xx = healthy); else one trial request after eject_for_s
    retries: int = 1  # extra attempts on another upstream, only when nothing reached the first one
    model_name: str | None = None  # the name the upstream knows the model by (openai body / v2 path)
    tls_ca_file: Path | None = None
    tls_verify: bool = True

    def validate(self) -> tuple[str, str] | None:
        if not self.upstreams:
            return "upstreams", "list at least one upstream URL"
        for i, text in enumerate(self.upstreams):
            problem = _check_upstream(text)
            if problem:
                return f"upstreams[{i}]", problem
        if len(set(u.rstrip("/") for u in self.upstreams)) != len(self.upstreams):
            return "upstreams", "the same upstream is listed twice"
        for name, value in self.headers.items():
            if not name or any(c in name for c in " \t\r\n:") or any(c in value for c in "\r\n\0"):
                return f"headers.{name}", "not a valid header name or value"
        if self.protocol == "raw":
            if not self.paths:
                return "paths", "a raw backend needs at least one path"
            for i, p in enumerate(self.paths):
                if not p.startswith("/") or "?" in p or "#" in p or "\\" in p or "//" in p:
                    return f"paths[{i}]", "must be an absolute path without query, fragment, '//' or '\\'"
            if self.model_name is not None:
                return "model_name", "only for protocol openai, ollama or v2"
            methods_problem = _check_methods(self.methods)
            if methods_problem:
                return methods_problem
        elif self.paths:
            return "paths", "only for protocol raw"
        elif self.methods is not None:
            return "methods", "only for protocol raw (openai, ollama and v2 routes have their own methods)"
        for key in ("timeout_s", "connect_timeout_s", "keepalive_timeout_s", "eject_for_s"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                return key, "must be positive"
        if self.max_stream_s <= 0:
            return "max_stream_s", "must be positive"
        if self.max_connections < 1:
            return "max_connections", "must be at least 1"
        if self.max_response_bytes < 1:
            return "max_response_bytes", "must be at least 1"
        if not 0 <= self.max_ejection_percent <= 100:
            return "max_ejection_percent", "must be between 0 and 100"
        for i, item in enumerate(self.eject_on):
            if eject_condition(item) is None:
                return f"eject_on[{i}]", f"expected connect, timeout or a 5xx status such as 503, got {item!r}"
        if self.eject_after_failures < 1:
            return "eject_after_failures", "must be at least 1"
        if self.retries < 0:
            return "retries", "must not be negative"
        if self.health_path is not None and (not self.health_path.startswith("/") or "#" in self.health_path):
            return "health_path", "must be an absolute path such as /health"
        if self.model_name is not None and not self.model_name:
            return "model_name", "must not be empty"
        if self.model_name is not None and self.protocol == "v2" and "/" in self.model_name:
            return "model_name", "a v2 model name is a path segment: no '/'"
        if self.tls_ca_file is not None and not self.tls_ca_file.is_file():
            return "tls_ca_file", f"file not found: {self.tls_ca_file}"
        return None


def _default_eject_on() -> list[str | int]:
    return list(DEFAULT_EJECT_ON)


def eject_condition(item: str | int) -> str | None:
    """``item`` of ``eject_on`` as the backend compares it ("connect", "timeout", "503"); None if not one."""
    if isinstance(item, bool):
        return None
    text = str(item).strip().lower()
    if text in EJECT_WORDS:
        return text
    if text.isdigit() and len(text) == 3 and 500 <= int(text) <= 599:
        return text
    return None


def raw_methods(config: HttpBackendConfig) -> frozenset[str]:
    """The methods a raw backend forwards (its ``methods``, or POST)."""
    return frozenset(config.methods if config.methods is not None else DEFAULT_RAW_METHODS)


def _check_methods(methods: list[str] | None) -> tuple[str, str] | None:
    if methods is None:
        return None
    if not methods:
        return "methods", "list at least one method, such as POST"
    for i, method in enumerate(methods):
        if not _METHOD.fullmatch(method):
            return f"methods[{i}]", f"expected an upper-case HTTP method such as POST, got {method!r}"
        if method in NEVER_FORWARDED_METHODS:
            return f"methods[{i}]", f"{method} is never forwarded (TRACE, TRACK and CONNECT are refused)"
    return None


def _check_upstream(text: str) -> str | None:
    try:
        url = URL(text)
    except (ValueError, TypeError):
        return "not a valid URL"
    if url.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not url.raw_host:
        return "must name a host"
    if url.raw_user or url.raw_password:
        return "credentials in the URL are not supported; use the backend's headers"
    if url.raw_query_string or url.raw_fragment:
        return "must not carry a query or fragment"
    return None
