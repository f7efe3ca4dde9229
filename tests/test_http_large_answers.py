"""Large answers through the real gateway: they arrive whole, a cap turns an oversized one into 502, a stream ends.

The issue's reproduction: ``POST /v1/embeddings`` with 64 inputs of 1536-d
vectors (about 2 MB of JSON) never arrived, and two of them made every other
caller of the model wait for a 504.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time

import aiohttp
import orjson
import pytest
from aiohttp import web
from tests import harness
from tests.harness import ALLOW_ANALYSTS, eventually, openai_model, start_gateway, start_upstream, v2_model
from tests.http_helpers import RawServer, make_ctx, read_request_head
from tests.upstreams import running, trickle

from gateway.errors import BackendTimeout
from gateway.pipeline import RouteKind

MIB = 1024 * 1024
BLOB = random.Random(7).randbytes(10 * MIB)


def embeddings_answer() -> bytes:
    rng = random.Random(1)
    data = [{"object": "embedding", "index": i, "embedding": [rng.uniform(-1, 1) for _ in range(1536)]}
            for i in range(64)]
    return orjson.dumps({"object": "list", "data": data, "model": "emb",
                         "usage": {"prompt_tokens": 64, "total_tokens": 64}})


EMBEDDINGS = embeddings_answer()
V2_BIG = orjson.dumps({"model_name": "digits", "outputs": [
    {"name": "features", "datatype": "FP64", "shape": [1, 120_000],
     "data": [random.Random(3).uniform(-1, 1) for _ in range(120_000)]}]})


async def big_answers(request: web.Request) -> web.StreamResponse:
    if request.path == "/v1/embeddings":
        return web.Response(body=EMBEDDINGS, content_type="application/json")
    if request.path == "/blob":
        return web.Response(body=BLOB, content_type="application/octet-stream")
    if request.path.endswith("/infer"):
        return web.Response(body=V2_BIG, content_type="application/json")
    return web.json_response({"ok": True})


def raw_model(url: str, **backend) -> dict:
    return {"backend": {"type": "http", "protocol": "raw", "upstreams": [url], "paths": ["/blob", "/small"],
                        **backend}}


@pytest.fixture
async def gateway(tmp_path, keys):
    up = await start_upstream(big_answers)
    gw = await start_gateway(tmp_path, keys, policy=ALLOW_ANALYSTS, models={
        "emb": openai_model(up.url), "blob": raw_model(up.url), "digits": v2_model(up.url)})
    yield gw
    await gw.stop()
    await up.stop()


async def test_large_answers_arrive_whole_and_byte_exact(gateway, keys) -> None:
    assert len(EMBEDDINGS) > 1_900_000 and len(V2_BIG) > 2 * MIB  # 64 x 1536 floats: ~2 MB
    async with aiohttp.ClientSession(headers=keys.auth()) as s:
        async with s.post(gateway.url + "/v1/embeddings", json={"model": "emb", "input": ["x"] * 64}) as r:
            assert r.status == 200
            assert await asyncio.wait_for(r.read(), 15) == EMBEDDINGS
        async with s.post(gateway.url + "/blob", data=b"{}") as r:
            assert r.status == 200
            body = await asyncio.wait_for(r.read(), 15)
            assert len(body) == len(BLOB) and hashlib.sha256(body).digest() == hashlib.sha256(BLOB).digest()
        async with s.post(gateway.url + "/v2/models/digits/infer",
                          json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [0.5]}]}) as r:
            assert r.status == 200
            assert await asyncio.wait_for(r.read(), 15) == V2_BIG


async def test_two_large_answers_at_once_leave_room_for_a_third_caller(gateway, keys) -> None:
    async with aiohttp.ClientSession(headers=keys.auth()) as s:
        async def large() -> bytes:
            async with s.post(gateway.url + "/blob", data=b"{}") as r:
                assert r.status == 200
                return await r.read()

        async def small() -> int:
            async with s.post(gateway.url + "/small", data=b"{}") as r:
                await r.read()
                return r.status

        results = await asyncio.wait_for(asyncio.gather(large(), large(), small()), 30)
    assert results[0] == BLOB and results[1] == BLOB and results[2] == 200


async def test_an_answer_over_max_response_bytes_is_502(tmp_path, keys) -> None:
    async with (harness.upstream(big_answers) as up,
                harness.gateway(tmp_path, keys, policy=ALLOW_ANALYSTS, models={
           "blob": raw_model(up.url, max_response_bytes=100_000)}) as gw):
        async with aiohttp.ClientSession(headers=keys.auth()) as s:
            async with s.post(gw.url + "/blob", data=b"{}") as r:
                assert r.status == 502
                error = (await r.json())["error"]
                assert error["type"] == "backend_error" and "too large" in error["message"]
            async with s.post(gw.url + "/small", data=b"{}") as r:  # small answers still pass
                assert r.status == 200


@pytest.mark.parametrize("declared", [True, False])
async def test_64_mib_plus_one_under_the_default_cap_is_502(tmp_path, keys, declared: bool) -> None:
    """The real default (64 MiB): one byte over, declared up front or counted as a chunked body arrives."""
    piece = b"\x00" * MIB
    total = 64 * MIB + 1

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if declared:
            response.content_length = total
        await response.prepare(request)
        try:
            for _ in range(64):
                await response.write(piece)
            await response.write(b"\x01")
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the gateway hung up, as it should
        return response

    async with (harness.upstream(huge) as up,
                harness.gateway(tmp_path, keys, policy=ALLOW_ANALYSTS, models={"blob": raw_model(up.url)}) as gw):
        async with aiohttp.ClientSession(headers=keys.auth()) as s:
            async with s.post(gw.url + "/blob", data=b"{}") as r:
                assert r.status == 502
                error = (await r.json())["error"]
                assert error["type"] == "backend_error" and error["message"] == "upstream answer too large"
        backend = gw.gateway.backends["blob"]
        assert backend._client._open == 0  # the connection with the rest of the body was dropped, not pooled


async def test_a_body_that_trickles_past_the_timeout_is_504() -> None:
    """Never silent for timeout_s, never finished: the whole-body deadline ends it."""
    server = RawServer(trickle(read_request_head, 500))
    started = time.monotonic()
    async with running([await server.start()], server, timeout_s=0.5) as (backend, _):
        with pytest.raises(BackendTimeout):
            await backend.handle(make_ctx(RouteKind.V2_INFER, "/v2/models/digits/infer", json={}))
        assert time.monotonic() - started < 3


async def test_a_stream_longer_than_max_stream_s_ends_cleanly(tmp_path, keys) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(200):
                await response.write(b"data: {\"n\": %d}\n\n" % i)
                await asyncio.sleep(0.05)  # the thing under test: a long, paced stream
        except (ConnectionError, RuntimeError):
            pass
        return response

    async with (harness.upstream(endless) as up,
                harness.gateway(tmp_path, keys, policy=ALLOW_ANALYSTS, models={
           "emb": openai_model(up.url, max_stream_s=0.6)}) as gw):
        async with aiohttp.ClientSession(headers=keys.auth()) as s:
            started = time.monotonic()
            async with s.post(gw.url + "/v1/chat/completions",
                              json={"model": "emb", "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}]}) as r:
                assert r.status == 200, await r.text()
                body = await asyncio.wait_for(r.read(), 10)  # a clean end: no payload error
            elapsed = time.monotonic() - started
        assert 0.5 < elapsed < 5
        assert body.startswith(b'data: {"n": 0}\n\n') and body.count(b"data:") >= 3
        await eventually(lambda: gw.gateway.backends["emb"]._client._open == 0)  # the upstream connection was discarded
