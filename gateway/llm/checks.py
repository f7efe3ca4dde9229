"""Request checks of the newer LLM surfaces: the fields the gateway itself relies on.

Like ``gateway.openai_checks`` for chat/completions/embeddings, these are not
copies of each API's reference: they pin the fields the gateway's own
decisions read (the model to authorise, the token limit to reserve, the stream
flag that decides how the answer is relayed, the ids ownership is checked
on), so a body cannot say one thing to the gateway and another to the model
server, and a malformed one is a 400 here instead of a 500 upstream.
"""

from __future__ import annotations

from typing import Any, Callable

from ..v2 import RequestViolation

Check = Callable[[Any, "int | None"], None]


def _fail(pointer: str, rule: str, reason: str) -> RequestViolation:
    return RequestViolation(f"{pointer}: {rule}", reason)


def _object(body: Any) -> dict[str, Any]:
    if type(body) is not dict:
        raise _fail("(root)", "must be an object", "llm_body")
    model = body.get("model")
    if type(model) is not str or not model:
        raise _fail("/model", "must be a single non-empty string", "llm_model")
    return body


def _optional(body: dict[str, Any], key: str, kinds: tuple[type, ...], rule: str) -> Any:
    value = body.get(key)
    if value is not None and type(value) not in kinds:
        raise _fail(f"/{key}", rule, "llm_body")
    return value


def _tokens(body: dict[str, Any], key: str, cap: int | None, *, pointer: str | None = None,
            required: bool = False) -> None:
    value = body.get(key)
    where = pointer or f"/{key}"
    if value is None:
        if required:
            raise _fail(where, "is required (a positive integer)", "llm_max_tokens")
        return
    if type(value) is not int or value < 1:
        raise _fail(where, "must be a positive integer", "llm_max_tokens")
    if cap is not None and value > cap:
        raise _fail(where, f"must be at most {cap} for this model", "llm_max_tokens")


def _stream(body: dict[str, Any]) -> None:
    _optional(body, "stream", (bool,), "must be a boolean")


def _text_or_strings(value: Any, where: str, *, required: bool = True) -> None:
    if value is None and not required:
        return
    if type(value) is str:
        return
    if type(value) is list and value and all(type(v) is str for v in value):
        return
    raise _fail(where, "must be a string or a non-empty list of strings", "llm_input")


def check_responses(body: Any, cap: int | None) -> None:
    """``POST /v1/responses``: ``input`` a string or a list of items; the ids it names are strings."""
    doc = _object(body)
    value = doc.get("input")
    if value is not None and type(value) is not str:
        if type(value) is not list:
            raise _fail("/input", "must be a string or a list of input items", "llm_input")
        for i, item in enumerate(value):
            if type(item) is not dict:
                raise _fail(f"/input/{i}", "must be an object", "llm_input")
    _tokens(doc, "max_output_tokens", cap)
    _stream(doc)
    _optional(doc, "instructions", (str,), "must be a string")
    _optional(doc, "previous_response_id", (str,), "must be a string")
    _optional(doc, "tools", (list,), "must be a list")
    conversation = doc.get("conversation")
    if conversation is not None and type(conversation) is not str and not (
            type(conversation) is dict and type(conversation.get("id")) is str):
        raise _fail("/conversation", "must be a conversation id or an object with a string id", "llm_body")
    if doc.get("previous_response_id") is not None and conversation is not None:
        raise _fail("/conversation", "cannot be used together with previous_response_id", "llm_body")


_ANTHROPIC_ROLES = frozenset({"user", "assistant"})


def _check_anthropic_messages(doc: dict[str, Any]) -> None:
    messages = doc.get("messages")
    if type(messages) is not list or not messages:
        raise _fail("/messages", "must be a non-empty list of messages", "llm_messages")
    for i, message in enumerate(messages):
        where = f"/messages/{i}"
        if type(message) is not dict or message.get("role") not in _ANTHROPIC_ROLES:
            raise _fail(f"{where}/role", "must be user or assistant", "llm_messages")
        content = message.get("content")
        if type(content) is str:
            continue
        if type(content) is not list:
            raise _fail(f"{where}/content", "must be a string or a list of content blocks", "llm_messages")
        for j, block in enumerate(content):
            if type(block) is not dict or type(block.get("type")) is not str:
                raise _fail(f"{where}/content/{j}/type", "must be a string", "llm_messages")
    system = doc.get("system")
    if system is not None and type(system) is not str and type(system) is not list:
        raise _fail("/system", "must be a string or a list of text blocks", "llm_body")


