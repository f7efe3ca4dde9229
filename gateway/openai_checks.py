"""OpenAI-compatible request checks: the shape every OpenAI-style server assumes.

Model servers behind ``/v1/*`` (vLLM, TGI, Ollama) answer a malformed request in
their own ways, some with a 500 and a stack trace, and the gateway's own
decisions read the body too: the model to authorise comes from ``model``, the
LLM token quota from ``max_tokens``. So ``model`` must be exactly one string
(a list would let a request name one model to the policy and another to the
backend), ``messages``/``prompt``/``input`` must have the documented shape, and
``max_tokens`` must be a positive integer within the model's configured cap.
Fields not checked here pass through untouched: these are the ones a gateway
relies on, not a copy of the OpenAI reference.
"""

from __future__ import annotations

from typing import Any

from .openai_paths import CHAT, COMPLETIONS, EMBEDDINGS
from .v2 import RequestViolation

ROLES = ("system", "user", "assistant", "tool", "developer", "function")
_ROLES = frozenset(ROLES)
_TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def check_openai_request(path: str, body: Any, *, max_tokens_cap: int | None = None) -> None:
    """Raise ``RequestViolation`` unless ``body`` is a well-formed request for ``path``."""
    if type(body) is not dict:
        raise RequestViolation("(root): must be an object", "openai_body")
    model = body.get("model")
    if type(model) is not str or not model:
        raise RequestViolation("/model: must be a single non-empty string", "openai_model")
    if path == CHAT:
        _check_messages(body.get("messages"))
    elif path == COMPLETIONS:
        _check_text_or_tokens(body, "prompt")
    elif path == EMBEDDINGS:
        _check_text_or_tokens(body, "input")
    for field in _TOKEN_FIELDS:
        _check_max_tokens(body, field, max_tokens_cap, model)
    stream = body.get("stream")
    if stream is not None and type(stream) is not bool:
        raise RequestViolation("/stream: must be a boolean", "openai_body")
    if "stream_options" in body and body["stream_options"] is not None and type(body["stream_options"]) is not dict:
        raise RequestViolation("/stream_options: must be an object", "openai_body")
    n = body.get("n")
    if n is not None and (type(n) is not int or n < 1):
        raise RequestViolation("/n: must be a positive integer", "openai_body")


def _check_messages(messages: Any) -> None:
    if type(messages) is not list or not messages:
        raise RequestViolation("/messages: must be a non-empty list of messages", "openai_messages")
    for i, message in enumerate(messages):
        where = f"/messages/{i}"
        if type(message) is not dict:
            raise RequestViolation(f"{where}: must be an object with role and content", "openai_messages")
        role = message.get("role")
        if type(role) is not str or role not in _ROLES:
            raise RequestViolation(f"{where}/role: must be one of {', '.join(ROLES)}", "openai_messages")
        if "name" in message and type(message["name"]) is not str:
            raise RequestViolation(f"{where}/name: must be a string", "openai_messages")
        content = message.get("content")
        if content is None:
            # An assistant turn that only calls tools carries no content; every other turn must.
            if role == "assistant" and (message.get("tool_calls") or message.get("function_call")):
                continue
            raise RequestViolation(f"{where}/content: is required (a string or a list of parts)", "openai_messages")
        if type(content) is str:
            continue
        if type(content) is not list or not content:
            raise RequestViolation(f"{where}/content: must be a string or a non-empty list of parts", "openai_messages")
        for j, part in enumerate(content):
            kind = part.get("type") if type(part) is dict else None
            if type(kind) is not str or not kind:
                raise RequestViolation(f"{where}/content/{j}/type: must be a string", "openai_messages")
            if kind == "text" and type(part.get("text")) is not str:
                raise RequestViolation(f"{where}/content/{j}/text: must be a string", "openai_messages")


def _check_text_or_tokens(body: dict[str, Any], field: str) -> None:
    """``prompt``/``input``: a string, a list of strings, a token list, or a list of token lists."""
    value = body.get(field)
    where = f"/{field}"
    if type(value) is str:
        return
    message = f"{where}: must be a string, a list of strings, a list of token ids or a list of token id lists"
    if type(value) is not list or not value:
        raise RequestViolation(message, f"openai_{field}")
    kinds = set(map(type, value))
    if kinds == {str}:
        return
    if kinds == {int}:
        if min(value) < 0:
            raise RequestViolation(f"{where}: token ids must be non-negative", f"openai_{field}")
        return
    if kinds == {list}:
        for i, tokens in enumerate(value):
            if not tokens or set(map(type, tokens)) != {int} or min(tokens) < 0:
                raise RequestViolation(f"{where}/{i}: must be a non-empty list of token ids", f"openai_{field}")
        return
    raise RequestViolation(message, f"openai_{field}")


def _check_max_tokens(body: dict[str, Any], field: str, cap: int | None, model: str) -> None:
    value = body.get(field)
    if value is None:
        return
    if type(value) is not int or value < 1:
        raise RequestViolation(f"/{field}: must be a positive integer", "openai_max_tokens")
    if cap is not None and value > cap:
        raise RequestViolation(f"/{field}: must be at most {cap} for this model", "openai_max_tokens")
