"""The paths of the LLM surfaces beyond chat/completions/embeddings, named once.

A leaf module like ``gateway.openai_paths``: the router, the surfaces, the
OpenAPI document and the tests read the same constants, so a route cannot be
served without being checked, metered or documented.
"""

from __future__ import annotations

RESPONSES = "/v1/responses"
RESPONSES_PREFIX = RESPONSES + "/"  # /v1/responses/{id}, .../input_items, .../cancel
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
RERANK = "/v1/rerank"
SCORE = "/v1/score"
IMAGES = "/v1/images/generations"
TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"

OLLAMA_CHAT = "/api/chat"
OLLAMA_GENERATE = "/api/generate"
OLLAMA_EMBED = "/api/embed"
OLLAMA_EMBEDDINGS = "/api/embeddings"
OLLAMA_SHOW = "/api/show"
OLLAMA_TAGS = "/api/tags"

# Ollama's model management: pulls, pushes and writes files on the model server (CVE-2024-37032 and
# friends); answered 404 by the gateway whatever a config says, never forwarded.
OLLAMA_NEVER = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"})
OLLAMA_NEVER_PREFIX = "/api/blobs/"


def never_forwarded(path: str) -> bool:
    """Whether ``path`` is one of the Ollama management endpoints that never reach a model server."""
    return path in OLLAMA_NEVER or path.startswith(OLLAMA_NEVER_PREFIX) or path == OLLAMA_NEVER_PREFIX[:-1]
