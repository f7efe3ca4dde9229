"""The fixed parts of the OpenAPI document: protocol envelopes, tensor schemas and error responses.

They depend only on the protocols and on the error table in ``errors.py``, never on a config, so
``openapi.py`` (which turns a config into a document) stays about routes and models.
"""

from __future__ import annotations

import math
from typing import Any

from . import errors
from .config import TensorSpec
from .v2 import DATATYPES

INT64_MAX = 2**63 - 1
_ERROR_CLASSES = (  # (class, component name, when): status and type come from the one table in errors.py
    (errors.InvalidRequest, "BadRequest", "Malformed JSON, schema or protocol violation (the message names the JSON pointer)."),
    (errors.Unauthenticated, "Unauthenticated", "Missing, malformed, expired or unverifiable credentials."),
    (errors.Forbidden, "Forbidden", "Denied by policy."),
    (errors.NotFound, "NotFound", "Unknown model or route."),
    (errors.RequestTimeout, "RequestTimeout", "The request body did not arrive in time."),
    (errors.PayloadTooLarge, "PayloadTooLarge", "Body over server.max_body_bytes."),
    (errors.UnsupportedMediaType, "UnsupportedMediaType", "A JSON route without a JSON Content-Type."),
    (errors.RateLimited, "RateLimited", "Quota exhausted; retry after Retry-After seconds."),
    (errors.BackendError, "BackendError", "The upstream answered with something broken."),
    (errors.Unavailable, "Unavailable", "No healthy upstream, or the quota store is down under on_store_error: deny."),
    (errors.BackendTimeout, "BackendTimeout", "The upstream did not answer in time."),
)
ERRORS = {cls.status: (name, cls.type, when) for cls, name, when in _ERROR_CLASSES}  # status -> (component, type, when)
READ_ERRORS = (401, 403, 404, 429, 502, 503, 504)
BODY_ERRORS = (400, 401, 403, 404, 408, 413, 415, 429, 502, 503, 504)

def v2_request(inputs: list[TensorSpec] | None, own: dict[str, Any] | None) -> dict[str, Any]:
    """The v2 envelope; pinned to the declared inputs when their shapes are fixed; plus the model's schema."""
    request: dict[str, Any] = {"$ref": "#/components/schemas/InferenceRequest"}
    if inputs and all(d >= 0 for spec in inputs for d in spec.shape):
        pinned = [_pinned_tensor(spec) for spec in inputs]
        request = {"allOf": [request, {"type": "object", "properties": {"inputs": {
            "type": "array", "prefixItems": pinned, "items": False, "minItems": len(pinned)}}}]}
    if own is None:
        return request
    return {"allOf": [request, own]}


def _pinned_tensor(spec: TensorSpec) -> dict[str, Any]:
    count = math.prod(spec.shape)
    return {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"const": spec.name},
            "shape": {"const": list(spec.shape)},
            "datatype": {"const": spec.datatype},
            "data": {"type": "array", "items": _value_schema(spec.datatype), "minItems": count, "maxItems": count},
        },
    }


def _value_schema(datatype: str) -> dict[str, Any]:
    spec = DATATYPES[datatype]
    if spec.types == frozenset({bool}):
        return {"type": "boolean"}
    if spec.types == frozenset({str}):
        return {"type": "string"}
    kind = "integer" if spec.types == frozenset({int}) else "number"
    schema: dict[str, Any] = {"type": kind}
    if spec.low is not None:
        schema["minimum"] = int(spec.low) if kind == "integer" else spec.low
    if spec.high is not None:
        schema["maximum"] = int(spec.high) if kind == "integer" else spec.high
    return schema


