"""One interface for every LLM API family: what a request asks for, and what its answer cost.

A ``Surface`` is one route of one API family. The stages ask it, never the API:

* request: which backend protocol serves it (``openai`` or ``ollama``), how the
  body is checked, the token estimate the quota stage reserves, the
  ``request.params`` policy conditions read (``gateway.request_params``), and
  whether it streams by default;
* answer: the tokens a whole answer reports (``usage``), and, for streams, an
  ``events.Watcher`` that reads usage and ids from the events as they pass.

Estimates follow ``gateway.quota.llm_tokens`` (four characters a token for the
prompt, the request's own output limit or ``default_tokens_per_request`` for
the answer, capped by the model's ``max_tokens``); ``usage`` follows where each
server puts it: OpenAI ``usage.total_tokens`` (or its parts), Responses
``usage.input_tokens + output_tokens``, Anthropic the same names, Ollama
``prompt_eval_count + eval_count``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .. import openai_paths as op
from ..openai_checks import check_openai_request
from ..quota import llm_tokens
from ..request_params import llm_params
from . import checks
from . import paths as lp

Estimate = Callable[[Any, int, "int | None"], int]  # (body, default completion tokens, model cap) -> tokens


@dataclass(frozen=True, slots=True)
class Surface:
    name: str
    path: str
    protocol: str  # the backend protocol that serves it: "openai" | "ollama"
    check: Callable[[Any, "int | None"], None]
    estimate: Estimate
    usage: Callable[[Any], "int | None"]  # tokens reported by a whole answer (decoded JSON)
    stream: str | None = None  # "sse" | "ndjson": how its stream is framed; None: never streams
    streams_by_default: bool = False  # Ollama: a body without "stream": false is answered as a stream
    action: str = "infer"
    gateway_usage: bool = True  # usage read by the gateway's answer stage (chat/completions/embeddings: the relay)
    multipart: bool = False  # multipart/form-data (audio): the body stage decodes only its text fields

    def params(self, body: Any) -> dict[str, Any]:
        """``request.params.*`` of a body of this surface (one parse for every family)."""
        if self.multipart and isinstance(body, dict):  # form fields are text: "true", "0.2"
            form, body = body, {"stream": body.get("stream") in ("true", "True", "1")}
            try:
                body["temperature"] = float(form["temperature"])
            except (KeyError, TypeError, ValueError):
                pass  # absent or not a number: unknown, as for a JSON body
        return llm_params(body)

    def streaming(self, body: Any) -> bool:
        if self.stream is None or not isinstance(body, dict):
            return False
        flag = body.get("stream")
        return flag is True or (flag is None and self.streams_by_default)


# -- prompt text ---------------------------------------------------------------------------------

def _chars(value: Any, depth: int = 0) -> int:
    """Characters of text in a prompt value: strings, and the text/content of nested parts and items."""
    if isinstance(value, str):
        return len(value)
    if depth > 4:
        return 0
    if isinstance(value, list):
        return sum(_chars(item, depth + 1) for item in value)
    if isinstance(value, dict):
        total = 0
        for key in ("text", "content", "input_text", "output", "arguments"):
            total += _chars(value.get(key), depth + 1)
        return total
    return 0


def _prompt(body: Any, *keys: str) -> int:
    if not isinstance(body, dict):
        return 0
    return math.ceil(sum(_chars(body.get(k)) for k in keys) / 4)


def _limit(body: Any, keys: tuple[str, ...], default: int, cap: int | None) -> int:
    asked = None
    if isinstance(body, dict):
        for key in keys:
            value = body.get(key)
            if type(value) is int and value > 0:
                asked = value
                break
        options = body.get("options")
        if asked is None and isinstance(options, dict):
            predict = options.get("num_predict")
            if type(predict) is int and predict > 0:
                asked = predict
    tokens = default if asked is None else asked
    return max(0, min(tokens, cap) if cap is not None else tokens)


def _openai_estimate(path: str) -> Estimate:
    def estimate(body: Any, default: int, cap: int | None) -> int:
        return llm_tokens.estimate(body, path, default, cap)[1]
    return estimate


def _generating(*prompt_keys: str, limits: tuple[str, ...] = ()) -> Estimate:
    def estimate(body: Any, default: int, cap: int | None) -> int:
        return _prompt(body, *prompt_keys) + _limit(body, limits, default, cap)
    return estimate


def _prompt_only(*prompt_keys: str) -> Estimate:
    def estimate(body: Any, default: int, cap: int | None) -> int:
        return _prompt(body, *prompt_keys)
    return estimate


def _nothing(body: Any, default: int, cap: int | None) -> int:
    return 0


# -- reported usage --------------------------------------------------------------------------------

def _count(value: Any) -> int | None:
    return value if type(value) is int and value >= 0 else None


def usage_tokens(usage: Any) -> int | None:
    """Tokens in a ``usage`` object of any OpenAI-style or Anthropic answer; None when it reports none."""
    if not isinstance(usage, dict):
        return None
    total = _count(usage.get("total_tokens"))
    if total is not None:
        return total
    for first, second in (("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens")):
        a, b = _count(usage.get(first)), _count(usage.get(second))
        if a is not None or b is not None:
            extra = sum(_count(usage.get(k)) or 0 for k in ("cache_creation_input_tokens", "cache_read_input_tokens"))
            return (a or 0) + (b or 0) + extra
    return None


def answer_usage(doc: Any) -> int | None:
    """``usage`` of an OpenAI, Responses, Anthropic, rerank or score answer."""
    return usage_tokens(doc.get("usage")) if isinstance(doc, dict) else None


def ollama_usage(doc: Any) -> int | None:
    """Ollama reports ``prompt_eval_count`` and ``eval_count`` on its final (``done``) object."""
    if not isinstance(doc, dict):
        return None
    prompt, generated = _count(doc.get("prompt_eval_count")), _count(doc.get("eval_count"))
    if prompt is None and generated is None:
        return None
    return (prompt or 0) + (generated or 0)


def _openai_check(path: str) -> Callable[[Any, int | None], None]:
    def check(body: Any, cap: int | None) -> None:
        check_openai_request(path, body, max_tokens_cap=cap)
    return check


_ALL = (
    Surface("chat", op.CHAT, "openai", _openai_check(op.CHAT), _openai_estimate(op.CHAT), answer_usage,
            stream="sse", gateway_usage=False),
    Surface("completions", op.COMPLETIONS, "openai", _openai_check(op.COMPLETIONS),
            _openai_estimate(op.COMPLETIONS), answer_usage, stream="sse", gateway_usage=False),
    Surface("embeddings", op.EMBEDDINGS, "openai", _openai_check(op.EMBEDDINGS),
            _openai_estimate(op.EMBEDDINGS), answer_usage, gateway_usage=False),
    Surface("responses", lp.RESPONSES, "openai", checks.check_responses,
            _generating("input", "instructions", limits=("max_output_tokens",)), answer_usage, stream="sse"),
    Surface("messages", lp.MESSAGES, "openai", checks.check_messages,
            _generating("messages", "system", limits=("max_tokens",)), answer_usage, stream="sse"),
    Surface("count_tokens", lp.COUNT_TOKENS, "openai", checks.check_count_tokens, _nothing, lambda doc: None),
    Surface("rerank", lp.RERANK, "openai", checks.check_rerank, _prompt_only("query", "documents"), answer_usage),
    Surface("score", lp.SCORE, "openai", checks.check_score, _prompt_only("text_1", "text_2"), answer_usage),
    Surface("images", lp.IMAGES, "openai", checks.check_images, _prompt_only("prompt"), answer_usage),
    Surface("transcriptions", lp.TRANSCRIPTIONS, "openai", checks.check_audio, _nothing, answer_usage,
            multipart=True),
    Surface("translations", lp.TRANSLATIONS, "openai", checks.check_audio, _nothing, answer_usage, multipart=True),
    Surface("ollama_chat", lp.OLLAMA_CHAT, "ollama", checks.check_ollama_chat,
            _generating("messages", limits=()), ollama_usage, stream="ndjson", streams_by_default=True),
    Surface("ollama_generate", lp.OLLAMA_GENERATE, "ollama", checks.check_ollama_generate,
            _generating("prompt", "system", limits=()), ollama_usage, stream="ndjson", streams_by_default=True),
    Surface("ollama_embed", lp.OLLAMA_EMBED, "ollama", checks.check_ollama_embed, _prompt_only("input"),
            ollama_usage),
    Surface("ollama_embeddings", lp.OLLAMA_EMBEDDINGS, "ollama", checks.check_ollama_embeddings,
            _prompt_only("prompt"), ollama_usage),
    Surface("ollama_show", lp.OLLAMA_SHOW, "ollama", checks.check_model_only, _nothing, lambda doc: None,
            action="read"),
)

SURFACES: dict[str, Surface] = {s.path: s for s in _ALL}


def surface_for(path: str) -> Surface | None:
    """The surface of a normalised path, or None for a route that is no LLM body route."""
    return SURFACES.get(path)