def check_messages(body: Any, cap: int | None) -> None:
    """``POST /v1/messages``: Anthropic requires ``max_tokens``; it is also what the gateway reserves."""
    doc = _object(body)
    _check_anthropic_messages(doc)
    _tokens(doc, "max_tokens", cap, required=True)
    _stream(doc)
    _optional(doc, "tools", (list,), "must be a list")


def check_count_tokens(body: Any, cap: int | None) -> None:
    """``POST /v1/messages/count_tokens``: the messages of a Messages request, nothing generated."""
    doc = _object(body)
    _check_anthropic_messages(doc)


def check_rerank(body: Any, cap: int | None) -> None:
    doc = _object(body)
    if type(doc.get("query")) is not str:
        raise _fail("/query", "must be a string", "llm_input")
    documents = doc.get("documents")
    if type(documents) is not list or not documents:
        raise _fail("/documents", "must be a non-empty list", "llm_input")
    top_n = doc.get("top_n")
    if top_n is not None and (type(top_n) is not int or top_n < 1):
        raise _fail("/top_n", "must be a positive integer", "llm_body")


def check_score(body: Any, cap: int | None) -> None:
    doc = _object(body)
    _text_or_strings(doc.get("text_1"), "/text_1")
    _text_or_strings(doc.get("text_2"), "/text_2")


def check_images(body: Any, cap: int | None) -> None:
    doc = _object(body)
    if type(doc.get("prompt")) is not str or not doc["prompt"]:
        raise _fail("/prompt", "must be a non-empty string", "llm_input")
    n = doc.get("n")
    if n is not None and (type(n) is not int or not 1 <= n <= 10):
        raise _fail("/n", "must be an integer from 1 to 10", "llm_body")
    _stream(doc)


# -- Ollama's native API ---------------------------------------------------------------------

def _ollama_options(doc: dict[str, Any], cap: int | None) -> None:
    options = doc.get("options")
    if options is None:
        return
    if type(options) is not dict:
        raise _fail("/options", "must be an object", "llm_body")
    predict = options.get("num_predict")
    if predict is None or predict == -1 and cap is None:  # -1: "until the model stops" (no cap to break)
        return
    if type(predict) is not int or predict < 1:
        raise _fail("/options/num_predict", "must be a positive integer" + ("" if cap is not None else " or -1"),
                    "llm_max_tokens")
    if cap is not None and predict > cap:
        raise _fail("/options/num_predict", f"must be at most {cap} for this model", "llm_max_tokens")


def check_ollama_chat(body: Any, cap: int | None) -> None:
    doc = _object(body)
    messages = doc.get("messages")
    if messages is not None:  # absent or empty: Ollama loads the model and answers nothing
        if type(messages) is not list:
            raise _fail("/messages", "must be a list of messages", "llm_messages")
        for i, message in enumerate(messages):
            if type(message) is not dict or type(message.get("role")) is not str:
                raise _fail(f"/messages/{i}/role", "must be a string", "llm_messages")
            content = message.get("content")
            if content is not None and type(content) is not str:
                raise _fail(f"/messages/{i}/content", "must be a string", "llm_messages")
    _stream(doc)
    _ollama_options(doc, cap)
    _optional(doc, "tools", (list,), "must be a list")


def check_ollama_generate(body: Any, cap: int | None) -> None:
    doc = _object(body)
    _optional(doc, "prompt", (str,), "must be a string")
    _optional(doc, "system", (str,), "must be a string")
    _stream(doc)
    _ollama_options(doc, cap)


def check_ollama_embed(body: Any, cap: int | None) -> None:
    doc = _object(body)
    _text_or_strings(doc.get("input"), "/input")
    _ollama_options(doc, cap)


def check_ollama_embeddings(body: Any, cap: int | None) -> None:
    doc = _object(body)
    _optional(doc, "prompt", (str,), "must be a string")
    _ollama_options(doc, cap)


def check_model_only(body: Any, cap: int | None) -> None:
    _object(body)


def check_audio(body: Any, cap: int | None) -> None:
    """An audio upload's form (``gateway.llm.multipart``): a ``model`` field and a ``file`` part."""
    doc = _object(body)
    files = doc.get("__files__")
    if type(files) is not list or "file" not in files:
        raise _fail("/file", "is required (the audio file part)", "llm_input")
