"""The OpenAPI path items of the LLM surfaces (Responses, Messages, rerank, score, images, Ollama).

Kept beside the surfaces so a route added there is documented here in the same
change; ``gateway.openapi`` merges these items into the document. Each body
schema pins ``model`` to the models of the protocol that serves the route and
names the fields the gateway itself checks (``gateway.llm.checks``), so a
generated request is one the gateway really accepts; other fields pass through.
"""

from __future__ import annotations

from typing import Any, Iterable

from ..openapi_schemas import BODY_ERRORS, ERRORS, INT64_MAX, READ_ERRORS
from . import paths as lp

_TOKENS = {"type": "integer", "minimum": 1, "maximum": INT64_MAX}
_TEXTS = {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}]}
_ANTHROPIC_MESSAGES = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"enum": ["user", "assistant"]},
                   "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
                       "type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}}]}}}}
_OLLAMA_OPTIONS = {"type": "object", "properties": {"num_predict": _TOKENS}}

# path -> (operation id, summary, required fields, properties, streams)
_OPENAI: dict[str, tuple[str, str, list[str], dict[str, Any], bool]] = {
    lp.RESPONSES: ("responses_create", "OpenAI Responses API; the response id is bound to its creator.", [], {
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "instructions": {"type": "string"}, "max_output_tokens": _TOKENS, "stream": {"type": "boolean"},
        "previous_response_id": {"type": "string"}}, True),
    lp.MESSAGES: ("messages_create", "Anthropic Messages API (as vLLM serves it).", ["messages", "max_tokens"], {
        "messages": _ANTHROPIC_MESSAGES, "max_tokens": _TOKENS, "stream": {"type": "boolean"},
        "system": {"oneOf": [{"type": "string"}, {"type": "array"}]}}, True),
    lp.COUNT_TOKENS: ("messages_count_tokens", "Anthropic token counting.", ["messages"],
                      {"messages": _ANTHROPIC_MESSAGES}, False),
    lp.RERANK: ("rerank", "Rerank documents against a query.", ["query", "documents"], {
        "query": {"type": "string"}, "documents": {"type": "array", "minItems": 1},
        "top_n": {"type": "integer", "minimum": 1, "maximum": INT64_MAX}}, False),
    lp.SCORE: ("score", "Score text pairs.", ["text_1", "text_2"], {"text_1": _TEXTS, "text_2": _TEXTS}, False),
    lp.IMAGES: ("images_generations", "Generate images.", ["prompt"], {
        "prompt": {"type": "string", "minLength": 1}, "n": {"type": "integer", "minimum": 1, "maximum": 10}}, False),
}
_OLLAMA: dict[str, tuple[str, str, list[str], dict[str, Any], bool]] = {
    lp.OLLAMA_CHAT: ("ollama_chat", "Ollama chat (NDJSON stream unless stream is false).", [], {
        "messages": {"type": "array", "items": {"type": "object", "required": ["role"], "properties": {
            "role": {"type": "string"}, "content": {"type": "string"}}}},
        "stream": {"type": "boolean"}, "options": _OLLAMA_OPTIONS}, True),
    lp.OLLAMA_GENERATE: ("ollama_generate", "Ollama generate (NDJSON stream unless stream is false).", [], {
        "prompt": {"type": "string"}, "system": {"type": "string"}, "stream": {"type": "boolean"},
        "options": _OLLAMA_OPTIONS}, True),
    lp.OLLAMA_EMBED: ("ollama_embed", "Ollama embeddings (batch).", ["input"], {"input": _TEXTS,
                                                                             "options": _OLLAMA_OPTIONS}, False),
    lp.OLLAMA_EMBEDDINGS: ("ollama_embeddings", "Ollama embeddings (legacy).", [], {"prompt": {"type": "string"},
                                                                                    "options": _OLLAMA_OPTIONS}, False),
    lp.OLLAMA_SHOW: ("ollama_show", "Ollama model details (action read).", [], {}, False),
}


def _responses(ok: dict[str, Any], errors: Iterable[int]) -> dict[str, Any]:
    out = dict(ok)
    for status in errors:
        out[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
    return out


def _post(op_id: str, summary: str, models: list[str], required: list[str], properties: dict[str, Any],
          streams: str | None, tag: str) -> dict[str, Any]:
    schema = {"type": "object", "required": ["model", *required],
              "properties": {"model": {"enum": sorted(models)}, **properties}}
    content: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if streams:
        content[streams] = {"schema": {"type": "string"}}  # relayed unbuffered
    return {"operationId": op_id, "summary": summary, "tags": [tag],
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": _responses({"200": {"description": "The upstream's answer.", "content": content}},
                                    BODY_ERRORS)}


def _id_operation(op_id: str, summary: str, errors: tuple[int, ...]) -> dict[str, Any]:
    return {"operationId": op_id, "summary": summary, "tags": ["openai"],
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,256}$"}}],
            "responses": _responses({"200": {"description": "The upstream's answer.", "content": {
                "application/json": {"schema": {"type": "object"}}}}}, errors)}


def llm_paths(openai_models: list[str], ollama_models: list[str]) -> dict[str, Any]:
    """Path items for the LLM surfaces the configured models serve."""
    items: dict[str, Any] = {}
    if openai_models:
        for path, (op_id, summary, required, properties, streams) in _OPENAI.items():
            items[path] = {"post": _post(op_id, summary, openai_models, required, properties,
                                         "text/event-stream" if streams else None, "openai")}
        for path, op_id in ((lp.TRANSCRIPTIONS, "audio_transcriptions"), (lp.TRANSLATIONS, "audio_translations")):
            form = {"type": "object", "required": ["model", "file"], "properties": {
                "model": {"enum": sorted(openai_models)}, "file": {"type": "string", "format": "binary"},
                "language": {"type": "string"}, "prompt": {"type": "string"}, "response_format": {"type": "string"}}}
            items[path] = {"post": {
                "operationId": op_id, "summary": "Audio upload (model from the form field; the model's "
                                                 "max_body_bytes holds while it arrives).", "tags": ["openai"],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}},
                "responses": _responses({"200": {"description": "The upstream's answer.", "content": {
                    "application/json": {"schema": {"type": "object"}}}}}, BODY_ERRORS)}}
        owned = " Only for the subject that created it; anyone else: 404."
        items[lp.RESPONSES + "/{id}"] = {
            "get": _id_operation("responses_retrieve", "A stored response." + owned, READ_ERRORS),
            "delete": _id_operation("responses_delete", "Delete a stored response." + owned, READ_ERRORS)}
        items[lp.RESPONSES + "/{id}/input_items"] = {
            "get": _id_operation("responses_input_items", "A stored response's input items." + owned, READ_ERRORS)}
        items[lp.RESPONSES + "/{id}/cancel"] = {
            "post": _id_operation("responses_cancel", "Cancel a background response." + owned, READ_ERRORS)}
    if ollama_models:
        for path, (op_id, summary, required, properties, streams) in _OLLAMA.items():
            items[path] = {"post": _post(op_id, summary, ollama_models, required, properties,
                                         "application/x-ndjson" if streams else None, "ollama")}
        items[lp.OLLAMA_TAGS] = {"get": {
            "operationId": "ollama_tags", "summary": "The ollama models the caller may read.", "tags": ["ollama"],
            "responses": _responses({"200": {"description": "Ollama's model list.", "content": {
                "application/json": {"schema": {"type": "object", "required": ["models"],
                                                "properties": {"models": {"type": "array"}}}}}}},
                (401, 429, 503))}}
    return items
