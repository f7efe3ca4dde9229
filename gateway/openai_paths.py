"""The OpenAI-compatible paths the gateway serves, named once.

The router, the request checks, the OpenAPI document and the HTTP backend all
need to know these paths; one set of constants here keeps a new endpoint from
being routed but not checked, or checked but not streamed. A leaf module: it
imports nothing, so any layer may use it.
"""

from __future__ import annotations

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
MODELS = "/v1/models"  # the model list: a read, not an inference

INFERENCE_PATHS = (CHAT, COMPLETIONS, EMBEDDINGS)  # POST, routed as RouteKind.OPENAI
STREAMING_PATHS = frozenset({CHAT, COMPLETIONS})  # may answer ``text/event-stream`` (``stream: true``)
