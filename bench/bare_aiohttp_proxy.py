import asyncio, sys, uvloop
from aiohttp import web, ClientSession, TCPConnector, ClientTimeout
UP = sys.argv[1]; PORT = int(sys.argv[2])
async def main():
    session = ClientSession(connector=TCPConnector(limit=256), auto_decompress=False)
    timeout = ClientTimeout(total=10)
    async def handle(request):
        body = await request.read()
        async with session.post(UP + request.path, data=body, headers={"Content-Type": "application/json"}, timeout=timeout) as r:
            data = await r.read()
        return web.Response(body=data, content_type="application/json")
    server = web.Server(handle)
    runner = web.ServerRunner(server); await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT).start()
    await asyncio.Event().wait()
uvloop.run(main())
