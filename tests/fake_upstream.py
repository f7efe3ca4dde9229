"""A fake network for the upstream client: scripted upstreams without sockets, for framing unit tests.

The client (``backends/http/client.py``) opens connections with
``pool.loop.create_connection`` and its connections (``connection.py``) read
time, futures and timers from the same ``pool.loop``. ``FakeNetwork`` stands
in for that loop: it hands every other call to the real loop, and answers
``create_connection`` with an in-memory transport whose other end runs a
script. Scripts have the same shape as ``http_helpers.RawServer`` scripts::

    async def script(reader: asyncio.StreamReader, writer: FakeWriter) -> None:
        await reader.readuntil(b"\\r\\n\\r\\n")          # what the client wrote
        writer.write(b"HTTP/1.1 200 OK\\r\\n")            # each write reaches the client as one data_received
        writer.write(b"Content-Length: 2\\r\\n\\r\\n{}")

and the connection is closed from the upstream's side when the script returns.
Because each ``write`` is delivered as one chunk, a test decides exactly how
an answer is cut up (one byte at a time, a head split mid-line), which a real
socket does not promise. Given a ``FakeClock``, the network also answers the
client's ``time``/``call_at``/``call_later`` from it, so silence timeouts,
deadlines and keep-alive expiry happen when the test advances the clock.
Nothing here changes the client: production code keeps calling the real loop.

    pool, net = scripted_pool(script)
    response = await pool.request(ORIGIN, "GET", "/x", [], None, 5)
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Awaitable, Callable

from backends.http.client import Origin, Pool
from tests.clock import FakeClock

ORIGIN = Origin.parse("http://upstream.test:8000")

Script = Callable[[asyncio.StreamReader, "FakeWriter"], Awaitable[Any]]


class FakeTransport(asyncio.Transport):
    """The client's end of one fake connection: what it writes goes to the script's reader."""

    def __init__(self, peer: FakePeer) -> None:
        super().__init__()
        self._peer = peer

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._peer.closed:
            self._peer.reader.feed_data(bytes(data))

    def is_closing(self) -> bool:
        return self._peer.closed

    def close(self) -> None:
        self._peer.shut(by_client=True)

    def abort(self) -> None:
        self._peer.shut(by_client=True)

    def pause_reading(self) -> None:
        self._peer.paused = True
        self._peer.pauses += 1

    def resume_reading(self) -> None:
        if self._peer.paused:
            self._peer.paused = False
            self._peer.schedule()  # like a socket: what waits is delivered on a later loop turn, never inside this call

    def is_reading(self) -> bool:
        return not self._peer.paused

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("192.0.2.1", ORIGIN.port), "sockname": ("127.0.0.1", 40000)}.get(name, default)


class FakeWriter:
    """The script's end: ``write`` queues bytes for the client (delivered in order, one chunk per write)."""

    def __init__(self, peer: FakePeer) -> None:
        self._peer = peer

    def write(self, data: bytes) -> None:
        self._peer.send(data)

    async def drain(self) -> None:
        await asyncio.sleep(0)  # one loop turn, not a clock: lets the client take what was written

    def close(self) -> None:
        self._peer.shut(by_client=False)

    def is_closing(self) -> bool:
        return self._peer.closed

    async def wait_closed(self) -> None:
        return None


