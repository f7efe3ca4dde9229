"""The floor of a door of our own: an httptools request parser + the gateway's upstream client, no logic.

Compare with bench/bare_client_proxy.py (the same proxy on aiohttp's server) under the same load, to see
what aiohttp's server costs per request before any gateway logic runs:
    python bench/bare_httptools_proxy.py http://127.0.0.1:18080 18098
The port is bound with SO_REUSEPORT, so two of them on one port are a two-worker floor to set beside
``serve --workers 2`` (the reference harness's ``START_CMD_...``: start both, then ``wait``).
Keep-alive and Content-Length bodies only: a measuring stick, not a server.
"""

import asyncio
import sys
from pathlib import Path

import httptools
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backends.http.client import Origin, Pool  # noqa: E402

UP = sys.argv[1]
PORT = int(sys.argv[2])
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"


class Door(asyncio.Protocol):
    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool, self.origin = pool, origin
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        asyncio.get_running_loop().create_task(self.answer(self.url.decode(), body))

    async def answer(self, path: str, body: bytes) -> None:
        resp = await self.pool.request(self.origin, "POST", path, [("Content-Type", "application/json")], body, 10)
        try:
            data = await resp.read()
        finally:
            resp.release()
        assert self.transport is not None
        self.transport.write(HEAD % len(data) + data)


async def main() -> None:
    pool = Pool(limit=256, keepalive_s=4, connect_timeout_s=3, ssl_context=None)
    origin = Origin.parse(UP)
    await asyncio.get_running_loop().create_server(lambda: Door(pool, origin), "127.0.0.1", PORT, reuse_port=True)
    await asyncio.Event().wait()


uvloop.run(main())
