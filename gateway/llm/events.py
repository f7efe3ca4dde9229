"""Reading usage and ids from LLM streams as they pass, without holding a byte back.

``WatchedStream`` wraps the relay of an SSE or NDJSON answer: every chunk is
handed on the moment it arrives, unchanged; on the side, the complete lines of
what has passed are looked at, and only a line carrying one of the watcher's
markers (a byte search: ``"usage"``, ``"eval_count"``, ``response.created``)
is parsed. Inside a JSON string a quote is escaped, so model text can never
forge a marker key; at worst it causes one needless parse.

One watcher per API family:

* ``ResponsesWatcher``: the id of ``response.created`` (claimed for the caller
  *before* the chunk that carries it reaches the client, so no client can ask
  for a response id the gateway does not yet know is theirs) and the usage of
  ``response.completed`` (or ``.incomplete``/``.failed``);
* ``MessagesWatcher``: ``message_start``'s input tokens plus the output tokens
  of the latest ``message_delta`` (Anthropic's are cumulative);
* ``OllamaWatcher``: the final ``"done": true`` object's ``prompt_eval_count``
  + ``eval_count``.

A stream that ends without its usage leaves ``Usage.total_tokens`` unset: the
quota stage then charges the whole reservation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import orjson

from ..pipeline import HOLD
from .surfaces import ollama_usage, usage_tokens

if TYPE_CHECKING:
    from ..usage import Usage

MAX_LINE = 1_048_576  # a longer unterminated line is not scanned (the bytes still pass)


class Watcher:
    """Reads one family's events. ``markers``: a line with none of them is never parsed."""

    markers: tuple[bytes, ...] = ()
    sse = True

    def __init__(self, usage: Usage) -> None:
        self.usage = usage

    def event(self, doc: dict[str, Any]) -> str | None:
        """Take one decoded event; return a response id to claim before the event is relayed."""
        return None


class ResponsesWatcher(Watcher):
    markers = (b"response.created", b'"usage"')

    def __init__(self, usage: Usage) -> None:
        super().__init__(usage)
        self.conversation: str | None = None  # the conversation response.created names, if any

    def event(self, doc: dict[str, Any]) -> str | None:
        kind = doc.get("type")
        response = doc.get("response")
        if not isinstance(response, dict):
            return None
        if kind == "response.created":
            conversation = response.get("conversation")
            if isinstance(conversation, dict) and isinstance(conversation.get("id"), str):
                self.conversation = conversation["id"]
            rid = response.get("id")
            return rid if isinstance(rid, str) and rid else None
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            total = usage_tokens(response.get("usage"))
            if total is not None:
                self.usage.total_tokens = total
        return None


class MessagesWatcher(Watcher):
    markers = (b'"usage"',)

    def __init__(self, usage: Usage) -> None:
        super().__init__(usage)
        self._input = 0
        self._output = 0

    def event(self, doc: dict[str, Any]) -> str | None:
        kind = doc.get("type")
        if kind == "message_start":
            message = doc.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._input = sum(v for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
                                  if type(v := usage.get(k)) is int and v >= 0)
                out = usage.get("output_tokens")
                self._output = out if type(out) is int and out >= 0 else 0
                self.usage.total_tokens = self._input + self._output
        elif kind == "message_delta":
            usage = doc.get("usage")
            out = usage.get("output_tokens") if isinstance(usage, dict) else None
            if type(out) is int and out >= 0:
                self._output = max(self._output, out)
                self.usage.total_tokens = self._input + self._output
        return None


class OllamaWatcher(Watcher):
    markers = (b'"eval_count"', b'"prompt_eval_count"')
    sse = False

    def event(self, doc: dict[str, Any]) -> str | None:
        total = ollama_usage(doc)
        if total is not None:
            self.usage.total_tokens = total
        return None


