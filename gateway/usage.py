"""What an LLM call cost: the one value a backend hands back about usage, and the quota stage reads at the end."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Usage:
    """What an LLM call cost, as the backend learnt it (openai routes).

    Travels back on the backend's answer (``BackendResponse.usage``; a stream
    relay keeps filling the same object until the stream ends) or, when the
    backend failed after the model ran, on the exception it raised
    (``exc.usage``). The gateway puts it on ``ctx.usage`` for the quota stage.
    """

    answered: bool = False  # the upstream answered 2xx: the model ran (no total: the whole reservation is charged)
    total_tokens: int | None = None  # usage.total_tokens the upstream reported
