"""One upstream answer's body, as the connection hands it over.

Two ways to consume it, with different flow control on purpose:

- ``readany()`` (streams) is paced by the client: above ``PAUSE_ABOVE``
  unread bytes the socket stops being read, so a slow client slows the
  upstream instead of filling our memory.
- ``read()`` (whole bodies) wants every byte now: it never pauses (pausing
  there waited for a reader that was itself waiting for the end, so a 1 MB
  answer never arrived), wakes only at the end instead of per chunk, and is
  bounded instead by ``max_bytes`` and a total deadline.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Callable, Protocol

from .errors import ResponseTooLarge, UpstreamError

PAUSE_ABOVE = 262_144  # buffered but unread stream bytes before the socket stops being read (a slow client)
TOO_LARGE = "upstream answer too large"


class Feed(Protocol):
    """What a response needs of the connection it arrives on (``connection.Connection``).

    Declared here, not imported: the connection creates responses, so a
    response knowing the connection's module would tie the two in a loop.
    """

    def set_deadline(self, seconds: float) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def finished(self, *, reusable: bool) -> None: ...


class Response:
    """An upstream's answer: status and headers at once, the body as it arrives.

    Read it whole with ``read()`` or chunk by chunk with ``readany()``, then
    ``release()`` it: a fully read body on a keep-alive connection returns the
    connection to the pool, anything else closes it.
    """

    __slots__ = ("status", "headers", "_conn", "_chunks", "_buffered", "_received", "_limit", "_whole", "_eof",
                 "_error", "_waiter", "_released", "_loop", "_sink")

    def __init__(self, conn: Feed, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0  # unread
        self._received = 0  # all body bytes so far
        self._limit = 0  # whole reads: the cap on _received (0: none)
        self._whole = False  # read() is waiting for the whole body
        self._eof = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once: get_running_loop() is a getpid() call
        self._sink: Callable[[bytes], bool] | None = None  # push_to()

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def _done(self) -> bool:
        """The body has ended, whole or not."""
        return self._eof or self._error is not None

    @property
    def error(self) -> UpstreamError | None:
        """Why the body ended early, once it has (None while it is fine)."""
        return self._error

    async def read(self, *, max_bytes: int = 0, total_s: float | None = None) -> bytes:
        """The whole body; ``UpstreamError`` if it does not arrive complete.

        ``max_bytes`` (0: no cap): ``ResponseTooLarge`` when the declared
        Content-Length is larger, before waiting for a byte, or as soon as a
        chunked or close-delimited body grows past it. ``total_s``:
        ``ReadTimeout`` unless the body is complete within that many seconds,
        however steadily it trickles in.
        """
        if max_bytes and self._error is None:
            self._limit = max_bytes
            if self._received > max_bytes or (not self._eof and self._declared_over(max_bytes)):
                self._error = ResponseTooLarge(TOO_LARGE)  # release() will close the connection, not pool it
        if not self._eof and self._error is None:
            self._whole = True
            if total_s is not None:
                self._conn.set_deadline(total_s)
            self._conn.resume()
            while not self._done():  # (a call: an await changes what a narrowed `self._error` would claim)
                await self._wait()
        if self._error is not None:
            raise self._error
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def readany(self) -> bytes:
        """What the upstream sent since the last call, as soon as there is something; ``b""`` at the end.

        Several chunks already buffered come back as one (one write to the client instead of several).
        """
        chunk = self.take()
        while chunk is None:
            await self.arrival()
            chunk = self.take()
        return chunk

    def take(self) -> bytes | None:
        """``readany()`` without waiting: what is buffered (joined), ``b""`` at the end, None when nothing is yet.

        Raises the ``UpstreamError`` that ended the body, once what arrived before it has been taken.
        """
        chunks = self._chunks
        if not chunks:
            if self._error is not None:
                raise self._error
            return b"" if self._eof else None
        if len(chunks) == 1:
            chunk = chunks.popleft()
        else:
            chunk = b"".join(chunks)
            chunks.clear()
        self._buffered = 0
        self._conn.resume()  # (a no-op unless _feed paused the socket)
        return chunk

    def ready(self) -> bool:
        """Whether a body chunk is buffered, so that ``take()`` returns it at once."""
        return bool(self._chunks)

    def arrival(self) -> asyncio.Future[None]:
        """A future done when a chunk, the end or an error arrives (await it when ``take()`` gave None).

        A plain future, not a coroutine: a stream's reader awaits it with no frame in between.
        """
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        return waiter

    def push_to(self, sink: Callable[[bytes], bool] | None) -> None:
        """Hand each body chunk to ``sink`` as it arrives, in the connection's own callback, instead of
        queueing it and waking a reader per chunk (for a stream, that wake-up is most of its CPU per event).

        ``sink`` returns True when whoever it writes to could take no more: it is detached then, and later
        chunks queue for ``take()`` as without it (their reader waits for its consumer, and past
        ``PAUSE_ABOVE`` the socket pauses). Attached only while nothing is queued, so chunks keep their
        order. The end and errors still wake the reader, which ``take()``s them as before.
        """
        self._sink = sink if sink is None or not self._chunks else None

    def expire_after(self, seconds: float) -> None:
        """End a streamed body ``seconds`` from now (``StreamExpired`` after what was received), connection closed."""
        if not self._eof and self._error is None:
            self._conn.set_deadline(seconds)

    def release(self) -> None:
        """Give the connection back (pooled only if the answer was read to its end). Idempotent."""
        if not self._released:
            self._released = True
            self._conn.finished(reusable=self._eof and self._error is None and not self._chunks)

    def _declared_over(self, max_bytes: int) -> bool:
        declared = self.header("Content-Length")
        return declared is not None and declared.isdigit() and int(declared) > max_bytes

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def wake(self) -> None:
        """Wake a reader waiting in ``arrival()`` though nothing arrived (a pushed chunk handed back to it)."""
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, chunk: bytes) -> None:
        """A body chunk from the parser. Raises ``ResponseTooLarge`` (inside the parser callback) past the cap."""
        size = len(chunk)
        sink = self._sink
        if sink is not None:  # pushed: written on by the sink, never queued
            self._received += size
            if sink(chunk):
                self._sink = None
            return
        self._chunks.append(chunk)
        self._buffered += size
        self._received += size
        if self._whole:  # the reader waits for the end: no pause, no wake-up per chunk
            if self._received > self._limit > 0:
                raise ResponseTooLarge(TOO_LARGE)
            return
        if self._buffered > PAUSE_ABOVE:
            self._conn.pause()
        waiter = self._waiter  # _wake(), inline: once per chunk
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self, error: UpstreamError | None = None) -> None:
        if error is None:
            self._eof = True
        elif not self._eof and self._error is None:  # the first error is the cause; the close that follows is not
            self._error = error
        self._wake()
