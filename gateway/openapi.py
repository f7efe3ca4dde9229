"""The gateway's public API as an OpenAPI 3.1 document, generated from its config.

One document describes exactly what this gateway accepts: each model's routes
(Open Inference Protocol for ``v2`` backends and the local runner, the OpenAI-compatible
routes, a raw backend's paths), each model's request schema (its own JSON
Schema inlined under ``components.schemas``, combined with the protocol's
envelope), the security schemes that are configured, and the JSON error shape
with every status the gateway answers with. Client generators, API portals and
fuzzers (the CI runs schemathesis against it) read it from the admin port at
``GET /openapi.json`` or from ``maas-gateway openapi -c CONFIG``.

When a model declares its inputs with fixed shapes, the request schema pins
names, datatypes, shapes and data lengths, so a generated request is one the
gateway really accepts. A model schema's internal ``$ref``s (``#/$defs/x``) are
rewritten to point inside ``components``; its root ``$id``/``$schema`` are
dropped, since the document is the schema's new home.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import quote

from . import __version__
from .config import GatewayConfig
from .llm.openapi_paths import llm_paths
from .openai_paths import CHAT, COMPLETIONS, EMBEDDINGS, MODELS, STREAMING_PATHS
from .openapi_schemas import ERRORS, BODY_ERRORS, READ_ERRORS, error_responses, protocol_schemas, v2_request

if TYPE_CHECKING:
    from .backend import Backend

OPENAI_ROUTES = {
    CHAT: "ChatCompletionRequest",
    COMPLETIONS: "CompletionRequest",
    EMBEDDINGS: "EmbeddingRequest",
}
_COMPONENT = re.compile(r"[^A-Za-z0-9._-]")
BINARY_HEADER = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                 "description": "Binary tensor extension: the byte length of the JSON header that starts the body.",
                 "schema": {"type": "integer", "minimum": 1}}
# Integers are 64-bit: a JSON integer beyond that range is read as a float and refused where an integer is due.


def protocol_of(backend: Backend) -> str:
    """``v2``, ``openai``, ``ollama`` or ``raw``: as the model's backend says (``v2`` for anything else)."""
    protocol = backend.protocol()
    return protocol if protocol in ("v2", "openai", "ollama", "raw") else "v2"


