"""Relay an upstream body to the client chunk by chunk, as it arrives.

Token streams (SSE) must reach the client as they are generated, so nothing
here waits for more than the bytes the socket already has. For openai streams
the relay also reads the token usage the upstream reports (the gateway always
asks for it, see ``protocols``) so quotas charge what was really used: only
lines that carry ``"usage"`` are parsed, so the cost per chunk is a byte search.

A client that did not ask for usage itself (``stream_options.include_usage``
absent or false) must get the stream it asked for: its relay passes on whole
lines only (a partial line waits for its newline, which an SSE client waits for
anyway), drops the usage-only chunk (usage and no ``choices``) with its blank
line, and removes the ``usage`` key from any other chunk (OpenAI's
``"usage": null``, vLLM's continuous usage). Every other byte passes unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import orjson

from gateway.errors import BackendError
from gateway.pipeline import HOLD

from .client import StreamExpired, UpstreamError
from .protocols import total_tokens

if TYPE_CHECKING:
    from gateway.pipeline import Usage

    from .client import Response

MAX_SSE_LINE = 1_048_576  # 1 MiB: a longer unterminated line is relayed as it comes, never held back nor scanned
STREAM_BROKEN = "upstream connection failed mid-stream"  # ``StreamRelay.error`` when the upstream broke off


class StreamRelay:
    """An async iterator of the upstream's body chunks.

    When the upstream breaks off mid-answer it raises ``BackendError`` (and
    ``error`` says why): the response has started, so the writer's only honest
    move is to cut the client connection (a clean end would pass a truncated
    answer off as complete). With a ``usage`` it reads the token usage the
    stream reports into it, as the stream passes.
    """

    __slots__ = ("_resp", "_meter", "_scan_usage", "_hide_usage", "_drop_blank", "_on_failure", "_tail", "_done",
                 "_released", "error", "_sink", "_held")

    def __init__(
        self,
        resp: Response,
        *,
        usage: Usage | None,
        hide_usage: bool,
        on_failure: Callable[[], None],
    ) -> None:
        self._resp = resp
        self._meter = usage
        self._scan_usage = usage is not None
        # The gateway asked the upstream for usage; a client that did not ask must not get it.
        self._hide_usage = usage is not None and hide_usage
        self.error: str | None = None
        self._drop_blank = False  # a hidden chunk's terminating blank line is still to come
        self._on_failure = on_failure
        self._tail = b""
        self._done = False
        self._released = False
        self._sink: Callable[[bytes], bool] | None = None  # push()
        self._held: bytes | None = None  # a pushed chunk its writer handed back (HOLD): next out of __anext__

    def __aiter__(self) -> StreamRelay:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        resp = self._resp
        try:  # readany(), inline (one coroutine less per chunk)
            chunk = self._unheld()
            if chunk is not None:
                return chunk  # scanned already, before the chunks queued after it
            chunk = resp.take()
            while chunk is None:
                if self._sink is not None:  # caught up: the next chunks go straight through again
                    resp.push_to(self._sink)
                await resp.arrival()
                chunk = self._unheld()
                if chunk is not None:
                    return chunk
                chunk = resp.take()
        except StreamExpired:  # max_stream_s: our limit, so a clean end for the client (the connection is dropped)
            self._finish(failed=False)  # a held-back partial line is dropped: cut by our deadline, it is no event
            raise StopAsyncIteration from None
        except UpstreamError:
            self._finish(failed=True)
            raise BackendError(STREAM_BROKEN) from None
        if not chunk:
            rest = self._finish(failed=False)
            if rest:
                return rest  # a last line without newline, held back; the next call ends the iteration
            raise StopAsyncIteration
        return self._pass(chunk)

    def push(self, write: Callable[[bytes], int]) -> None:
        """Relay in the upstream connection's callback: each chunk, scanned as ``__anext__`` scans it, goes
        to ``write`` as it arrives, with no task woken (``Response.push_to``).

        ``write`` returns True when the client could take no more, ``HOLD`` when it did not write the chunk
        and must wait for something first (a response id's claim); chunks then queue for ``__anext__``,
        where the writer waits for the client, and pushing starts again whenever ``__anext__`` has nothing
        left to return. The end, an error and ``max_stream_s`` still end the iteration through
        ``__anext__``, which the writer keeps awaiting.
        """
        passed, resp = self._pass, self._resp

        def sink(chunk: bytes) -> bool:
            out = passed(chunk)
            if not out:
                return False
            wrote = write(out)
            if wrote == HOLD:  # the writer must wait for something first: __anext__ hands the chunk back
                self._held = out
                resp.wake()
                return True
            return bool(wrote)

        self._sink = sink
        if not self._done:
            self._resp.push_to(sink)  # (not while chunks are queued: they go first, through __anext__)

    def _unheld(self) -> bytes | None:
        held = self._held
        if held is not None:
            self._held = None
        return held

    def _pass(self, chunk: bytes) -> bytes:
        """What of a (non-empty) upstream chunk is relayed, its usage read on the way."""
        if self._scan_usage:
            # (find, not `in`: on 3.11 `bytes in bytes` first fails as an int and formats an error message)
            if not self._tail and chunk[-1] == 10 and not self._drop_blank and chunk.find(b'"usage"') < 0:
                return chunk  # whole lines without usage (nearly every chunk): what _scan would return
            hiding = self._hide_usage
            data = self._tail + chunk if self._tail else chunk
            try:
                out = self._scan(data)
            except Exception:  # noqa: BLE001 - a scanning bug must never break the relay
                self._scan_usage = self._hide_usage = False
                self._tail = b""
                return data if hiding else chunk
            return out if hiding else chunk  # not hiding: the bytes pass as they came
        return chunk

    def ready(self) -> bool:
        """Whether the next chunk is already here (the writer then sends the answer's head with it)."""
        return not self._done and self._resp.ready()

    def release(self) -> None:
        """Free the upstream connection (closed, not pooled, if the body was not read to the end)."""
        self._done = True
        self._resp.push_to(None)
        if not self._released:
            self._released = True
            self._resp.release()

    def _finish(self, *, failed: bool) -> bytes:
        """Stop relaying; return what is still to be sent (a held-back last line without newline)."""
        rest, self._tail = self._tail, b""
        if rest and self._scan_usage:
            try:
                rest = self._scan(rest + b"\n")[:-1]  # the last line, read as if its newline had come
            except Exception:  # noqa: BLE001
                pass
            if not self._hide_usage:
                rest = b""  # already relayed as it came
        if failed:
            self.error = STREAM_BROKEN
            self._on_failure()
        self.release()
        return rest

    def _scan(self, data: bytes) -> bytes:
        """Read the usage in the complete lines of ``data``, keep the rest for the next chunk.

        Returns the bytes to relay when hiding usage: the complete lines, less
        what the client did not ask for (unused otherwise)."""
        cut = data.rfind(b"\n") + 1
        lines, tail = (data, b"") if cut == len(data) else (data[:cut], data[cut:])
        overlong = b""
        if len(tail) > MAX_SSE_LINE:  # too long to hold back: relayed as it comes, never read
            overlong, tail = tail, b""
        self._tail = tail
        if self._drop_blank and lines:
            self._drop_blank = False
            if lines.startswith(b"\n"):
                lines = lines[1:]
            elif lines.startswith(b"\r\n"):
                lines = lines[2:]
        if b'"usage"' in lines:  # a key in a JSON object: text inside strings has its quotes escaped
            lines = self._usage_lines(lines)
        return lines + overlong if overlong else lines

    def _usage_lines(self, lines: bytes) -> bytes:
        out: list[bytes] = []
        for line in lines.split(b"\n")[:-1]:
            if self._drop_blank:
                self._drop_blank = False
                if line == b"" or line == b"\r":
                    continue
            if b'"usage"' in line and line.startswith(b"data:"):
                kept = self._usage(line)
                if kept is None:
                    self._drop_blank = True
                    continue
                line = kept
            out.append(line)
        return b"\n".join(out) + b"\n" if out else b""

    def _usage(self, line: bytes) -> bytes | None:
        """Record the usage a ``data:`` line reports; the line to relay (None: drop it)."""
        if b'"usage":null' in line and line.count(b'"usage"') == 1:
            # OpenAI's "usage": null on every chunk once usage is asked for: nothing to read, and
            # (quotes inside JSON strings being escaped) a key that can be cut out without parsing.
            if not self._hide_usage:
                return line
            for key in (b',"usage":null', b'"usage":null,'):
                if key in line:
                    return line.replace(key, b"", 1)
        payload = line[5:].strip()
        if not payload.startswith(b"{"):
            return line
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return line
        if not isinstance(doc, dict) or "usage" not in doc:
            return line
        total = total_tokens(doc)
        if total is not None and self._meter is not None:
            self._meter.total_tokens = total
        if not self._hide_usage:
            return line
        usage = doc.pop("usage")
        if usage is not None and not doc.get("choices"):
            return None  # the usage-only chunk, asked for on the client's behalf
        return b"data: " + orjson.dumps(doc) + (b"\r" if line.endswith(b"\r") else b"")
