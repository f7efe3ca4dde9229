#!/usr/bin/env python3
"""A stand-in model server for trying the gateway: OpenAI-compatible chat (with SSE streaming),
KServe v2 infer/metadata/ready, and a raw /predict route. Not for production.

    python deploy/sample_upstream.py --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    text = "Hello from the sample upstream."
    if not body.get("stream"):
        return web.json_response({
            "id": "chatcmpl-sample", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14},
        })
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    for word in text.split(" "):
        chunk = {"id": "chatcmpl-sample", "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": body.get("model"), "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await asyncio.sleep(0.05)
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"id": "chatcmpl-sample", "object": "chat.completion.chunk", "choices": [],
                 "usage": {"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}}
        await response.write(f"data: {json.dumps(usage)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def v2_infer(request: web.Request) -> web.Response:
    body = await request.json()
    n = body["inputs"][0]["shape"][0] if body.get("inputs") else 1
    scores = [0.02, 0.01, 0.7, 0.03, 0.04, 0.05, 0.05, 0.04, 0.03, 0.03]
    return web.json_response({"model_name": request.match_info["model"], "outputs": [
        {"name": "scores", "datatype": "FP32", "shape": [n, 10], "data": scores * n}]})


async def v2_meta(request: web.Request) -> web.Response:
    return web.json_response({"name": request.match_info["model"], "platform": "sample",
                              "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
                              "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 10]}]})


async def ready(_: web.Request) -> web.Response:
    return web.json_response({"ready": True})


async def predict(request: web.Request) -> web.Response:
    return web.json_response({"prediction": 2, "received_bytes": len(await request.read())})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v2/models/{model}/infer", v2_infer)
    app.router.add_get("/v2/models/{model}", v2_meta)
    app.router.add_get("/v2/models/{model}/ready", ready)
    app.router.add_get("/healthz", ready)
    app.router.add_post("/predict", predict)
    web.run_app(app, host=args.host, port=args.port, access_log=None)


if __name__ == "__main__":
    main()