def build_document(config: GatewayConfig, backends: Mapping[str, Backend] | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``config`` (plain JSON-ready data).

    ``backends`` are the running gateway's; without them, unstarted ones are made to ask what each serves.
    """
    from .plugins import backends_for
    from .stages.validate import read_schema  # the one reader: same errors as start-up

    if backends is None:
        backends = backends_for(config)

    schemas: dict[str, Any] = protocol_schemas()
    paths: dict[str, Any] = {}
    openai: dict[str, dict[str, Any]] = {}  # model name -> its extra constraints
    raw_patterns: list[str] = []
    ollama: list[str] = []  # models served by Ollama's native API
    used: set[str] = set(schemas)
    for name, model in sorted(config.models.items()):
        key = _component_name(name, used)
        own = None
        if model.schema is not None:
            own = _inline(read_schema(model.schema), f"#/components/schemas/{key}")
            schemas[key] = own
        protocol = protocol_of(backends[name])
        ref = {"$ref": f"#/components/schemas/{key}"} if own is not None else None
        if protocol == "v2":
            request = v2_request(model.inputs, ref)
            schemas[key + ".InferenceRequest"] = request
            _add_v2_paths(paths, name, f"#/components/schemas/{key}.InferenceRequest")
        elif protocol == "openai":
            openai[name] = {"schema": ref, "max_tokens": model.max_tokens}
        elif protocol == "ollama":
            ollama.append(name)
        else:
            for path in backends[name].raw_paths():
                if any(c in path for c in "*?["):
                    raw_patterns.append(path)
                    continue
                paths[path] = {"post": _raw_operation(name, path, ref)}
    if openai:
        for path, generic in OPENAI_ROUTES.items():
            paths[path] = {"post": _openai_operation(path, generic, openai)}
    paths.update(llm_paths(sorted(openai), ollama))  # Responses, Messages, rerank, ..., Ollama (gateway.llm)
    _add_server_paths(paths)
    paths[MODELS] = {"get": _operation("listModels", "Models the caller may read.", None,
                                        {"200": _json_response("The models list.", {"$ref": "#/components/schemas/ModelList"})},
                                        READ_ERRORS, tags=["models"])}
    _dedupe_operation_ids(paths)
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "maas-gateway",
            "version": __version__,
            "description": "Models served behind maas-gateway: every request is authenticated, authorised, "
                           "held to quotas and validated before it reaches a model. Fields of type integer "
                           "take integer literals (5, not 5.0) of at most 64 bits.",
        },
        "servers": [{"url": _server_url(config)}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": error_responses(),
            "securitySchemes": _security_schemes(config),
        },
    }
    document["security"] = [{name: []} for name in document["components"]["securitySchemes"]]
    if raw_patterns:
        document["x-maas-raw-path-patterns"] = raw_patterns  # glob paths OpenAPI cannot express
    return document


# -- operations ------------------------------------------------------------------------------

def _operation(op_id: str, summary: str, body: dict[str, Any] | None, ok: dict[str, Any], errors: tuple[int, ...],
               *, tags: list[str]) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": op_id, "summary": summary, "tags": tags}
    if body is not None:
        operation["requestBody"] = body
    responses = dict(ok)
    for status in errors:
        responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
    operation["responses"] = responses
    return operation


def _dedupe_operation_ids(paths: dict[str, Any]) -> None:
    """Model names that differ only in characters an id cannot hold (``a:b``, ``a_b``) still get unique ids."""
    seen: set[str] = set()
    for item in paths.values():
        for operation in item.values():
            op_id, n = operation["operationId"], 2
            while op_id in seen:
                op_id, n = f"{operation['operationId']}_{n}", n + 1
            operation["operationId"] = op_id
            seen.add(op_id)


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _op_id(prefix: str, name: str) -> str:
    return prefix + "_" + _COMPONENT.sub("_", name)


def _add_v2_paths(paths: dict[str, Any], name: str, request_ref: str) -> None:
    base = "/v2/models/" + quote(name, safe="-._~!$&'()*+,;=:@")
    paths[base + "/infer"] = {"post": _operation(
        _op_id("infer", name), f"Run model {name} (Open Inference Protocol).",
        _json_body({"$ref": request_ref}),
        {"200": _json_response("The model's answer.", {"$ref": "#/components/schemas/InferenceResponse"})},
        BODY_ERRORS, tags=[name])}
    paths[base] = {"get": _operation(
        _op_id("metadata", name), f"Metadata of model {name}.", None,
        {"200": _json_response("Model metadata.", {"$ref": "#/components/schemas/ModelMetadata"})},
        READ_ERRORS, tags=[name])}
    paths[base + "/ready"] = {"get": _operation(
        _op_id("ready", name), f"Whether model {name} can answer now.", None,
        {"200": {"description": "The model is ready."}}, READ_ERRORS, tags=[name])}
    infer = paths[base + "/infer"]["post"]
    infer["requestBody"]["content"]["application/octet-stream"] = {  # the binary tensor extension
        "schema": {"type": "string", "format": "binary",
                   "description": "Inference-Header-Content-Length bytes of JSON (an InferenceRequest whose "
                                  "binary inputs carry parameters.binary_data_size instead of data), then each "
                                  "binary input's little-endian bytes in input order."}}
    infer["parameters"] = [BINARY_HEADER]
    infer["responses"]["200"]["content"]["application/octet-stream"] = {
        "schema": {"type": "string", "format": "binary"}}
    paths[base + "/generate"] = {"post": _operation(
        _op_id("generate", name), f"Triton generate extension on model {name}.", _json_body({"type": "object"}),
        {"200": _json_response("The model's answer.", {"type": "object"})}, BODY_ERRORS, tags=[name])}
    stream_ok = {"description": "Server-sent events, relayed as they come.",
                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}
    paths[base + "/generate_stream"] = {"post": _operation(
        _op_id("generate_stream", name), f"Triton generate extension on model {name}, streamed (SSE).",
        _json_body({"type": "object"}), {"200": stream_ok}, BODY_ERRORS, tags=[name])}
    version = {"name": "version", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}}
    for tail in ("", "/ready", "/infer", "/generate", "/generate_stream"):  # the same routes, one version named
        item = json.loads(json.dumps(paths[base + tail]))
        for method, operation in item.items():
            operation["operationId"] += "_version"
            operation["parameters"] = [version, *operation.get("parameters", [])]
        paths[base + "/versions/{version}" + tail] = item


def _add_server_paths(paths: dict[str, Any]) -> None:
    """``GET /v2``, ``/v2/health/live|ready``: the gateway's own answers (any authenticated caller)."""
    for path, op_id, summary in (("/v2", "serverMetadata", "The gateway's server metadata (name, version, extensions)."),
                                 ("/v2/health/live", "serverLive", "The gateway is alive."),
                                 ("/v2/health/ready", "serverReady", "The gateway is ready (503 when not).")):
        paths[path] = {"get": _operation(op_id, summary, None, {"200": _json_response("Yes.", {"type": "object"})},
                                         (401, 503), tags=["server"])}


def _openai_operation(path: str, generic: str, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    variants = []
    for name, extra in sorted(models.items()):
        pin: dict[str, Any] = {"type": "object", "properties": {"model": {"const": name}}}
        if extra["max_tokens"] is not None:
            cap = {"type": "integer", "minimum": 1, "maximum": extra["max_tokens"]}
            pin["properties"].update({"max_tokens": cap, "max_completion_tokens": cap})
        parts = [{"$ref": f"#/components/schemas/{generic}"}, pin]
        if extra["schema"] is not None:
            parts.append(extra["schema"])
        variants.append({"allOf": parts})
    schema = variants[0] if len(variants) == 1 else {"oneOf": variants}
    ok: dict[str, Any] = {"description": "The upstream's answer.", "content": {"application/json": {"schema": {"type": "object"}}}}
    if path in STREAMING_PATHS:
        ok["content"]["text/event-stream"] = {"schema": {"type": "string"}}  # stream: true, relayed unbuffered
    name = path.rsplit("/", 1)[-1].replace(".", "_")
    return _operation(f"openai_{'chat_completions' if 'chat' in path else name}", f"OpenAI-compatible {path}.",
                      _json_body(schema), {"200": ok}, BODY_ERRORS, tags=["openai"])


def _raw_operation(name: str, path: str, ref: dict[str, Any] | None) -> dict[str, Any]:
    if ref is not None:
        body = _json_body(ref)
    else:
        body = {"required": False, "content": {"*/*": {"schema": {}}}}
    ok = {"200": {"description": "The upstream's answer, as is."}}
    errors = BODY_ERRORS if ref is not None else tuple(s for s in BODY_ERRORS if s != 415)
    return _operation(_op_id("raw", name + path), f"Forwarded as is to model {name}.", body, ok, errors, tags=[name])


def _security_schemes(config: GatewayConfig) -> dict[str, Any]:
    auth = config.auth
    schemes: dict[str, Any] = {}
    if auth.jwt is not None or auth.api_keys is not None:
        bearer: dict[str, Any] = {"type": "http", "scheme": "bearer"}
        if auth.jwt is not None:
            bearer["bearerFormat"] = "JWT"
        bearer["description"] = "A JWT from the identity provider" if auth.jwt else ""
        if auth.api_keys is not None:
            bearer["description"] += (" or " if auth.jwt else "") + "an API key (mk_...)"
        schemes["bearerAuth"] = bearer
    if auth.api_keys is not None:
        schemes["apiKeyAuth"] = {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    if auth.mtls is not None:
        schemes["mutualTLS"] = {"type": "mutualTLS", "description": "A client certificate from the configured CA."}
    return schemes


def _server_url(config: GatewayConfig) -> str:
    server = config.server
    scheme = "https" if server.tls is not None else "http"
    host = f"[{server.host}]" if ":" in server.host else server.host
    return f"{scheme}://{host}:{server.port}"


def _component_name(model: str, used: set[str]) -> str:
    base = "model." + _COMPONENT.sub("_", model)
    name, n = base, 2
    while name in used or name + ".InferenceRequest" in used:
        name, n = f"{base}_{n}", n + 1
    used.update({name, name + ".InferenceRequest"})
    return name


def _inline(schema: Any, home: str) -> Any:
    """``schema`` relocated to ``home``: its ``#...`` references follow it; root ``$id``/``$schema`` go."""
    if isinstance(schema, dict):
        schema = {k: v for k, v in schema.items() if k not in ("$id", "$schema")}
    return _rewrite_refs(schema, home)


def _rewrite_refs(node: Any, home: str) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str) and (value == "#" or value.startswith("#/")):
                out[key] = home + value[1:]
            else:
                out[key] = _rewrite_refs(value, home)
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, home) for v in node]
    return node


# -- command line ----------------------------------------------------------------------------

def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``maas-gateway openapi -c CONFIG [--out FILE]``: print (or write) the OpenAPI document."""
    parser = subparsers.add_parser("openapi", help="print the OpenAPI 3.1 document of the public API")
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("-o", "--out", help="write to this file instead of standard output")
    parser.set_defaults(func=_command)


def _command(args: argparse.Namespace) -> int:
    from .config import load_config

    text = json.dumps(build_document(load_config(args.config)), indent=2) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0
