"""Relay an upstream body to the client chunk by chunk, as it arrives.

Token streams (SSE) must reach the client as they are generated, so nothing
here waits for more than the bytes the socket already has. For openai streams
the relay also reads the ``data:`` lines it passes along, cheaply and without
ever holding up or breaking the stream, to learn the token usage the upstream
reports in its final chunk (and, failing that, how much text was generated) so
quotas can charge what was really used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import orjson

from gateway.errors import BackendError

from .client import UpstreamError
from .protocols import total_tokens

if TYPE_CHECKING:
    from gateway.pipeline import RequestContext

    from .client import Response

MAX_SSE_LINE = 1_048_576  # 1 MiB: a longer unterminated line is dropped from usage scanning, never from the relay
STREAM_ERROR_KEY = "http.stream_error"  # set in ctx.extra when the upstream broke off mid-stream
STREAM_BROKEN = "upstream connection failed mid-stream"


class StreamRelay:
    """An async iterator of the upstream's body chunks.

    When the upstream breaks off mid-answer it raises ``BackendError``: the
    response has started, so the writer's only honest move is to cut the client
    connection (a clean end would pass a truncated answer off as complete).
    """

    __slots__ = ("_resp", "_ctx", "_scan_usage", "_on_failure", "_tail", "_done", "_released")

    def __init__(
        self,
        resp: Response,
        ctx: RequestContext,
        *,
        scan_usage: bool,
        on_failure: Callable[[], None],
    ) -> None:
        self._resp = resp
        self._ctx = ctx
        self._scan_usage = scan_usage
        self._on_failure = on_failure
        self._tail = b""
        self._done = False
        self._released = False

    def __aiter__(self) -> StreamRelay:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._resp.readany()
        except UpstreamError:
            self._finish(failed=True)
            raise BackendError(STREAM_BROKEN) from None
        if not chunk:
            self._finish(failed=False)
            raise StopAsyncIteration
        if self._scan_usage:
            try:
                self._scan(chunk)
            except Exception:  # noqa: BLE001 - a scanning bug must never break the relay
                self._scan_usage = False
        return chunk

    def release(self) -> None:
        """Free the upstream connection (closed, not pooled, if the body was not read to the end)."""
        self._done = True
        if not self._released:
            self._released = True
            self._resp.release()

    def _finish(self, *, failed: bool) -> None:
        if self._scan_usage and self._tail:
            try:
                self._line(self._tail)
            except Exception:  # noqa: BLE001
                pass
        self._tail = b""
        if failed:
            self._ctx.extra[STREAM_ERROR_KEY] = STREAM_BROKEN
            self._on_failure()
        self.release()

    def _scan(self, chunk: bytes) -> None:
        data = self._tail + chunk if self._tail else chunk
        if b"\n" not in data:
            self._tail = data if len(data) <= MAX_SSE_LINE else b""
            return
        lines = data.split(b"\n")
        tail = lines.pop()
        self._tail = tail if len(tail) <= MAX_SSE_LINE else b""
        for line in lines:
            if line.startswith(b"data:"):
                self._line(line)

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if not payload.startswith(b"{"):
            return  # "[DONE]" and anything that is not a JSON object
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        total = total_tokens(doc)
        if total is not None:
            self._ctx.llm_usage_tokens = total
        choices = doc.get("choices")
        if isinstance(choices, list):
            generated = 0
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str):
                    generated += len(text)
            if generated:
                self._ctx.llm_streamed_chars += generated
