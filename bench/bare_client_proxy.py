"""The floor of our stack: aiohttp's server + the gateway's upstream client (backends/http/client.py), no logic.

Compare with bench/bare_aiohttp_proxy.py (the same proxy on aiohttp's ClientSession) as two custom targets
of the reference harness, or read their CPU per request:
    python bench/bare_client_proxy.py http://127.0.0.1:18080 18097
"""

import asyncio
import sys
from pathlib import Path

import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backends.http.client import Origin, Pool  # noqa: E402

UP = sys.argv[1]
PORT = int(sys.argv[2])


async def main() -> None:
    pool = Pool(limit=256, keepalive_s=4, connect_timeout_s=3, ssl_context=None)
    origin = Origin.parse(UP)

    async def handle(request: web.BaseRequest) -> web.Response:
        body = await request.read()
        resp = await pool.request(origin, "POST", request.path, [("Content-Type", "application/json")], body, 10)
        try:
            data = await resp.read()
        finally:
            resp.release()
        return web.Response(body=data, content_type="application/json")

    runner = web.ServerRunner(web.Server(handle))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT).start()
    await asyncio.Event().wait()


uvloop.run(main())