def protocol_schemas() -> dict[str, Any]:
    token_id = {"type": "integer", "minimum": 0, "maximum": INT64_MAX}
    text_or_tokens = {"oneOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        {"type": "array", "minItems": 1, "items": token_id},
        {"type": "array", "minItems": 1, "items": {"type": "array", "minItems": 1, "items": token_id}},
    ]}
    tokens = {"type": "integer", "minimum": 1, "maximum": INT64_MAX}
    common = {"model": {"type": "string", "minLength": 1}, "max_tokens": tokens, "max_completion_tokens": tokens,
              "stream": {"type": "boolean"}, "stream_options": {"type": ["object", "null"]},
              "n": {"type": "integer", "minimum": 1, "maximum": INT64_MAX}}
    return {
        "Error": {"description": "Nested everywhere, except on /v2/... and /api/..., where the fields are flat "
                                 "and error is the message (the shape Triton and Ollama clients read).",
                  "oneOf": [
            {"type": "object", "required": ["error"], "additionalProperties": False,
             "properties": {"error": {
                 "type": "object", "required": ["type", "message", "request_id"],
                 "properties": {
                     "type": {"type": "string", "enum": _error_types()},
                     "message": {"type": "string"},
                     "request_id": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
                 },
             }}},
            {"type": "object", "required": ["error", "type", "request_id"], "additionalProperties": False,
             "properties": {
                 "error": {"type": "string"},
                 "type": {"type": "string", "enum": _error_types()},
                 "request_id": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
             }},
        ]},
        "Tensor": {
            "type": "object", "required": ["name", "shape", "datatype", "data"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "shape": {"type": "array", "maxItems": 32, "items": {"type": "integer", "minimum": 0, "maximum": INT64_MAX}},
                "datatype": {"enum": list(DATATYPES)},
                "data": {"type": "array", "description": "Row-major values, flat or nested; as many as the shape says."},
                "parameters": {"type": "object"},
            },
        },
        "InferenceRequest": {
            "type": "object", "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "inputs": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/Tensor"}},
                "outputs": {"type": "array", "items": {"type": "object", "required": ["name"],
                                                        "properties": {"name": {"type": "string", "minLength": 1}}}},
            },
        },
        "InferenceResponse": {
            "type": "object",
            "properties": {"model_name": {"type": "string"}, "id": {"type": "string"},
                           "outputs": {"type": "array", "items": {"type": "object"}}},
        },
        "ModelMetadata": {"type": "object", "properties": {"name": {"type": "string"}, "platform": {"type": "string"},
                                                            "inputs": {"type": "array"}, "outputs": {"type": "array"}}},
        "ModelList": {"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}},
        }},
        "ChatMessage": {
            "type": "object", "required": ["role", "content"],
            "properties": {
                "role": {"enum": ["system", "user", "assistant", "tool", "developer", "function"]},
                "name": {"type": "string"},
                "content": {"oneOf": [
                    {"type": "string"},
                    {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["type"],
                        "properties": {"type": {"type": "string", "minLength": 1}, "text": {"type": "string"}},
                        "if": {"properties": {"type": {"const": "text"}}},
                        "then": {"required": ["text"]},
                    }},
                ]},
            },
        },
        "ChatCompletionRequest": {
            "type": "object", "required": ["model", "messages"],
            "properties": {**common, "messages": {"type": "array", "minItems": 1,
                                                  "items": {"$ref": "#/components/schemas/ChatMessage"}}},
        },
        "CompletionRequest": {"type": "object", "required": ["model", "prompt"],
                              "properties": {**common, "prompt": text_or_tokens}},
        "EmbeddingRequest": {"type": "object", "required": ["model", "input"],
                             "properties": {**common, "input": text_or_tokens}},
    }


def _error_types() -> list[str]:
    found, todo = set(), [errors.GatewayError]
    while todo:
        cls = todo.pop()
        found.add(cls.type)
        todo.extend(cls.__subclasses__())
    return sorted(found)


def error_responses() -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    request_id = {"X-Request-ID": {"description": "The request's id (the client's when it was safe).",
                                   "schema": {"type": "string"}}}
    responses: dict[str, Any] = {}
    for status, (name, error_type, when) in ERRORS.items():
        headers = dict(request_id)
        if status == 401:
            headers["WWW-Authenticate"] = {"description": "Bearer challenge.", "schema": {"type": "string"}}
        if status == 429:
            headers["Retry-After"] = {"description": "Whole seconds, at least 1.", "schema": {"type": "integer", "minimum": 1}}
            for h in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"):
                headers[h] = {"schema": {"type": "integer", "minimum": 0}}
        responses[name] = {"description": f"{error_type}: {when}", "headers": headers, "content": error}
    return responses
