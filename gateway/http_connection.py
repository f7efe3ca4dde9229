"""One client connection of the public port: HTTP/1.1 parsed by httptools (llhttp), answered in order.

The parser's callbacks build one ``HttpRequest`` per head and feed its body;
one task per connection, started by its first request, answers the requests in
the order they came (pipelining) and then waits for the next one (waking a
future costs less than making a task, on every keep-alive request), so an idle
connection holds a protocol object, that waiting task (about 1 KB) and a timer.
The door (``gateway.http_door``) decides what each answer is and writes it
through the methods below, which decide how it is framed and whether the
connection stays open.

The limits on the request side live here, where the bytes are parsed:

* **Head deadline** (``header_timeout_s``): from the first byte of a request
  head (also a keep-alive connection's next one) to the end of its headers.
  Missed: nothing more is read; a 408 after whatever the connection already
  has under way (pipelined requests are still answered), then close.
* **Head size** (``max_header_bytes``): bytes are counted as they arrive, so a
  head over the cap is refused (431, then close) without buffering it whole;
  so is a head of more than ``MAX_HEADERS`` lines.
* **Idle deadline** (``keepalive_timeout_s``): a connection with no request
  under way and no head arriving is closed when it runs out.
* **Backlog**: past ``PIPELINE_HIGH`` requests waiting for their answers, or a
  body nobody reads yet past ``http_body.UNREAD_HIGH``, the socket is not read.

A request whose body has not fully arrived when its answer is written (a 401
before the body was read, a 413) is answered with ``Connection: close``; the
rest of its body is read and dropped for up to ``_LINGER_S`` (never parsed, so
it can never be taken for the next request), then the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Protocol

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from . import http_answer
from .connection_limits import ConnectionCounter, WriteWatch
from .errors import GatewayError, InvalidRequest, RequestHeaderFieldsTooLarge, RequestTimeout
from .http_body import IncomingBody
from .http_request import HttpRequest, client_certificate
from .http_writer import AnswerWriter
from .socket_probes import abort_with_reset

if TYPE_CHECKING:
    from .request import CertificateSubject

log = logging.getLogger("maas.connections")

MAX_HEADERS = 128  # header lines in one head; more is a 431, as a header block over the byte cap is
PIPELINE_HIGH = 16  # requests parsed ahead of their answers before the socket is paused
_LINGER_S = 2.0  # reading and dropping the rest of a body whose request was answered without it
_CLOSE_GRACE_S = 2.0  # after a refusal: then reset, even if a TLS peer never answers our close_notify
_PAUSED_BY_BODY, _PAUSED_BY_BACKLOG = 1, 2


class _Ignored(Exception):
    """Stops the parser: the bytes after a lingering body are not a request."""


class Door(Protocol):
    """What answers a request (``gateway.http_door.HttpDoor``)."""

    async def answer(self, request: HttpRequest, writer: AnswerWriter) -> None: ...

    def refusal(self, error: GatewayError) -> tuple[int, list[tuple[str, str]], bytes]: ...


class Listener(Protocol):
    """What a connection needs of the listener that accepted it (``gateway.server``)."""

    @property
    def counter(self) -> ConnectionCounter: ...

    @property
    def door(self) -> Door: ...

    @property
    def keepalive_timeout_s(self) -> float: ...

    @property
    def draining(self) -> bool: ...

    def opened(self, connection: ClientConnection) -> None: ...

    def closed(self, connection: ClientConnection) -> None: ...


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests, answers them in order, enforces the request-side limits."""

    __slots__ = ("_listener", "_counter", "_loop", "_tr", "_parser", "peer", "_secure", "_subject", "_url",
                 "_headers", "_head_open", "_head_size", "_head_bytes", "_read_accounted", "_incoming", "_queue",
                 "_task", "_next", "_refused", "_paused_reading", "_writer", "_due", "_due_is_head", "_timer",
                 "_timer_at", "_lingering")

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._counter = listener.counter
        self._loop = asyncio.get_running_loop()
        self._tr: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self._secure = False
        self._subject: CertificateSubject | None = None
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_open = False  # a head has begun and its headers have not ended
        self._head_size = 0  # of the head being parsed, from what the parser handed over
        self._head_bytes = 0  # of the head being parsed, counted from the reads (bounds what llhttp buffers)
        self._read_accounted = 0  # bytes of the current read that belong to bodies and finished heads
        self._incoming: HttpRequest | None = None  # the request whose body is arriving
        self._queue: deque[HttpRequest | GatewayError] = deque()  # waiting for (or getting) an answer, in order
        self._task: asyncio.Task[None] | None = None  # answers the queue; lives while requests keep coming
        self._next: asyncio.Future[None] | None = None  # set while the task waits for the next request
        self._refused = False  # a head was refused: nothing more of this connection is parsed
        self._lingering = False  # reading only to drop the rest of an answered request's body
        self._paused_reading = 0
        self._writer: AnswerWriter | None = None
        self._due = 0.0  # the idle or head deadline; 0: none
        self._due_is_head = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # -- the connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        peer = tr.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else ""
        if not self._counter.admit(ip):
            log.debug("connection from %s refused: connection cap reached", ip)
            tr.abort()  # before any read: nothing of this peer is parsed or kept
            return
        self._tr, self.peer = tr, ip
        ssl_object = tr.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._secure, self._subject = True, client_certificate(ssl_object)
        # a byte the client leaves unread pauses writing, and so starts the write deadline (not 0: asyncio's
        # TLS transport pauses on `size >= high`)
        tr.set_write_buffer_limits(1)
        watch = WriteWatch(tr, self._counter, ip, lambda: writer.paused)
        self._writer = writer = AnswerWriter(tr, watch, secure=self._secure, must_close=self._must_close)
        self._listener.opened(self)
        self._clock(self._listener.keepalive_timeout_s, head=False)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._tr is None:
            return  # refused in connection_made: never counted, never started
        self._tr = None
        self._counter.release(self.peer)
        self._listener.closed(self)
        self._due = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is not None:
            self._writer.lost()
        if self._incoming is not None:
            self._incoming.body.lost()
        if self._task is not None:
            self._task.cancel()  # the client is gone: its request stops where it is (its cleanup still runs)

    def eof_received(self) -> bool:
        """The client closed its side: taken as gone, as nginx does (a FIN cannot tell a half-close from a
        hang-up), so its request stops where it is (status 499) and frees what it holds upstream."""
        return False

    def close_when_idle(self) -> None:
        """Graceful stop: close now if no request is under way, else once its answer is out."""
        if self._writer is not None:
            self._writer.closing = True
        if self.task is None and not self._queue and self._tr is not None:
            self._tr.close()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The task answering this connection's requests; None while none is under way."""
        return self._task if self._next is None else None

    def abort(self) -> None:
        if self._tr is not None:
            self._tr.abort()

    # -- reading ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused and not self._lingering:
            return
        self._read_accounted = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade (or CONNECT) head ended here: what follows is not HTTP. The request is answered
            # like any other (never switched: the gateway speaks HTTP only), then the connection closes.
            if self._incoming is not None:
                self._incoming.body.finish()
                self._incoming = None
            self._stop_reading()
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Ignored):
                return
            self._refuse(cause if isinstance(cause, GatewayError) else InvalidRequest("malformed HTTP request"))
            return
        except httptools.HttpParserError:
            self._refuse(InvalidRequest("malformed HTTP request"))
            return
        if self._head_open:  # a head is still arriving: whatever of this read was not a body or an earlier head
            self._head_bytes += len(data) - self._read_accounted
            if self._head_bytes > self._counter.limits.max_header_bytes:
                self._too_large()

    def on_message_begin(self) -> None:
        if self._refused:
            raise _Ignored  # lingering ended in this read: what follows is never parsed
        self._head_open = True
        self._url = b""
        self._headers = []
        self._head_size = self._head_bytes = 0
        self._clock(self._counter.limits.header_timeout_s, head=True)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if not self._head_open:  # a chunked body's trailer: counted, never kept
            if self._head_size > self._counter.limits.max_header_bytes:
                raise self._too_large()
            return
        headers = self._headers
        headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))
        if len(headers) > MAX_HEADERS:
            raise self._too_large()

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._due = 0.0
        parser = self._parser
        size = self._head_size + len(parser.get_method()) + 13  # a lower bound: "M T HTTP/1.1\r\n...\r\n"
        self._read_accounted += max(0, size - self._head_bytes)  # (the part of it that came in earlier reads)
        if size > self._counter.limits.max_header_bytes:
            raise self._too_large()
        self._head_size = 0  # from here on: trailers
        version = parser.get_http_version()
        headers = CIMultiDictProxy(CIMultiDict(self._headers))
        expect = headers.getall("Expect", None)
        expect_continue = expect is not None and expect[-1].lower() == "100-continue" and version != "1.0"
        request = HttpRequest(parser.get_method().decode("ascii"), self._url.decode("utf-8", "surrogateescape"),
                              headers, IncomingBody(self, expect_continue=expect_continue),
                              peer=self.peer, secure=self._secure, client_subject=self._subject,
                              keep_alive=parser.should_keep_alive(), http_1_0=version == "1.0")
        self._incoming = request
        self._queue.append(request)
        if len(self._queue) >= PIPELINE_HIGH:
            self.pause_reading(_PAUSED_BY_BACKLOG)
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._read_accounted += len(body)
        if self._incoming is not None:
            self._incoming.body.feed(body)

    def on_message_complete(self) -> None:
        if self._incoming is not None:
            self._incoming.body.finish()
            self._incoming = None
        if self._lingering:  # the body of an answered request ended: nothing more is read
            self._lingering = False
            if self._tr is not None:
                self._tr.close()

    def _too_large(self) -> GatewayError:
        self._counter.heads_too_large += 1
        error = RequestHeaderFieldsTooLarge(f"request line and headers over {self._counter.limits.max_header_bytes}"
                                            " bytes")
        self._refuse(error)
        return error

    def _refuse(self, error: GatewayError) -> None:
        """Read no more; answer ``error`` after what is already under way, then close.

        Broken mid-body, the request that body belongs to is the one refused (its answer closes the connection).
        """
        if self._refused:
            return
        self._stop_reading()
        incoming = self._incoming
        if incoming is not None:
            self._incoming = None
            incoming.body.lost(error)
            return
        self._queue.append(error)
        self._wake()

    def _stop_reading(self) -> None:
        self._refused = True
        self._head_open = False
        self._due = 0.0
        if self._tr is not None:
            self._tr.pause_reading()

    def pause_reading(self, reason: int) -> None:
        if not self._paused_reading and self._tr is not None and not self._refused:
            self._tr.pause_reading()
        self._paused_reading |= reason

    def resume_reading(self, reason: int) -> None:
        was = self._paused_reading
        self._paused_reading = was & ~reason
        if was and not self._paused_reading and self._tr is not None and not self._refused:
            self._tr.resume_reading()

    # the body's flow (``http_body.BodyFlow``)

    def pause_body(self) -> None:
        self.pause_reading(_PAUSED_BY_BODY)

    def resume_body(self) -> None:
        self.resume_reading(_PAUSED_BY_BODY)

    def send_continue(self) -> None:
        if self._tr is not None and not self._tr.is_closing():
            self._tr.write(http_answer.CONTINUE)

    # -- the idle and head deadlines: one timer per connection --------------------------

    def _clock(self, seconds: float, *, head: bool) -> None:
        due = self._loop.time() + seconds
        self._due, self._due_is_head = due, head
        if self._timer is None or self._timer_at > due:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._timer_at = self._loop.call_at(due, self._clock_fired), due

    def _clock_fired(self) -> None:
        self._timer = None
        due = self._due
        if not due or self._tr is None:
            return
        now = self._loop.time()
        if now >= due and self._due_is_head and (self._queue or self._paused_reading):
            # the unparsed bytes wait on our own backlog of pipelined requests, not on the client
            self._due = due = now + self._counter.limits.header_timeout_s
        if now < due:
            self._timer, self._timer_at = self._loop.call_at(due, self._clock_fired), due
            return
        self._due = 0.0
        if not self._due_is_head:
            self._tr.close()  # idle past the keep-alive timeout
            return
        self._counter.head_timeouts += 1
        timeout = self._counter.limits.header_timeout_s
        log.debug("connection from %s: request head not complete within %ss", self.peer, timeout)
        self._refuse(RequestTimeout(f"request head not received within {timeout:g} s"))

    # -- answering, in order -----------------------------------------------------------------

    def _wake(self) -> None:
        """A request (or refusal) was queued: start the task that answers, or wake it if it waits."""
        if self._task is None:
            self._task = self._loop.create_task(self._serve())
        elif self._next is not None and not self._next.done():
            self._next.set_result(None)

    async def _serve(self) -> None:
        """Answer the queue in order, then wait for the next request: one task for the connection's life, not
        one per request (a task costs more to make than a future to wake, on every keep-alive request)."""
        queue, door, writer = self._queue, self._listener.door, self.writer
        try:
            while self._tr is not None:
                if not queue:
                    if not self._head_open and not self._refused:
                        self._clock(self._listener.keepalive_timeout_s, head=False)
                    self._next = self._loop.create_future()
                    try:
                        await self._next
                    finally:
                        self._next = None
                    continue
                request = queue[0]
                if isinstance(request, GatewayError):
                    self._answer_refusal(request)
                    return
                try:
                    await door.answer(request, writer)
                except ConnectionError:  # the client went away while its answer was written
                    self._close()
                    return
                except Exception:  # never a connection left waiting on an answer that will not come
                    log.exception("answering a request failed; connection from %s closed", self.peer)
                    self._close()
                    return
                queue.popleft()
                if self._paused_reading & _PAUSED_BY_BACKLOG and len(queue) < PIPELINE_HIGH // 2:
                    self.resume_reading(_PAUSED_BY_BACKLOG)
                if writer.closing:
                    self._close()
                    return
                if writer.paused:  # the client has not taken this answer: the next one waits for it
                    await writer.drained()
        finally:
            self._task = None

    def _answer_refusal(self, error: GatewayError) -> None:
        status, headers, body = self._listener.door.refusal(error)
        writer = self.writer
        writer.closing = True
        with contextlib.suppress(ConnectionError):  # (already closing: nothing to answer)
            writer.write([http_answer.head(status, headers, length=len(body), close=True) + body])
        self._close()
        self._loop.call_later(_CLOSE_GRACE_S, self.abort_with_reset)  # a no-op once the connection is gone

    def abort_with_reset(self) -> None:
        if self._tr is not None:
            abort_with_reset(self._tr)

    def _close(self) -> None:
        tr = self._tr
        if tr is None:
            return
        incoming = self._incoming
        if incoming is None or self._refused:
            tr.close()
            return
        # Answered while its body still arrives (a 413, a 401 before the body was read). Closing now, with
        # the client's bytes unread, makes the kernel reset the connection, and a reset can destroy our
        # answer before the client reads it. So linger, as nginx does: read and drop the rest of the body
        # (up to ``_LINGER_S``), then close.
        self._refused = True  # nothing after this body is parsed as a request
        self._lingering = True
        incoming.body.discard()
        self.resume_reading(_PAUSED_BY_BODY | _PAUSED_BY_BACKLOG)
        self._loop.call_later(_LINGER_S, self._linger_over)

    def _linger_over(self) -> None:
        if self._tr is not None:
            self._tr.close()

    # -- writing: ``http_writer.AnswerWriter`` ---------------------------------------------

    @property
    def writer(self) -> AnswerWriter:
        """What the door writes this connection's answers through (set once the connection is made)."""
        assert self._writer is not None
        return self._writer

    def _must_close(self) -> bool:
        return self._listener.draining or self._refused

    def pause_writing(self) -> None:
        if self._writer is not None:
            self._writer.pause()

    def resume_writing(self) -> None:
        if self._writer is not None:
            self._writer.resume()
