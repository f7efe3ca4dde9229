"""Fake model servers that answer like vLLM (OpenAI Responses, Anthropic Messages, rerank, score,
images) and like Ollama (native API, NDJSON streams), for the LLM surface tests.

Each is an aiohttp handler for ``tests.harness.upstream`` (which records every request it gets).
Streams can be held after their first event by a ``Gate``: the test opens it only once its client
has received that event, which proves the gateway relays each event as it comes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

RESPONSE_USAGE = {"input_tokens": 11, "output_tokens": 7, "total_tokens": 18,
                  "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
MESSAGES_INPUT, MESSAGES_OUTPUT = 12, 6
OLLAMA_PROMPT, OLLAMA_EVAL = 7, 3


@dataclass
class Gate:
    """Holds a stream after its first event until ``opened`` is set (never longer than ``timeout_s``)."""

    opened: asyncio.Event = field(default_factory=asyncio.Event)
    timeout_s: float = 5.0

    async def wait(self) -> bool:
        try:
            await asyncio.wait_for(self.opened.wait(), self.timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


@dataclass
class Fake:
    """Knobs of a fake server: ``gate`` holds streams; ``usage=False`` leaves usage out of answers."""

    gate: Gate | None = None
    usage: bool = True
    ids: int = 0
    held: list[bool] = field(default_factory=list)  # per gated stream: whether the gate opened in time

    def next_id(self, prefix: str) -> str:
        self.ids += 1
        return f"{prefix}_{self.ids:04d}"


def response_object(rid: str, model: str, *, status: str = "completed", usage: bool = True,
                    text: str = "Hello there") -> dict[str, Any]:
    return {
        "id": rid, "object": "response", "created_at": 1700000000, "model": model, "status": status,
        "output": [] if status == "in_progress" else [{
            "type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}],
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
        "incomplete_details": None, "instructions": None, "metadata": {}, "temperature": 1.0, "top_p": 1.0,
        "usage": RESPONSE_USAGE if usage and status != "in_progress" else None,
    }


def _sse(event: str, doc: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


async def _stream(request: web.Request, fake: Fake, parts: list[bytes], content_type: str) -> web.StreamResponse:
    out = web.StreamResponse(headers={"Content-Type": content_type})
    await out.prepare(request)
    for i, part in enumerate(parts):
        await out.write(part)
        if i == 0 and fake.gate is not None:
            fake.held.append(await fake.gate.wait())
    await out.write_eof()
    return out


def vllm(fake: Fake | None = None) -> Any:
    """A handler that answers like vLLM's OpenAI-compatible server (Responses, Messages, rerank, ...)."""
    fake = fake or Fake()
    stored: dict[str, dict[str, Any]] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        path = request.path
        body = await request.json() if request.body_exists else {}
        if path == "/v1/responses" and request.method == "POST":
            rid = fake.next_id("resp")
            model = body.get("model", "?")
            final = response_object(rid, model, usage=fake.usage)
            conversation = body.get("conversation")
            if (body.get("metadata") or {}).get("new_conversation"):  # as if the server opened a conversation
                conversation = fake.next_id("conv")
            if conversation is not None:
                final["conversation"] = {"id": conversation if isinstance(conversation, str) else conversation["id"]}
            stored[rid] = final
            if not body.get("stream"):
                return web.json_response(final)
            start = response_object(rid, model, status="in_progress")
            if "conversation" in final:
                start["conversation"] = final["conversation"]
            parts = [_sse("response.created", {"type": "response.created", "sequence_number": 0, "response": start})]
            for i, word in enumerate(["Hello", " there"]):
                parts.append(_sse("response.output_text.delta", {
                    "type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "msg_1",
                    "output_index": 0, "content_index": 0, "delta": word, "logprobs": []}))
            parts.append(_sse("response.completed", {"type": "response.completed", "sequence_number": 3,
                                                     "response": final}))
            return await _stream(request, fake, parts, "text/event-stream")
        if path.startswith("/v1/responses/"):
            rid, _, tail = path[len("/v1/responses/"):].partition("/")
            if rid not in stored:
                return web.json_response({"error": {"message": "not found"}}, status=404)
            if tail == "input_items":
                return web.json_response({"object": "list", "data": [
                    {"type": "message", "id": "in_1", "role": "user", "status": "completed",
                     "content": [{"type": "input_text", "text": "hi"}]}],
                    "first_id": "in_1", "last_id": "in_1", "has_more": False})
            if tail == "cancel":
                return web.json_response({**stored[rid], "status": "cancelled"})
            if request.method == "DELETE":
                del stored[rid]
                return web.json_response({"id": rid, "object": "response", "deleted": True})
            return web.json_response(stored[rid])
        if path == "/v1/messages/count_tokens":
            return web.json_response({"input_tokens": MESSAGES_INPUT})
        if path == "/v1/messages":
            return await _messages(request, fake, body)
        if path == "/v1/rerank":
            docs = body.get("documents", [])
            return web.json_response({"id": "rerank-1", "model": body.get("model"), "results": [
                {"index": i, "relevance_score": 1.0 / (i + 1), "document": {"text": d}} for i, d in enumerate(docs)],
                "usage": {"total_tokens": 9}})
        if path == "/v1/score":
            return web.json_response({"id": "score-1", "object": "list", "model": body.get("model"),
                                      "data": [{"index": 0, "object": "score", "score": 0.5}],
                                      "usage": {"prompt_tokens": 8, "total_tokens": 8}})
        if path == "/v1/images/generations":
            return web.json_response({"created": 0, "data": [{"b64_json": "aGVsbG8="}]})
        return web.json_response({"error": {"message": f"no route {path}"}}, status=404)

    return handler


