"""One keep-alive connection to an upstream: an asyncio protocol parsed by httptools (llhttp).

It serves one request at a time and owns one timer, which enforces both the
silence limit (no byte for ``timeout`` seconds, unless the socket is paused
because our client is slow) and, once set, a total deadline (a whole body's,
or a stream's ``max_stream_s``). The timer outlives exchanges: it re-arms from
the last byte's time when it fires, so a busy connection creates one every
``timeout`` seconds instead of one per request.

A connection goes back to the pool only when its framing is beyond doubt:
never after a HEAD, 204 or 304 answer (the answers an upstream most often
follows with a body it should not send, which would otherwise become the next
request's answer) and never once bytes arrived that nobody asked for.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import httptools

from .errors import ConnectFailed, Disconnected, InvalidResponse, ReadTimeout, StreamExpired, UpstreamError
from .response import Response

MAX_HEADER_BYTES = 65_536  # an upstream's response head larger than this is not a model server's answer
MAX_HEADERS = 256
NO_BODY_STATUSES = frozenset({204, 304})
_NEVER = float("inf")


class Owner(Protocol):
    """What a connection needs of the pool that opened it (``client.Pool``).

    Declared here, not imported: the pool creates connections, so a connection
    knowing the pool's module would tie the two in a loop.
    """

    loop: asyncio.AbstractEventLoop

    def put_back(self, conn: Connection) -> None: ...

    def lost(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream, serving one request at a time."""

    def __init__(self, pool: Owner) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None  # set while waiting for response headers
        self._response: Response | None = None  # set while the body is coming
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._informational = False
        self._head_only = False
        self._reusable = True  # False after HEAD / 204 / 304: never pooled again
        self._complete = False
        self._keep_alive = False
        self._last_data = 0.0
        self._timeout = 0.0
        self._deadline = _NEVER  # loop time at which the exchange ends whatever the upstream does
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self.idle_since = 0.0

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        if self._waiter is None and (self._response is None or self._complete):
            self._close()  # bytes nobody asked for: this connection cannot be trusted with the next request
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, _Untrusted) as exc:  # no upgrades via a proxy
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
            if not isinstance(cause, UpstreamError):  # our own verdict from a callback (a cap) stands as it is
                cause = InvalidResponse("upstream sent an invalid response")
            self._fail(cause)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel_timer()
        response = self._response
        if response is not None and not self._complete and _close_delimited(response):
            self._complete = True  # no length and not chunked: the body ends when the connection does
            response._end()
        else:
            self._fail(Disconnected("upstream closed the connection"))
        self._pool.lost(self)

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete or (self._waiter is None and self._response is None):
            raise _Untrusted  # a second answer to one request: the connection's framing cannot be trusted

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES or len(self._headers) >= MAX_HEADERS:
            raise _Untrusted
        self._headers.append((name.decode("latin-1"), value.decode("utf-8", "replace")))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            self._informational = True  # 100 Continue and friends: the real answer follows
            self._headers = []
            return
        response = Response(self, status, self._headers)
        self._headers = []
        if status in NO_BODY_STATUSES:
            self._reusable = False
        self._response = response
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)
        if self._head_only:  # an answer to HEAD has headers only, whatever its Content-Length says
            self._complete = True
            self._cancel_timer()
            response._end()

    def on_body(self, body: bytes) -> None:
        if self._response is not None and not self._complete:
            self._response._feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            self._header_bytes = 0
            return
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()  # read now: the parser resets after this callback
        if self._response is not None:
            self._response._end()

    # -- one exchange ----------------------------------------------------------

    def send(self, head: bytes, body: bytes | None, head_only: bool, timeout: float) -> asyncio.Future[Response]:
        """Write the request; the future resolves with the response once its headers are in."""
        if self.transport is None:  # closed while the request waited to run: nothing was sent
            raise ConnectFailed("upstream closed the connection")
        self._waiter = waiter = self._loop.create_future()
        self._response = None
        self._header_bytes = 0
        self._complete = False
        self._keep_alive = False
        self._head_only = head_only
        self._reusable = not head_only
        self._timeout = timeout
        self._deadline = _NEVER
        self._last_data = now = self._loop.time()
        timer = self._timer
        if timer is None or timer.when() > now + timeout:
            # (one still pending from an earlier exchange fires no later than this one's limit and re-arms
            # itself from _last_data: kept, it saves ~9k of ~780k instructions per proxied request)
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(now + timeout, self._check_silence)
        self.transport.write(head + body if body else head)
        return waiter

    def finished(self, *, reusable: bool) -> None:
        """The caller is done with the response: pool the connection or close it.

        A pooled connection keeps its timer: it lapses on its own (``_check_silence`` finds the exchange
        complete) or serves the next exchange."""
        self._response = None
        if reusable and self._complete and self._keep_alive and self._reusable and self.usable():
            self.resume()
            self._pool.put_back(self)
        else:
            self._close()
            self._pool.lost(self)

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def set_deadline(self, seconds: float) -> None:
        """End the exchange ``seconds`` from now whatever the upstream does (a total, not a silence limit).

        Reuses the one silence timer the exchange already has (moved earlier
        when needed): no extra timer or task per request.
        """
        at = self._loop.time() + seconds
        self._deadline = at
        timer = self._timer
        if timer is not None and timer.when() > at:
            timer.cancel()
            self._timer = self._loop.call_at(at, self._check_silence)

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    # -- internals -------------------------------------------------------------

    def _check_silence(self) -> None:
        self._timer = None
        if self._complete:
            return
        now = self._loop.time()
        if now >= self._deadline:  # paused or not: a deadline is a total
            streaming = self._response is not None and not self._response._whole
            self._fail(StreamExpired("stream reached its time limit") if streaming
                       else ReadTimeout("upstream timed out"))
            return
        due = self._last_data + self._timeout
        if self._paused or now < due:  # paused: the client is slow, not the upstream
            self._timer = self._loop.call_at(min(max(due, now + 0.05), self._deadline), self._check_silence)
            return
        self._fail(ReadTimeout("upstream timed out"))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, error: UpstreamError) -> None:
        """End the exchange with ``error`` and drop the connection (its state is unknown now)."""
        self._cancel_timer()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        if self._response is not None and not self._complete:
            self._response._end(error)
        self._complete = False
        self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Untrusted(Exception):
    """Raised inside a parser callback: the answer breaks a limit or the connection's framing."""


def _close_delimited(response: Response) -> bool:
    """No Content-Length and not chunked: the body is whatever comes until the connection closes."""
    return all(k.lower() not in ("content-length", "transfer-encoding") for k, _ in response.headers)
