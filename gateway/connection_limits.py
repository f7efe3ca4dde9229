"""Client-side limits, enforced where aiohttp reads and writes the socket.

A reverse proxy must not let one peer hold what others need. aiohttp's server
offers a keep-alive timeout and per-line header limits, but nothing bounds how
long a request head may take to arrive, how large a head may grow in total, how
many connections one address (or everyone) may open, or how long a response may
sit unread in a socket. Each of those lets a peer pin a connection and its
memory, and the last one also pins whatever the request holds upstream (a pooled
connection to a model server). ``GuardedRequestHandler`` adds them to aiohttp's
own protocol object, so there is one HTTP parser (aiohttp's, in C) and no extra
task or timer per request:

* **Head deadline** (``header_timeout_s``): from the first byte of a request
  head (also a keep-alive connection's next one) to the end of its headers.
  Missed: nothing more is read; a 408 after whatever the connection already
  has under way (pipelined requests are still answered), then close.
* **Head size** (``max_header_bytes``): bytes are counted as they arrive, so a
  head over the cap is refused (431, then close) without buffering it whole.
* **Connection caps** (``max_connections``, ``max_connections_per_ip``): a
  connection beyond either is closed in ``connection_made``, before any read.
* **Write deadline** (``client_write_timeout_s``): the transport's high-water
  mark is set to 1 byte, so ``pause_writing`` runs whenever bytes wait for the
  client beyond what the kernel took (over TLS, also after an answer that left
  bytes in the kernel). A client that acknowledges nothing for the deadline is
  dropped (transport aborted with a reset): the handler's pending write fails,
  aiohttp cancels the handler task, and the request's cleanup releases its
  upstream. A slow reader that keeps taking is given another period each time.

Where a head starts and ends is known from aiohttp's side of the parser: a
chunk that completes no message while no body is being read is all head; a
chunk that completes one is checked against the parsed head's size. One case
stays unseen: the start of a pipelined head in the same read as the end of a
``Content-Length`` body. Its clock starts with the next read, and aiohttp's
keep-alive timer (armed after every answer, not pushed back by trickling bytes)
still closes the connection: no worse than an idle connection.

The module reads a few of aiohttp's internals (``_messages``, ``_waiter``,
``_close``, ``_ErrInfo``...); ``tests/test_client_limits.py`` checks they exist,
so an aiohttp upgrade that moves them fails loudly there rather than silently here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from .errors import GatewayError, RequestHeaderFieldsTooLarge, RequestTimeout
from .socket_probes import abort_with_reset, bytes_taken, kernel_unsent

if TYPE_CHECKING:
    from aiohttp.http_parser import RawRequestMessage
    from aiohttp.streams import StreamReader
    from aiohttp.web_server import Server

    from .config import ServerConfig

log = logging.getLogger("maas.connections")

_parse = RequestHandler.data_received  # aiohttp's parsing step, called without building a super() per read

_CLOSE_GRACE_S = 2.0  # after a 408/431 answer: then reset, even if a TLS peer never answers our close_notify
_HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """The ``server.*`` limits one listener enforces (their meaning and defaults: ``ServerConfig``)."""

    header_timeout_s: float
    max_header_bytes: int
    max_connections: int
    max_connections_per_ip: int
    client_write_timeout_s: float

    @classmethod
    def from_config(cls, server: ServerConfig) -> ClientLimits:
        return cls(server.header_timeout_s, server.max_header_bytes, server.max_connections,
                   server.max_connections_per_ip, server.client_write_timeout_s)


class ConnectionCounter:
    """Open connections of one listener, in total and per client address, and what was refused.

    One per listener (so per process: ``--workers`` runs a listener per worker).
    The tallies are plain ints for tests and diagnostics.
    """

    __slots__ = ("limits", "total", "per_ip", "refused", "head_timeouts", "heads_too_large", "write_timeouts")

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_ip: dict[str, int] = {}
        self.refused = 0
        self.head_timeouts = 0
        self.heads_too_large = 0
        self.write_timeouts = 0

    def admit(self, ip: str) -> bool:
        """Count a new connection from ``ip``, or say no (and count the refusal) when a cap is reached."""
        held = self.per_ip.get(ip, 0)
        if self.total >= self.limits.max_connections or held >= self.limits.max_connections_per_ip:
            self.refused += 1
            return False
        self.total += 1
        self.per_ip[ip] = held + 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        held = self.per_ip.get(ip, 0) - 1
        if held > 0:
            self.per_ip[ip] = held
        else:
            self.per_ip.pop(ip, None)


def head_size(message: RawRequestMessage) -> int:
    """A lower bound of a parsed head's size on the wire: request line, ``name:value`` lines, blank line.

    A lower bound, so a head under the cap is never refused; it undercounts only
    the optional space after each colon.
    """
    size = len(message.method) + len(message.path) + 13  # "M P HTTP/1.1\r\n" + the final "\r\n"
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 3
    return size


def head_refusal(exc: BaseException | None) -> GatewayError | None:
    """The client error for a head the connection refused (ours, or aiohttp's own header limits), else None."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc)):
        return RequestHeaderFieldsTooLarge("request header fields too large")
    return None


class GuardedRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 protocol with the client-side limits of this module.

    Built by the listener's ``web.Server`` subclass with a shared ``ConnectionCounter``.
    """

    __slots__ = ("_counter", "_limits", "_peer_ip", "_tr", "_head_bytes", "_head_deadline", "_head_timer",
                 "_max_head", "_refused", "_body", "_body_chunked", "_tls", "_write_deadline", "_write_mark",
                 "_write_timer")

    def __init__(self, manager: Server, *, counter: ConnectionCounter, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._counter = counter
        self._limits = counter.limits
        self._peer_ip = ""
        self._tr: asyncio.Transport | None = None  # ours: aiohttp's force_close() forgets it before it is closed
        self._head_bytes = 0
        self._head_deadline = 0.0  # 0: no head is arriving
        self._head_timer: asyncio.TimerHandle | None = None
        self._max_head = counter.limits.max_header_bytes
        self._refused = False  # a head was refused: the rest of the connection is discarded
        self._body: StreamReader | None = None  # the body being read (its bytes are not head bytes)
        self._body_chunked = False
        self._tls = False
        self._write_deadline = 0.0  # 0: nothing waits for the client
        self._write_mark = 0
        self._write_timer: asyncio.TimerHandle | None = None

    # -- connections ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, (tuple, list)) and peer else ""
        if not self._counter.admit(ip):
            log.debug("connection from %s refused: connection cap reached", ip)
            cast(asyncio.Transport, transport).abort()  # before any read: nothing of this peer is parsed or kept
            return
        self._peer_ip = ip
        self._tr = tr = transport  # type: ignore[assignment]
        self._tls = transport.get_extra_info("sslcontext") is not None
        try:  # a byte the client leaves unread pauses writing, and so starts the write deadline (not 0:
            tr.set_write_buffer_limits(1)  # type: ignore[attr-defined]  # asyncio's TLS pauses on `size >= high`)
        except (AttributeError, NotImplementedError):  # pragma: no cover - every stream transport has it
            pass
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._tr is None:
            return  # refused in connection_made: never counted, never started
        self._tr = None
        self._counter.release(self._peer_ip)
        self._head_deadline = self._write_deadline = 0.0
        self._body = None
        for timer in (self._head_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._write_timer = None
        super().connection_lost(exc)

    def _drop(self) -> None:
        """Close now, with a reset: nothing more is sent, and the kernel frees what the peer left unread."""
        if self._tr is not None:
            abort_with_reset(self._tr)

    # -- request heads -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # Runs for every read: the common case (whole heads, no open body) costs a few attribute reads.
        if self._refused:
            return  # a refused head: nothing more of this connection is parsed
        if self._close or self._force_close or self._payload_parser is not None or self._upgraded:
            self._head_bytes, self._head_deadline, self._body = 0, 0.0, None
            _parse(self, data)
            return
        body = self._body
        if body is not None and body.is_eof():
            body = self._body = None
        before = self._request_count
        _parse(self, data)
        count = self._request_count - before
        if count:  # heads ended in this read
            self._head_deadline = 0.0
            if self._head_bytes or count > 1 or len(data) > self._max_head:
                if self._heads_over_cap(data, count):
                    return
            message, payload = self._messages[-1]
            if payload is EMPTY_PAYLOAD:
                if data[-4:] != _HEAD_END:
                    self._after_message(data)
            elif not payload.is_eof():
                # a message with a payload is a RawRequestMessage (an _ErrInfo comes with EMPTY_PAYLOAD)
                self._body, self._body_chunked = payload, message.chunked  # type: ignore[union-attr]
            elif message.chunked and data[-4:] != _HEAD_END:  # type: ignore[union-attr]
                self._after_message(data)
            # else: a Content-Length body that ended in this read; see the module docstring
        elif body is None:  # no head ended, no body open: every byte is head
            if data:
                self._head_arrived(data)
        elif body.is_eof():  # a chunked body ended in this read; what follows it (if anything) starts a head
            self._body = None
            if self._body_chunked and data[-4:] != _HEAD_END:
                self._after_message(data)

    def _head_arrived(self, data: bytes) -> None:
        if not self._head_deadline:
            if not data.strip(b"\r\n"):
                return  # blank lines between requests are ignored by the parser, and so here
            self._start_head_clock()
        self._head_bytes += len(data)
        if self._head_bytes > self._max_head:
            self._counter.heads_too_large += 1
            self._refuse_head(RequestHeaderFieldsTooLarge(f"request line and headers over {self._max_head} bytes"))

    def _heads_over_cap(self, data: bytes, count: int) -> bool:
        """Heads ended in ``data`` after earlier reads, or several, or a large read: refuse one over the cap."""
        self._head_bytes = 0
        messages = self._messages
        limit = self._max_head
        for i in range(len(messages) - count, len(messages)):
            message = messages[i][0]
            if not isinstance(message, _ErrInfo) and head_size(message) > limit:
                while len(messages) > i:
                    messages.pop()
                self._counter.heads_too_large += 1
                self._refuse_head(RequestHeaderFieldsTooLarge(f"request line and headers over {limit} bytes"))
                return True
        return False

    def _after_message(self, data: bytes) -> None:
        """A message ended in ``data``, not at its end: the bytes after its blank line start the next head."""
        if not data or data.endswith(b"\n\n") or isinstance(self._messages[-1][0], _ErrInfo):
            return  # (after a parse error aiohttp answers 400 and closes)
        end = data.rfind(_HEAD_END)
        self._head_arrived(data[end + 4:] if end >= 0 else data)

    def _start_head_clock(self) -> None:
        loop = self._loop
        deadline = loop.time() + self._limits.header_timeout_s
        self._head_deadline = deadline
        if self._head_timer is None:  # one timer per connection at a time; it re-arms itself when a head is later
            self._head_timer = loop.call_at(deadline, self._head_clock_fired)

    def _head_clock_fired(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if not deadline or self._tr is None:
            return
        loop = self._loop
        now = loop.time()
        if now >= deadline and (self._messages or getattr(self, "_buffer_paused", False)):
            # the unparsed bytes wait on our own backlog of pipelined requests, not on the client
            self._head_deadline = deadline = now + self._limits.header_timeout_s
        if now < deadline:
            self._head_timer = loop.call_at(deadline, self._head_clock_fired)
            return
        self._head_deadline = 0.0
        self._counter.head_timeouts += 1
        log.debug("connection from %s: request head not complete within %ss", self._peer_ip,
                  self._limits.header_timeout_s)
        self._refuse_head(RequestTimeout(f"request head not received within {self._limits.header_timeout_s:g} s"))

    def _refuse_head(self, error: GatewayError) -> None:
        """Read no more of this connection; answer ``error`` after what is already under way, then close.

        The refusal goes through aiohttp's own error path (``handle_error``), in order:
        a pipelined request before the bad head is still answered. What arrives
        from now on is thrown away unparsed.
        """
        self._head_bytes, self._head_deadline = 0, 0.0
        self._refused = True
        idle = not self._request_in_progress and not self._messages
        self._messages.append((_ErrInfo(status=error.status, exc=error, message=error.message), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if idle:  # answered now: then closed, at the latest after a grace (a TLS close waits on the peer)
            self._loop.call_later(_CLOSE_GRACE_S, self._drop)  # a no-op once the connection is gone

    # -- writes --------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._tr is not None and not self._write_deadline:
            self._watch_writes()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_deadline = 0.0  # everything was handed to the kernel; the timer, if any, lapses

    def log_access(self, request: Any, response: Any, time: float | None) -> None:
        # The one synchronous call aiohttp makes once an answer is written. Over TLS, encrypted bytes
        # can sit in the TCP transport under the TLS one, where pause_writing never sees them: watch
        # the kernel's queue instead. (Plain TCP answers are in the kernel by now: a closed socket
        # hands them over, it holds no descriptor.)
        if self._tls and not self._write_deadline and self._tr is not None:
            if kernel_unsent(self._tr.get_extra_info("socket")):
                self._watch_writes()
        if self._logging_enabled:
            super().log_access(request, response, time)

    def _watch_writes(self) -> None:
        tr = self._tr
        assert tr is not None
        self._write_mark = bytes_taken(tr)
        loop = self._loop
        deadline = loop.time() + self._limits.client_write_timeout_s
        self._write_deadline = deadline
        if self._write_timer is None:  # one timer per connection at a time; it re-arms itself when due later
            self._write_timer = loop.call_at(deadline, self._write_clock_fired)

    def _write_clock_fired(self) -> None:
        self._write_timer = None
        deadline = self._write_deadline
        tr = self._tr
        if not deadline or tr is None:
            return
        loop = self._loop
        now = loop.time()
        if now < deadline:
            self._write_timer = loop.call_at(deadline, self._write_clock_fired)
            return
        taken = bytes_taken(tr)
        if taken > self._write_mark:  # the client took something: a slow reader, not a stalled one
            self._write_mark = taken
            self._write_deadline = deadline = now + self._limits.client_write_timeout_s
            self._write_timer = loop.call_at(deadline, self._write_clock_fired)
            return
        if not self._paused and not kernel_unsent(tr.get_extra_info("socket")):
            self._write_deadline = 0.0  # all taken meanwhile
            return
        self._counter.write_timeouts += 1
        log.info("connection from %s dropped: took nothing of its answer for %ss", self._peer_ip,
                 self._limits.client_write_timeout_s)
        self._drop()
