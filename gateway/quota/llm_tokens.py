"""LLM token budgets (``tokens_per_minute``): what a request may cost, and what it did cost.

Other gateways charge tokens after the answer, so the request that overshoots
a budget still completes. We reserve an *estimate* up front, atomically with
the rate check, and refuse the request that would overshoot; when the request
ends we *reconcile*: refund what was reserved but not used, or charge what
was used beyond it.

Estimate (reserved before forwarding)::

    prompt     = ceil(characters of the prompt text / 4)
    completion = the request's max_tokens (or max_completion_tokens),
                 else quota.default_tokens_per_request, capped by the model's max_tokens,
                 times n (choices asked for); 0 for /v1/embeddings
    estimate   = prompt + completion

The prompt text is every message's ``content`` (strings, and the ``text`` of
content parts) for chat, ``prompt`` for completions, ``input`` for
embeddings. Four characters per token is the usual rule of thumb for English
with GPT-style tokenisers; it is only a reservation, corrected on reconcile.

Actual use (charged when the request ends, from the ``pipeline.Usage`` the backend
reported with its answer), first that applies:

1. ``usage.total_tokens`` reported by the upstream (a non-streamed answer, or
   the usage chunk of a stream: the HTTP backend always asks for it with
   ``stream_options.include_usage``, whatever the client said);
2. the upstream answered 2xx but its usage never arrived (an upstream that
   does not report it, a stream the client abandoned or that broke off): the
   whole reservation. Nothing the client controls can make this less: counting
   relayed text instead let a client that turned usage off and got an answer
   made of tool calls (no text) pay for its prompt alone;
3. the upstream never answered 2xx (an error before the model ran): 0.
"""

from __future__ import annotations

import math
from typing import Any

MAX_CHOICES = 128  # ``n`` beyond this is treated as this (upstreams refuse more anyway)


def _text_chars(value: Any) -> int:
    """Characters of prompt text in a message content / prompt / input value."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, str):
                total += len(item)
            elif isinstance(item, dict):
                text = item.get("text")
                if isinstance(text, str):
                    total += len(text)
            elif isinstance(item, list):  # token-id arrays: one token each
                total += 4 * len(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                total += 4
        return total
    return 0


def prompt_tokens(body: Any) -> int:
    """ceil(prompt characters / 4) of an OpenAI-style request body (0 for anything unexpected)."""
    if not isinstance(body, dict):
        return 0
    chars = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                chars += _text_chars(message.get("content"))
    chars += _text_chars(body.get("prompt"))
    chars += _text_chars(body.get("input"))
    return math.ceil(chars / 4)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (math.inf, -math.inf):
        return None
    return int(value)


def completion_tokens(body: Any, default: int, cap: int | None = None, *, embeddings: bool = False) -> int:
    """Tokens the answer may take: max_tokens / max_completion_tokens, else ``default``; times ``n``."""
    if embeddings:
        return 0
    asked = None
    if isinstance(body, dict):
        asked = _int(body.get("max_completion_tokens"))
        if asked is None:
            asked = _int(body.get("max_tokens"))
    tokens = default if asked is None or asked < 0 else asked
    if cap is not None:
        tokens = min(tokens, cap)
    n = _int(body.get("n")) if isinstance(body, dict) else None
    choices = min(MAX_CHOICES, n) if n is not None and n >= 1 else 1
    return max(0, tokens) * choices


def estimate(body: Any, path: str, default: int, cap: int | None = None) -> tuple[int, int]:
    """(prompt estimate, total estimate to reserve) for an OpenAI request to ``path``."""
    prompt = prompt_tokens(body)
    completion = completion_tokens(body, default, cap, embeddings=path.endswith("/embeddings"))
    return prompt, prompt + completion


def actual(usage_tokens: int | None, answered: bool, reserved: int) -> int:
    """What the request used, by the rules in this module's docstring."""
    if usage_tokens is not None and usage_tokens >= 0:
        return int(usage_tokens)
    return reserved if answered else 0