class WatchedStream:
    """An async iterator of chunks: ``inner``'s, unchanged and unbuffered, read by ``watcher`` on the side.

    ``claim(id)`` is awaited for an id the watcher returns, before the chunk
    that carries it is handed on.
    """

    __slots__ = ("_inner", "_watcher", "_claim", "_tail", "_markers", "_first", "_second", "_held_ids")

    def __init__(self, inner: AsyncIterator[bytes], watcher: Watcher,
                 claim: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._inner = inner
        self._watcher = watcher
        self._claim = claim
        self._tail = b""
        self._markers = markers = watcher.markers
        # the per-chunk test, unrolled (no generator per chunk): a chunk with neither marker is not split
        self._first = markers[0] if 0 < len(markers) <= 2 else None  # None: no markers, or more than two
        self._second = markers[1] if len(markers) == 2 else None
        self._held_ids: list[str] | None = None  # ids seen in a pushed chunk handed back: claimed before it passes

    def __aiter__(self) -> WatchedStream:
        return self

    def ready(self) -> bool:
        """Whether the inner stream's next chunk is already here (False when it cannot tell)."""
        ready = getattr(self._inner, "ready", None)
        return bool(ready()) if ready is not None else False

    async def __anext__(self) -> bytes:
        try:
            chunk = await self._inner.__anext__()
        except StopAsyncIteration:
            if self._tail:  # a last line without its newline
                rest, self._tail = self._tail, b""
                for rid in self._events(rest + b"\n"):
                    await self._claimed(rid)
            raise
        if chunk:
            held, self._held_ids = self._held_ids, None
            for rid in held if held is not None else self._see(chunk):
                await self._claimed(rid)
        return chunk

    def push(self, write: Callable[[bytes], int]) -> None:
        """Watch in the upstream connection's callback when the inner stream can push (``StreamRelay.push``).

        A chunk carrying an id to claim is not written there: the claim must be done before the chunk
        reaches the client, so it is handed back (``HOLD``) and comes out of ``__anext__`` after its claim.
        """
        push = getattr(self._inner, "push", None)
        if push is None:
            return
        see = self._see

        def watched(chunk: bytes) -> int:
            ids = see(chunk)
            if ids and self._claim is not None:
                self._held_ids = ids
                return HOLD
            return write(chunk)

        push(watched)

    def _see(self, chunk: bytes) -> list[str]:
        """Look at the complete lines of what has passed; the ids to claim before ``chunk`` is handed on."""
        tail = self._tail
        if not tail and chunk[-1] == 10:  # whole lines, the usual chunk: no copy, no slice
            first = self._first
            if first is None:
                return self._events(chunk) if self._markers else []
            if chunk.find(first) >= 0 or (self._second is not None and chunk.find(self._second) >= 0):
                return self._events(chunk)  # (find: on 3.11 `bytes in bytes` formats an error message first)
            return []
        data = tail + chunk if tail else chunk
        cut = data.rfind(b"\n") + 1
        self._tail = data[cut:] if len(data) - cut <= MAX_LINE else b""
        return self._events(data[:cut]) if cut else []

    async def _claimed(self, rid: str) -> None:
        if self._claim is not None:
            await self._claim(rid)

    def _events(self, lines: bytes) -> list[str]:
        """Hand the watcher every marked event in ``lines``; the ids it asks to claim."""
        if not any(m in lines for m in self._markers):
            return []
        rids: list[str] = []
        for line in lines.split(b"\n"):
            if not any(m in line for m in self._markers):
                continue
            payload = line.strip()
            if self._watcher.sse:
                if not payload.startswith(b"data:"):
                    continue
                payload = payload[5:].strip()
            if not payload.startswith(b"{"):
                continue
            try:
                doc = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(doc, dict):
                continue
            try:
                rid = self._watcher.event(doc)
            except Exception:  # noqa: BLE001 - a watcher bug must never break the stream
                continue
            if rid is not None:
                rids.append(rid)
        return rids


WATCHERS: dict[str, type[Watcher]] = {
    "responses": ResponsesWatcher,
    "messages": MessagesWatcher,
    "ollama_chat": OllamaWatcher,
    "ollama_generate": OllamaWatcher,
}
