"""The upstream HTTP/1.1 client: pooled keep-alive connections on asyncio protocols, parsed by httptools.

Why not aiohttp's ``ClientSession``: proxying is the gateway's hot path, and
measured side by side on loopback (``bench/bare_aiohttp_proxy.py`` against the
same server with this client) the session's per-request machinery (request and
response objects, tracing hooks, cookie handling, timer contexts) cost about
2.5 times the CPU of the whole proxied request. This client does only what a
reverse proxy needs: write one request, parse the answer with llhttp (the
parser Node.js and aiohttp's server use), hand the body over as it arrives, and
keep the connection for the next request when both sides allow it.

Failures are classified by how far the request got, because that decides
whether a retry is safe: ``ConnectFailed`` means no byte reached the upstream;
everything else may have been seen by it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import httptools
from yarl import URL

MAX_HEADER_BYTES = 65_536  # an upstream's response head larger than this is not a model server's answer
MAX_HEADERS = 256
PAUSE_ABOVE = 262_144  # buffered but unread body bytes before the socket stops being read (a slow client)
# control characters other than tab, CR and LF (those two are counted: each header line ends in exactly one pair)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NOT_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")  # controls and space would end or split the request line
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class UpstreamError(Exception):
    """A request to an upstream that failed. ``str()`` is safe to show a client."""


class ConnectFailed(UpstreamError):
    """No connection to the upstream: nothing was sent, a retry elsewhere is safe."""


class ConnectTimeout(ConnectFailed):
    """Connecting (or waiting for a free pooled connection) took longer than allowed."""


class ReadTimeout(UpstreamError):
    """The upstream stayed silent longer than allowed, before its headers or between two body chunks."""


class InvalidResponse(UpstreamError):
    """The upstream answered something that is not valid HTTP/1.1."""


class Disconnected(UpstreamError):
    """The upstream closed the connection before its answer was complete."""


class InvalidRequestLine(ValueError):
    """The request we were asked to send would not be one request on the wire."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where one upstream listens: what to connect to and what to send as ``Host``."""

    host: str
    port: int
    tls: bool
    host_header: str
    prefix: str  # the upstream URL's path, without a trailing slash, put before every target

    @classmethod
    def parse(cls, text: str) -> Origin:
        url = URL(text)
        port = url.port or (443 if url.scheme == "https" else 80)
        host = url.raw_host or ""
        host_header = f"[{host}]" if ":" in host else host
        if url.explicit_port:
            host_header = f"{host_header}:{port}"
        return cls(host, port, url.scheme == "https", host_header, url.raw_path.rstrip("/"))


class Response:
    """An upstream's answer: status and headers at once, the body as it arrives.

    Read it whole with ``read()`` or chunk by chunk with ``readany()``, then
    ``release()`` it: a fully read body on a keep-alive connection returns the
    connection to the pool, anything else closes it.
    """

    __slots__ = ("status", "headers", "_conn", "_chunks", "_buffered", "_eof", "_error", "_waiter", "_released")

    def __init__(self, conn: Connection, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.headers = headers
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive)."""
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    async def read(self) -> bytes:
        """The whole body (raises ``UpstreamError`` if it does not arrive complete)."""
        self._conn.resume()
        while not self._eof and self._error is None:
            await self._wait()
        if self._error is not None:
            raise self._error
        body = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return body

    async def readany(self) -> bytes:
        """The next chunk the upstream sent, as soon as there is one; ``b""`` at the end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered < PAUSE_ABOVE // 2:
            self._conn.resume()
        return chunk

    def release(self) -> None:
        """Give the connection back (pooled only if the answer was read to its end). Idempotent."""
        if not self._released:
            self._released = True
            self._conn.finished(reusable=self._eof and self._error is None and not self._chunks)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > PAUSE_ABOVE:
            self._conn.pause()
        self._wake()

    def _end(self, error: UpstreamError | None = None) -> None:
        if error is None:
            self._eof = True
        elif not self._eof:
            self._error = error
        self._wake()


class Connection(asyncio.Protocol):
    """One keep-alive connection to an upstream, serving one request at a time."""

    def __init__(self, pool: Pool) -> None:
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
        self._complete = False
        self._keep_alive = False
        self._last_data = 0.0
        self._timeout = 0.0
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
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, _Untrusted):  # no upgrades through a proxy
            self._fail(InvalidResponse("upstream sent an invalid response"))

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
        self._cancel_timer()
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
        self._timeout = timeout
        self._last_data = now = self._loop.time()
        self._timer = self._loop.call_at(now + timeout, self._check_silence)
        self.transport.write(head + body if body else head)
        return waiter

    def finished(self, *, reusable: bool) -> None:
        """The caller is done with the response: pool the connection or close it."""
        self._cancel_timer()
        self._response = None
        if reusable and self._complete and self._keep_alive and not self._head_only and self.usable():
            self.resume()
            self._pool.put_back(self)
        else:
            self._close()
            self._pool.lost(self)

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

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
        due = self._last_data + self._timeout
        if self._paused or now < due:  # paused: the client is slow, not the upstream
            self._timer = self._loop.call_at(max(due, now + 0.05), self._check_silence)
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


