"""Which route a normalised path is, and which model it names.

Built once at start-up from the config: the public surface is exactly the
spec's routes plus each raw backend's configured paths, nothing else. Matching
runs on the normalised path only (never on ``Host`` or an absolute-form
authority), so what is authorised is what is forwarded.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Collection, Mapping, NoReturn

from .errors import MethodNotAllowed, NotFound
from .llm import paths as llm_paths
from .llm.surfaces import SURFACES
from .openai_paths import INFERENCE_PATHS, MODELS
from . import v2_routes
from .pipeline import Route, RouteKind

_V2_PREFIX = "/v2/models/"
_OPENAI_ROUTE = Route(RouteKind.OPENAI, "infer", None, json_body=True)
_MODELS_LIST = Route(RouteKind.MODELS_LIST, "read", None, json_body=False)
_OLLAMA_TAGS = Route(RouteKind.OLLAMA_TAGS, "read", None, json_body=False)
# The LLM surfaces beyond chat/completions/embeddings (gateway.llm.surfaces): model from the JSON body.
_LLM_ROUTES = {path: Route(RouteKind.OLLAMA if s.protocol == "ollama" else RouteKind.OPENAI, s.action, None,
                           json_body=not s.multipart) for path, s in SURFACES.items()}
# /v1/responses/{id}[/tail]: (tail, method) -> route; model and owner come from the id's record
_RESPONSE_ID_ROUTES = {
    ("", "GET"): Route(RouteKind.RESPONSE_ID, "read", None, json_body=False),
    ("", "DELETE"): Route(RouteKind.RESPONSE_ID, "infer", None, json_body=False),
    ("input_items", "GET"): Route(RouteKind.RESPONSE_ID, "read", None, json_body=False),
    ("cancel", "POST"): Route(RouteKind.RESPONSE_ID, "infer", None, json_body=False),
}
_V2_SERVER = Route(RouteKind.V2_SERVER, "none", None, json_body=False)
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
        self._ollama = {m for m, p in protocols.items() if p == "ollama"}
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
            self._routes[("POST", base + "/generate")] = Route(RouteKind.V2_GENERATE, "infer", model, json_body=True)
            self._routes[("POST", base + "/generate_stream")] = Route(RouteKind.V2_GENERATE_STREAM, "infer", model,
                                                                      json_body=True)
        for server_path in v2_routes.SERVER_PATHS:  # answered by the gateway itself (authenticated, no policy)
            self._routes[("GET", server_path)] = _V2_SERVER

    def match(self, method: str, path: str) -> Route:
        if method in NEVER_ROUTED_METHODS:
            raise MethodNotAllowed(f"{method} is not allowed")
        if llm_paths.never_forwarded(path):  # Ollama's model management: not even a raw backend may take it
            raise NotFound("unknown route")
        route = self._routes.get((method, path))
        if route is not None:
            return route
        if path in v2_routes.SERVER_PATHS:  # the gateway's own, whatever a raw backend's glob says
            raise MethodNotAllowed(f"{method} not allowed on {path}")
        if path.startswith("/v2/"):
            if v2_routes.never_forwarded(path):  # Triton's admin endpoints, whatever a raw backend's glob says
                raise NotFound("unknown route")
            plain, version = v2_routes.unversioned(path)
            if version is not None:  # /v2/models/{m}/versions/{v}/...: the model's own route, or none
                route = self._routes.get((method, plain))
                if route is not None:
                    return route
                self._refuse_v2(method, plain)
            if path.startswith(_V2_PREFIX) and path[len(_V2_PREFIX):].partition("/")[0] in self._v2:
                self._refuse_v2(method, path)  # a v2 model's paths are its own, never a raw backend's
        if path in INFERENCE_PATHS:
            if method != "POST":
                raise MethodNotAllowed(f"{method} not allowed on {path}")
            return _OPENAI_ROUTE
        if path == MODELS:
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"{method} not allowed on {path}")
            return _MODELS_LIST
        llm = _LLM_ROUTES.get(path)
        if llm is not None:
            if method != "POST":
                raise MethodNotAllowed(f"{method} not allowed on {path}")
            return llm
        if path == llm_paths.OLLAMA_TAGS:
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed(f"{method} not allowed on {path}")
            return _OLLAMA_TAGS
        if path.startswith(llm_paths.RESPONSES_PREFIX):
            return _response_id_route(method, path)
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
            self._refuse_v2(method, path)
        raise NotFound("unknown route")

    def _refuse_v2(self, method: str, path: str) -> NoReturn:
        """405 for a v2 model route asked with the wrong method, else 404."""
        rest = path[len(_V2_PREFIX):]
        name, _, tail = rest.partition("/")
        if name in self._v2 and tail in ("", "infer", "ready", "generate", "generate_stream"):
            raise MethodNotAllowed(f"{method} not allowed on {path}")
        raise NotFound("unknown model or route")

    def openai_model(self, name: str) -> bool:
        return name in self._openai

    def serves(self, kind: RouteKind, name: str) -> bool:
        """Whether model ``name`` takes body-model routes of ``kind`` (openai ones, or Ollama's native API)."""
        return name in (self._ollama if kind is RouteKind.OLLAMA else self._openai)

    def ollama_models(self) -> frozenset[str]:
        return frozenset(self._ollama)


def _response_id_route(method: str, path: str) -> Route:
    """``/v1/responses/{id}``, ``.../input_items`` (GET), ``/{id}`` (DELETE), ``.../cancel`` (POST)."""
    rid, _, tail = path[len(llm_paths.RESPONSES_PREFIX):].partition("/")
    if not rid or tail not in ("", "input_items", "cancel"):
        raise NotFound("unknown route")
    route = _RESPONSE_ID_ROUTES.get((tail, "GET" if method == "HEAD" and tail != "cancel" else method))
    if route is None:
        raise MethodNotAllowed(f"{method} not allowed on {path}")
    return route
