"""The upstream HTTP/1.1 client: pooled keep-alive connections on asyncio protocols, parsed by httptools.

Why not aiohttp's ``ClientSession``: proxying is the gateway's hot path, and
measured side by side on loopback (``bench/bare_aiohttp_proxy.py`` against the
same server with this client) the session's per-request machinery (request and
response objects, tracing hooks, cookie handling, timer contexts) cost about
2.5 times the CPU of the whole proxied request. This client does only what a
reverse proxy needs: write one request, parse the answer with llhttp (the
parser Node.js and aiohttp's server use), hand the body over as it arrives, and
keep the connection for the next request when both sides allow it.

This module is the pool and the request head; one connection's protocol
(parsing, timers, when it may be reused) is ``connection``, the body reader and
its flow control ``response``. Failures (``errors``) are classified by how far
the request got, because that decides whether a retry is safe:
``ConnectFailed`` means no byte reached the upstream; everything else may have
been seen by it. All of them are importable from here.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from yarl import URL

from .connection import MAX_HEADER_BYTES, MAX_HEADERS, Connection
from .errors import (ConnectFailed, ConnectTimeout, Disconnected, InvalidRequestLine, InvalidResponse, ReadTimeout,
                     ResponseTooLarge, StreamExpired, UpstreamError)
from .response import PAUSE_ABOVE, Response

__all__ = ["ConnectFailed", "ConnectTimeout", "Connection", "Disconnected", "InvalidRequestLine", "InvalidResponse",
           "MAX_HEADER_BYTES", "MAX_HEADERS", "Origin", "PAUSE_ABOVE", "Pool", "ReadTimeout", "Response",
           "ResponseTooLarge", "StreamExpired", "UpstreamError"]

# control characters other than tab, CR and LF (those two are counted: each header line ends in exactly one pair)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NOT_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")  # controls and space would end or split the request line
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


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


class Pool:
    """Keep-alive connections to the upstreams of one backend, at most ``limit`` open at once.

    Idle connections are reused oldest first (FIFO): each waits as long as
    possible between two requests, so bytes an upstream sends late show up
    (and close the connection) while it is idle, not as the next answer. An
    idle connection older than ``keepalive_s`` (below common upstream idle
    timeouts) is closed instead of reused, so the upstream rarely closes one
    just as we reuse it.
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
        self._idle: dict[Origin, deque[Connection]] = {}
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
            idle = self._take_idle(origin)
            if idle is not None:
                return idle
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
            conn = idle.popleft()
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
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = deque()
        idle.append(conn)
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
                idle.popleft()._close()
                return

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop.time() - self._keepalive
        remaining = False
        for idle in self._idle.values():
            while idle and idle[0].idle_since <= deadline:
                idle.popleft()._close()
            remaining = remaining or bool(idle)
        if remaining and not self._closed:
            self._sweeper = self.loop.call_later(self._keepalive, self._sweep)


def _could_split(lines: str, count: int, target: str) -> bool:
    """Whether header lines (``count`` of them, each ending in CRLF) or the target hold a CR, LF or control
    character that could end or split the request upstream."""
    if lines.count("\n") != count:  # an LF of a value's own
        return True
    if lines.replace("\r\n", "").isprintable() and target.isprintable() and " " not in target:
        return False  # the common case, in a few C passes: no control character, lone CR or tab; no space in the target
    return lines.count("\r") != count or bool(_CONTROL.search(lines)) or bool(_NOT_IN_TARGET.search(target))


def _head(method: str, origin: Origin, target: str, headers: Sequence[tuple[str, str]], body: bytes | None) -> bytes:
    """The request line and headers, refused if any part could split the request (CR/LF, controls)."""
    lines = "".join([f"{k}: {v}\r\n" for k, v in headers])
    count = len(headers)
    if body is not None or method in _BODY_METHODS:
        lines += f"Content-Length: {len(body) if body else 0}\r\n"
        count += 1
    if _could_split(lines, count, target):
        raise InvalidRequestLine("a header or the target for the upstream contains a control character")
    return f"{method} {origin.prefix}{target} HTTP/1.1\r\nHost: {origin.host_header}\r\n{lines}\r\n".encode(
        "utf-8", "surrogateescape")