class Pool:
    """Keep-alive connections to the upstreams of one backend, at most ``limit`` open at once.

    Idle connections are reused newest first, so a burst leaves the older ones
    to expire after ``keepalive_s`` (below common upstream idle timeouts, so
    the upstream rarely closes a connection just as we reuse it).
    """

    def __init__(
        self,
        *,
        limit: int,
        keepalive_s: float,
        connect_timeout_s: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._limit = limit
        self._keepalive = keepalive_s
        self._connect_timeout = connect_timeout_s
        self._ssl = ssl_context
        self._idle: dict[Origin, list[Connection]] = {}
        self._origin_of: dict[Connection, Origin] = {}
        self._open = 0
        self._queue: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | None,
        timeout_s: float,
    ) -> Response:
        """Send one request and return its response once the headers arrived."""
        head = _head(method, origin, target, headers, body)
        conn = self._take_idle(origin) or await self._acquire(origin)
        try:
            return await conn.send(head, body, method == "HEAD", timeout_s)
        except BaseException:
            conn.finished(reusable=False)
            raise

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._origin_of):
            conn._close()
        for waiter in self._queue:
            if not waiter.done():
                waiter.set_exception(ConnectFailed("upstream client closed"))

    # -- connections -------------------------------------------------------------

    async def _acquire(self, origin: Origin) -> Connection:
        while True:
            conn = self._take_idle(origin)
            if conn is not None:
                return conn
            if self._open < self._limit:
                break
            if self._closed:
                raise ConnectFailed("upstream client closed")
            self._close_one_idle()  # its slot frees when the close completes, which wakes us
            waiter = self.loop.create_future()
            self._queue.append(waiter)
            try:
                await asyncio.wait_for(waiter, self._connect_timeout)
            except TimeoutError:
                raise ConnectTimeout("no upstream connection became free in time") from None
            finally:
                if waiter in self._queue:
                    self._queue.remove(waiter)
        self._open += 1
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: Connection(self), origin.host, origin.port,
                    ssl=self._ssl if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                ),
                self._connect_timeout,
            )
        except BaseException as exc:  # the slot was never used: give it to a waiting request
            self._open -= 1
            self._wake_one()
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout("upstream connect timed out") from None
            if isinstance(exc, OSError):  # refused, unreachable, DNS, TLS handshake (ssl.SSLError)
                raise ConnectFailed("upstream connection failed") from exc
            raise
        self._origin_of[conn] = origin
        return conn

    def _take_idle(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.usable() and now - conn.idle_since < self._keepalive:
                return conn
            conn._close()
        return None

    def put_back(self, conn: Connection) -> None:
        origin = self._origin_of.get(conn)
        if origin is None or self._closed:
            conn._close()
            return
        conn.idle_since = self.loop.time()
        self._idle.setdefault(origin, []).append(conn)
        if self._queue:
            self._wake_one()
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._keepalive, self._sweep)

    def lost(self, conn: Connection) -> None:
        """A connection closed (by either side): forget it and let a waiting request open another."""
        origin = self._origin_of.pop(conn, None)
        if origin is None:
            return
        self._open -= 1
        idle = self._idle.get(origin)
        if idle and conn in idle:
            idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _close_one_idle(self) -> None:
        """At the limit with idle connections to another upstream: close the oldest to make room."""
        for idle in self._idle.values():
            if idle:
                idle.pop(0)._close()
                return

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop.time() - self._keepalive
        remaining = False
        for idle in self._idle.values():
            while idle and idle[0].idle_since <= deadline:
                idle.pop(0)._close()
            remaining = remaining or bool(idle)
        if remaining and not self._closed:
            self._sweeper = self.loop.call_later(self._keepalive, self._sweep)


def _head(method: str, origin: Origin, target: str, headers: Sequence[tuple[str, str]], body: bytes | None) -> bytes:
    """The request line and headers, refused if any part could split the request (CR/LF, controls)."""
    lines = "".join([f"{k}: {v}\r\n" for k, v in headers])
    count = len(headers)
    if body is not None or method in _BODY_METHODS:
        lines += f"Content-Length: {len(body) if body else 0}\r\n"
        count += 1
    if lines.count("\n") != count or lines.count("\r") != count or _CONTROL.search(lines) \
            or _NOT_IN_TARGET.search(target):
        raise InvalidRequestLine("a header or the target for the upstream contains a control character")
    return f"{method} {origin.prefix}{target} HTTP/1.1\r\nHost: {origin.host_header}\r\n{lines}\r\n".encode(
        "utf-8", "surrogateescape")

