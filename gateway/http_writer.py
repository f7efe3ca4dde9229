"""Writing one connection's answers: whole ones in one write, streams chunk by chunk, never past the client.

The door (``gateway.http_door``) says what an answer is; this says how it is
framed (``Content-Length``, chunks, or, to an HTTP/1.0 client, the connection's
end) and whether the connection stays open after it. The transport's
high-water mark is 1 byte (``gateway.http_connection``), so ``paused`` is
true whenever bytes wait for the client beyond what the kernel took; a stream
then waits before its next chunk, and the connection's write deadline
(``connection_limits.WriteWatch``) runs until the client takes something.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from . import http_answer
from .connection_limits import WriteWatch
from .http_request import HttpRequest

Headers = list[tuple[str, str]]


class AnswerWriter:
    """The answers of one connection, in order (the connection answers one request at a time)."""

    __slots__ = ("_tr", "_loop", "_secure", "_watch", "_must_close", "closing", "paused", "_drain", "_head",
                 "_chunked", "_head_only")

    def __init__(self, tr: asyncio.Transport, watch: WriteWatch, *, secure: bool,
                 must_close: Callable[[], bool]) -> None:
        self._tr: asyncio.Transport | None = tr
        self._loop = asyncio.get_running_loop()
        self._secure = secure
        self._watch = watch
        self._must_close = must_close  # the connection's own reasons to close (stopping, a refused head)
        self.closing = False  # the answer being written is the connection's last
        self.paused = False
        self._drain: asyncio.Future[None] | None = None
        self._head: bytes | None = None  # a streamed answer's head, held until its first chunk
        self._chunked = True
        self._head_only = False

    def closes_after(self, request: HttpRequest) -> bool:
        """Whether this request's answer is the connection's last (and says ``Connection: close``).

        A body that has not fully arrived is never read on: the next bytes could
        be mistaken for a request, so the connection ends with this answer.
        """
        if not request.keep_alive or not request.body.complete or self._must_close():
            self.closing = True
        return self.closing

    # -- whole answers ---------------------------------------------------------------------

    def frame(self, request: HttpRequest, status: int, headers: Headers, body: bytes) -> list[bytes]:
        """A whole answer's bytes (``HeaderInjection`` if a header would split it); ``write`` sends them."""
        close = self.closes_after(request)
        head = http_answer.head(status, headers, length=len(body), close=close,
                                keep_alive_1_0=request.http_1_0 and not close)
        if request.head_only or not body or status in http_answer.NO_BODY:
            return [head]
        if len(body) < 65_536:
            return [head + body]  # one write, one segment
        return [head, body]  # no copy of a large answer into one buffer

    def write(self, framed: list[bytes]) -> None:
        tr = self._live()
        if len(framed) == 1:
            tr.write(framed[0])
        else:
            tr.writelines(framed)
        if self._secure:
            self._watch.after_tls_answer()

    # -- streamed answers ------------------------------------------------------------------

    def start_stream(self, request: HttpRequest, status: int, headers: Headers) -> None:
        """A streamed answer: its head waits for the first chunk (one write, one client wake-up less)."""
        chunked = not request.http_1_0  # an HTTP/1.0 client reads until the connection closes
        if not chunked:
            self.closing = True
        close = self.closes_after(request)
        self._head = http_answer.head(status, headers, length=None, close=close)
        self._chunked = chunked
        self._head_only = request.head_only

    def flush_head(self) -> None:
        """Send a streamed answer's head now (its first chunk may take a while: a model's first token)."""
        head = self._head
        if head is not None and self._tr is not None:
            self._head = None
            self._tr.write(head)

    async def send_chunk(self, data: bytes) -> None:
        self._live()
        if self.push_chunk(data):  # the client has not taken everything: wait for it (its write deadline runs)
            await self.drained()

    def push_chunk(self, data: bytes) -> bool:
        """``send_chunk`` without the wait, for a callback (a pushed stream): True when the client could
        take no more (or is gone), so the caller stops pushing and waits in ``send_chunk``."""
        tr = self._tr
        if tr is None or tr.is_closing():
            return True
        if self._head_only:
            self.flush_head()
            return False
        framed = http_answer.chunk(data) if self._chunked else data
        head = self._head
        if head is not None:
            self._head = None
            framed = head + framed
        tr.write(framed)
        return self.paused

    def end_stream(self) -> None:
        """A streamed answer is complete (written after the request's bookkeeping): its head if it is still
        held, and the last chunk; nothing when the client is gone or its connection is being closed."""
        tr = self._tr
        if tr is None or tr.is_closing():
            return
        self.flush_head()
        if self._chunked and not self._head_only:
            tr.write(http_answer.LAST_CHUNK)

    def cut_stream(self) -> None:
        """The answer has started and cannot be finished: the only honest signal left is to cut it."""
        self._head = None
        self.closing = True
        if self._tr is not None:
            self._tr.close()

    # -- flow control ----------------------------------------------------------------------

    def pause(self) -> None:
        self.paused = True
        self._watch.start()

    def resume(self) -> None:
        self.paused = False
        self._watch.stop()  # everything was handed to the kernel; the timer, if any, lapses
        drain = self._drain
        if drain is not None:
            self._drain = None
            if not drain.done():
                drain.set_result(None)

    async def drained(self) -> None:
        """Until the client has taken what was written."""
        self._live()
        drain = self._drain
        if drain is None:
            drain = self._drain = self._loop.create_future()
        await drain

    def lost(self) -> None:
        self._tr = None
        self._watch.close()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("client connection closed"))

    def _live(self) -> asyncio.Transport:
        tr = self._tr
        if tr is None or tr.is_closing():
            raise ConnectionResetError("client connection closed")
        return tr