class FakePeer:
    """One fake connection: the bytes in flight each way, pause state, and who closed it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        self._loop = loop
        self.protocol = protocol
        self.reader = asyncio.StreamReader()
        self.transport = FakeTransport(self)
        self.writer = FakeWriter(self)
        self._inbound: collections.deque[bytes] = collections.deque()  # written by the script, not yet delivered
        self._eof = False  # the script closed: connection_lost once the inbound bytes are delivered
        self._scheduled = False
        self.paused = False
        self.pauses = 0  # how often the client paused reading (back-pressure)
        self.closed = False
        self.closed_by_client = False
        self.lost = False  # connection_lost delivered

    @property
    def received(self) -> bytes:
        """Everything the client wrote that the script has not read yet (for a script that ended early)."""
        return bytes(self.reader._buffer)  # type: ignore[attr-defined]

    def send(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self._inbound.append(data)
        self.schedule()

    def shut(self, *, by_client: bool) -> None:
        if by_client:
            if not self.closed:
                self.closed = self.closed_by_client = True
                self._inbound.clear()  # a closed socket reads nothing more
                self.reader.feed_eof()
                self.schedule()
            return
        if not self._eof and not self.closed:
            self._eof = True
            self.schedule()

    def pump(self) -> None:
        self._scheduled = False
        if self.lost:
            return
        if self.closed_by_client:
            self._lose()
            return
        while self._inbound and not self.paused:
            self.protocol.data_received(self._inbound.popleft())
            if self.closed_by_client:  # the client gave up on what it read
                self._lose()
                return
        if self._eof and not self._inbound and not self.paused:  # like a socket, EOF is seen only while reading
            self.closed = True
            self._lose()

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.reader.feed_eof()
            self.protocol.connection_lost(None)

    def schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.pump)


class FakeNetwork:
    """Stands in for the loop a ``Pool`` uses: ``create_connection`` runs ``script``, the rest is the real loop's."""

    def __init__(self, script: Script, loop: asyncio.AbstractEventLoop | None = None,
                 clock: FakeClock | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._script = script
        self.clock = clock  # given: the client's timers (silence, deadlines, keep-alive) run on it, not on real time
        self.peers: list[FakePeer] = []
        self.refuse = False  # connect attempts fail as a refused connection would
        self.errors: list[BaseException] = []  # what scripts raised (a test's own bug shows up here)
        self._tasks: set[asyncio.Task[None]] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def time(self) -> float:
        return self.clock() if self.clock is not None else self._loop.time()

    def call_at(self, when: float, callback: Callable[..., object], *args: Any, context: Any = None) -> Any:
        if self.clock is not None:
            return self.clock.call_at(when, callback, *args)
        return self._loop.call_at(when, callback, *args, context=context)

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any, context: Any = None) -> Any:
        return self.call_at(self.time() + delay, callback, *args, context=context)

    @property
    def connections(self) -> int:
        return len(self.peers)

    async def create_connection(self, factory: Callable[[], asyncio.Protocol], host: str | None = None,
                                port: int | None = None, **_kw: Any) -> tuple[asyncio.Transport, asyncio.Protocol]:
        if self.refuse:
            raise ConnectionRefusedError(f"connect to {host}:{port} refused (fake network)")
        protocol = factory()
        peer = FakePeer(self._loop, protocol)
        self.peers.append(peer)
        protocol.connection_made(peer.transport)
        task = self._loop.create_task(self._serve(peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return peer.transport, protocol

    async def _serve(self, peer: FakePeer) -> None:
        try:
            await self._script(peer.reader, peer.writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed while the script read: as a real server sees it
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - kept for the test to look at
            self.errors.append(exc)
            raise
        finally:
            peer.writer.close()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def scripted_pool(script: Script, *, clock: FakeClock | None = None, **options: Any) -> tuple[Pool, FakeNetwork]:
    """A client ``Pool`` whose every connection is a fake one running ``script`` (see the module doc);
    with ``clock``, the client's timers run on that fake clock."""
    pool = Pool(limit=options.pop("limit", 8), keepalive_s=options.pop("keepalive_s", 4.0),
                connect_timeout_s=options.pop("connect_timeout_s", 2.0), ssl_context=None)
    assert not options, options
    net = FakeNetwork(script, pool.loop, clock)
    pool.loop = net  # type: ignore[assignment]  # the only seam: the pool's loop
    return pool, net


def answers(*responses: bytes, split: int = 0, hold: bool = False) -> Script:
    """A script that reads one request (head and Content-Length body) per answer and writes the answer.

    ``split``: write each answer in pieces of that many bytes (each a separate ``data_received``).
    ``hold``: keep the connection open after the last answer (only the client can close it then).
    """
    async def script(reader: asyncio.StreamReader, writer: FakeWriter) -> None:
        for answer in responses:
            await read_request(reader)
            if split:
                for i in range(0, len(answer), split):
                    writer.write(answer[i:i + split])
            else:
                writer.write(answer)
            await writer.drain()
        if hold:
            await asyncio.Event().wait()  # until the client closes (the script is cancelled at teardown)
    return script


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request as the client wrote it: the head, and the body its Content-Length announces."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    return head + (await reader.readexactly(length) if length else b"")