async def _messages(request: web.Request, fake: Fake, body: dict[str, Any]) -> web.StreamResponse:
    model = body.get("model", "?")
    usage = {"input_tokens": MESSAGES_INPUT, "output_tokens": MESSAGES_OUTPUT}
    if not body.get("stream"):
        return web.json_response({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "Hello there"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": usage if fake.usage else {}})
    start = {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
        "stop_sequence": None, "usage": {"input_tokens": MESSAGES_INPUT, "output_tokens": 1}}}
    parts = [_sse("message_start", start),
             _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                          "content_block": {"type": "text", "text": ""}})]
    for word in ("Hello", " there"):
        parts.append(_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                  "delta": {"type": "text_delta", "text": word}}))
    parts.append(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    parts.append(_sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn",
                                                                           "stop_sequence": None},
                                        "usage": {"output_tokens": MESSAGES_OUTPUT}}))
    parts.append(_sse("message_stop", {"type": "message_stop"}))
    return await _stream(request, fake, parts, "text/event-stream")


def _line(doc: dict[str, Any]) -> bytes:
    return orjson.dumps(doc) + b"\n"


def ollama(fake: Fake | None = None) -> Any:
    """A handler that answers like Ollama's native API (NDJSON streams unless ``"stream": false``)."""
    fake = fake or Fake()

    async def handler(request: web.Request) -> web.StreamResponse:
        path = request.path
        body = await request.json() if request.body_exists else {}
        model = body.get("model", "?")
        stamp = "2024-01-01T00:00:00Z"
        counts = {"prompt_eval_count": OLLAMA_PROMPT, "eval_count": OLLAMA_EVAL} if fake.usage else {}
        final = {"model": model, "created_at": stamp, "done": True, "done_reason": "stop", "total_duration": 1,
                 "load_duration": 1, "prompt_eval_duration": 1, "eval_duration": 1, **counts}
        if path in ("/api/chat", "/api/generate"):
            words = ["Hel", "lo"]
            if path == "/api/chat":
                pieces = [{"model": model, "created_at": stamp, "message": {"role": "assistant", "content": w},
                           "done": False} for w in words]
                last = {**final, "message": {"role": "assistant", "content": ""}}
            else:
                pieces = [{"model": model, "created_at": stamp, "response": w, "done": False} for w in words]
                last = {**final, "response": ""}
            if body.get("stream") is False:
                whole = dict(last)
                if path == "/api/chat":
                    whole["message"] = {"role": "assistant", "content": "".join(words)}
                else:
                    whole["response"] = "".join(words)
                return web.json_response(whole)
            return await _stream(request, fake, [_line(p) for p in pieces] + [_line(last)], "application/x-ndjson")
        if path == "/api/embed":
            inputs = body.get("input")
            n = len(inputs) if isinstance(inputs, list) else 1
            return web.json_response({"model": model, "embeddings": [[0.1, 0.2, 0.3]] * n, "total_duration": 1,
                                      "load_duration": 1, **({"prompt_eval_count": 4} if fake.usage else {})})
        if path == "/api/embeddings":
            return web.json_response({"embedding": [0.1, 0.2, 0.3]})
        if path == "/api/show":
            return web.json_response({"modelfile": "FROM x", "parameters": "", "template": "{{ .Prompt }}",
                                      "details": {"format": "gguf", "family": "llama"}, "model_info": {}})
        if path == "/api/tags":  # never asked by the gateway: it answers /api/tags itself
            return web.json_response({"models": [{"name": "everything-upstream"}]})
        return web.json_response({"status": "success"})  # /api/pull, /api/delete, ...: must never be reached

    return handler
