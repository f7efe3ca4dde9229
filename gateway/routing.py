"""Which route a normalised path is, and which model it names.

Built once at start-up from the config: the public surface is exactly the
spec's routes plus each raw backend's configured paths, nothing else. Matching
runs on the normalised path only (never on ``Host`` or an absolute-form
authority), so what is authorised is what is forwarded.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Collection, Mapping

from .errors import MethodNotAllowed, NotFound
from .openai_paths import INFERENCE_PATHS, MODELS
from .pipeline import Route, RouteKind

_V2_PREFIX = "/v2/models/"
_OPENAI_ROUTE = Route(RouteKind.OPENAI, "infer", None, json_body=True)
_MODELS_LIST = Route(RouteKind.MODELS_LIST, "read", None, json_body=False)
# Never routed anywhere: TRACE/TRACK would echo the request (and a backend's secret headers), CONNECT opens a tunnel.
NEVER_ROUTED_METHODS = frozenset({"TRACE", "TRACK", "CONNECT"})
_RAW_DEFAULT_METHODS = frozenset({"POST"})


class Router:
    def __init__(self, protocols: Mapping[str, str], raw_paths: Mapping[str, list[str]],
                 raw_methods: Mapping[str, Collection[str]] | None = None) -> None:
        """``protocols``: model -> "v2" | "openai" | "raw"; ``raw_paths``: model -> its forwarded paths;
        ``raw_methods``: model -> the methods its paths take (default POST; any other is 405)."""
        self.protocols = dict(protocols)
        self._v2 = {m for m, p in protocols.items() if p == "v2"}
        self._openai = {m for m, p in protocols.items() if p == "openai"}
        self._raw_exact: dict[str, Route] = {}
        self._raw_globs: list[tuple[str, Route]] = []
        self._raw_methods = {m: frozenset(v) - NEVER_ROUTED_METHODS for m, v in (raw_methods or {}).items()}
        for model, paths in raw_paths.items():
            route = Route(RouteKind.RAW, "infer", model, json_body=False)
            for path in paths:
                if any(c in path for c in "*?["):
                    self._raw_globs.append((path, route))
                else:
                    self._raw_exact[path] = route
        self._routes: dict[tuple[str, str], Route] = {}
        for model in self._v2:
            base = _V2_PREFIX + model
            self._routes[("POST", base + "/infer")] = Route(RouteKind.V2_INFER, "infer", model, json_body=True)
            self._routes[("GET", base)] = Route(RouteKind.V2_METADATA, "read", model, json_body=False)
            self._routes[("GET", base + "/ready")] = Route(RouteKind.V2_READY, "read", model, json_body=False)

    def match(self, method: str, path: str) -> Route:
        if method in NEVER_ROUTED_METHODS:
            raise MethodNotAllowed(f"{method} is not allowed")
        route = self._routes.get((method, path))
        if route is not None:
            return route
        if path in INFERENCE_PATHS:
            if method != "POST":
                raise MethodNotAllowed(f"{method} not allowed on {path}")
            return _OPENAI_ROUTE
        if path == MODELS:
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"{method} not allowed on {path}")
            return _MODELS_LIST
        raw = self._raw_exact.get(path)
        if raw is None:
            for pattern, candidate in self._raw_globs:
                if fnmatchcase(path, pattern):
                    raw = candidate
                    break
        if raw is not None:
            if method not in self._raw_methods.get(raw.model or "", _RAW_DEFAULT_METHODS):
                raise MethodNotAllowed(f"{method} not allowed on {path}")
            return raw
        if path.startswith(_V2_PREFIX):
            rest = path[len(_V2_PREFIX):]
            name, _, tail = rest.partition("/")
            if name in self._v2 and tail in ("", "infer", "ready"):
                raise MethodNotAllowed(f"{method} not allowed on {path}")
            raise NotFound("unknown model or route")
        raise NotFound("unknown route")

    def openai_model(self, name: str) -> bool:
        return name in self._openai
