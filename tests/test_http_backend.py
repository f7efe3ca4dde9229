"""The http backend against real upstream servers on loopback: forwarding, errors, config."""

from __future__ import annotations

import asyncio
import gzip
import time

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict
from tests.harness import start_upstream
from tests.http_helpers import make_backend, make_ctx
from tests.upstreams import config_error_line, http_config, infer_failure, running, writes_then_hangs_up

from gateway.errors import BackendError, BackendTimeout, InvalidRequest, Unavailable
from gateway.metrics import Metrics
from gateway.pipeline import RouteKind

INFER = "/v2/models/digits/infer"


@pytest.fixture
async def upstream():
    up = await start_upstream()
    yield up
    await up.stop()


# -- configuration ---------------------------------------------------------------


def test_config_builds_with_defaults() -> None:
    config = http_config("type: http\nprotocol: openai\nupstreams: [http://127.0.0.1:8000]\n")
    assert config.retries == 1 and config.eject_after_failures == 3 and config.timeout_s is None
    assert config.tls_verify is True and config.headers == {}


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("type: http\nprotocol: v2\nupstreams: []\n", "models.m.backend.upstreams", "at least one"),
        ("type: http\nprotocol: v2\nupstreams: [ftp://x]\n", "models.m.backend.upstreams[0]", "http:// or https://"),
        ("type: http\nprotocol: v2\nupstreams: ['http://u:p@x']\n", "upstreams[0]", "credentials"),
        ("type: http\nprotocol: v2\nupstreams: ['http://x?a=1']\n", "upstreams[0]", "query"),
        ("type: http\nprotocol: raw\nupstreams: [http://x]\n", "models.m.backend.paths", "at least one path"),
        ("type: http\nprotocol: raw\nupstreams: [http://x]\npaths: [predict]\n", "paths[0]", "absolute path"),
        ("type: http\nprotocol: v2\nupstreams: [http://x]\npaths: [/p]\n", "paths", "only for protocol raw"),
        ("type: http\nprotocol: v2\nupstreams: [http://x]\nretries: -1\n", "retries", "negative"),
        ("type: http\nprotocol: v2\nupstreams: [http://x]\ntimeout_s: 0\n", "timeout_s", "positive"),
        ("type: http\nprotocol: v2\nupstreams: [http://x]\nhealth_path: health\n", "health_path", "absolute"),
        ("type: http\nprotocol: grpc\nupstreams: [http://x]\n", "protocol", "one of"),
        ("type: http\nprotocol: v2\nupstreams: [http://x]\ntimeout: 3\n", "timeout", "did you mean 'timeout_s'"),
        ("type: http\nprotocol: v2\nupstreams: [http://x, http://x/]\n", "upstreams", "twice"),
        ("type: http\nprotocol: v2\nupstreams: [http://x]\nheaders: {'Bad Name': v}\n", "headers", "header name"),
        ("type: http\nprotocol: v2\nupstreams: [http://x]\ntls_ca_file: missing.pem\n", "tls_ca_file", "not found"),
    ],
)
def test_config_mistakes_are_one_line_errors(text: str, where: str, message: str) -> None:
    line = config_error_line(text)
    assert line.startswith("gw.yaml:")
    assert where in line and message in line


def test_backend_contract_methods() -> None:
    raw = make_backend(["http://127.0.0.1:1"], protocol="raw", paths=["/predict"])
    assert raw.protocol() == "raw" and raw.raw_paths() == ["/predict"]
    v2 = make_backend(["http://127.0.0.1:1"])
    assert v2.protocol() == "v2" and v2.raw_paths() == []
    assert not v2.ready()  # not started


async def test_not_started_is_unavailable() -> None:
    backend = make_backend(["http://127.0.0.1:1"])
    with pytest.raises(Unavailable):
        await backend.handle(make_ctx(RouteKind.V2_INFER, INFER, json={}))


# -- forwarding per protocol -------------------------------------------------------


async def test_v2_infer_forwards_path_query_and_validated_body() -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"target": request.raw_path, "outputs": []})

    upstream = await start_upstream(echo)
    async with running([upstream.url], upstream) as (backend, _):
        ctx = make_ctx(RouteKind.V2_INFER, INFER, query="trace=1&x=%2A%26", body=b'{"inputs": [ ]}',
                       headers=[("Content-Type", "application/json")])
        response = await backend.handle(ctx)
    seen = upstream.seen[-1]
    assert (seen.method, seen.path) == ("POST", INFER)
    assert seen.body == b'{"inputs": [ ]}'  # the validated bytes, as received: never re-serialised
    assert seen.headers["Content-Type"] == "application/json"
    assert response.status == 200 and response.stream is None
    assert orjson.loads(response.body)["target"] == INFER + "?trace=1&x=%2A%26"  # query bytes as sent
    assert response.content_type.startswith("application/json")
    assert "Content-Type" not in response.headers and "Content-Length" not in response.headers


async def test_an_identity_header_that_would_split_the_request_is_400_and_nothing_is_sent(upstream) -> None:
    async with running([upstream.url]) as (backend, _):
        ctx = make_ctx(RouteKind.V2_INFER, INFER, body=b"{}", subject="alice\r\nX-Maas-Roles: admin")
        with pytest.raises(InvalidRequest, match="control character"):
            await backend.handle(ctx)
        assert backend.upstreams[0].in_rotation and backend.upstreams[0].failures == 0  # no verdict on it
    assert upstream.seen == []


async def test_body_is_forwarded_as_received(upstream) -> None:
    async with running([upstream.url]) as (backend, _):
        await backend.handle(make_ctx(RouteKind.V2_INFER, INFER, body=b'{"inputs":[1]}'))
    assert upstream.seen[-1].body == b'{"inputs":[1]}'


@pytest.mark.parametrize(("kind", "path"), [(RouteKind.V2_METADATA, "/v2/models/digits"),
                                            (RouteKind.V2_READY, "/v2/models/digits/ready")])
async def test_v2_reads_are_gets_on_the_same_path(upstream, kind: RouteKind, path: str) -> None:
    async with running([upstream.url]) as (backend, _):
        response = await backend.handle(make_ctx(kind, path))
    seen = upstream.seen[-1]
    assert (seen.method, seen.path, seen.body) == ("GET", path, b"")
    assert "Content-Length" not in seen.headers or seen.headers["Content-Length"] == "0"
    assert response.status == 200


async def test_v2_model_name_rewrites_the_path_segment(upstream) -> None:
    async with running([upstream.url], model_name="digits-v3") as (backend, _):
        await backend.handle(make_ctx(RouteKind.V2_INFER, INFER, json={"inputs": []}))
        await backend.handle(make_ctx(RouteKind.V2_METADATA, "/v2/models/digits"))
    assert [s.path for s in upstream.seen] == ["/v2/models/digits-v3/infer", "/v2/models/digits-v3"]


async def test_openai_forwards_same_path_and_reads_usage(upstream) -> None:
    request = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    async with running([upstream.url], protocol="openai", name="chat") as (backend, _):
        ctx = make_ctx(RouteKind.OPENAI, "/v1/chat/completions", model="chat", json=request)
        response = await backend.handle(ctx)
    seen = upstream.seen[-1]
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert orjson.loads(seen.body) == request  # untouched: no rewrite needed
    assert response.status == 200 and response.stream is None
    assert response.usage is not None and (response.usage.total_tokens, response.usage.answered) == (6, True)


async def test_openai_model_name_rewrites_the_body(upstream) -> None:
    async with running([upstream.url], protocol="openai", name="chat", model_name="meta-llama/Llama-3-8B") as (backend, _):
        await backend.handle(make_ctx(RouteKind.OPENAI, "/v1/chat/completions", model="chat",
                                      json={"model": "chat", "messages": []}))
    assert orjson.loads(upstream.seen[-1].body) == {"model": "meta-llama/Llama-3-8B", "messages": []}


async def test_openai_usage_absent_or_garbage_leaves_none() -> None:
    async def odd(request: web.Request) -> web.Response:
        return web.Response(body=b'{"usage": "lots"', content_type="application/json")

    up = await start_upstream(odd)
    async with running([up.url], up, protocol="openai") as (backend, _):
        ctx = make_ctx(RouteKind.OPENAI, "/v1/completions", json={"model": "m", "prompt": "x"})
        response = await backend.handle(ctx)
    assert response.body == b'{"usage": "lots"' and response.usage is not None and response.usage.total_tokens is None


async def test_raw_forwards_path_and_query_as_is(upstream) -> None:
    async with running([upstream.url], protocol="raw", paths=["/predict"], name="legacy") as (backend, _):
        response = await backend.handle(make_ctx(RouteKind.RAW, "/predict", model="legacy", query="v=2&q=a%20b",
                                                 body=b"\x00\x01binary"))
    seen = upstream.seen[-1]
    assert (seen.path, seen.query, seen.body) == ("/predict", "v=2&q=a b", b"\x00\x01binary")
    assert "Content-Type" not in seen.headers  # no made-up content type
    assert orjson.loads(response.body)["path"] == "/predict"


async def test_upstream_base_path_prefix_is_kept() -> None:
    up = await start_upstream()
    async with running([up.url + "/serving/"], up) as (backend, _):
        await backend.handle(make_ctx(RouteKind.V2_INFER, INFER, json={}))
    assert up.seen[-1].path == "/serving" + INFER


# -- answers -----------------------------------------------------------------------


async def test_upstream_5xx_is_passed_through_and_counted() -> None:
    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": "model crashed"}, status=503, headers={"Retry-After": "3"})

    up = await start_upstream(broken)
    metrics = Metrics()
    async with running([up.url], up, metrics=metrics, eject_after_failures=5) as (backend, _):
        response = await backend.handle(make_ctx(RouteKind.V2_INFER, INFER, json={}))
    assert response.status == 503 and orjson.loads(response.body) == {"error": "model crashed"}
    assert ("Retry-After", "3") in response.headers
    assert metrics.registry.get_sample_value(
        "maas_upstream_requests_total", {"model": "digits", "upstream": up.url, "outcome": "5xx"}) == 1
    assert backend.upstreams[0].failures == 1


async def test_response_headers_lose_hop_by_hop_and_keep_repeated_ones() -> None:
    async def handler(request: web.Request) -> web.Response:
        response = web.Response(text="ok", headers={"Connection": "keep-alive, X-Hop", "X-Hop": "1",
                                                    "Keep-Alive": "timeout=5", "X-Model-Version": "7",
                                                    "X-Request-ID": "upstream-id"})
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    up = await start_upstream(handler)
    async with running([up.url], up) as (backend, _):
        response = await backend.handle(make_ctx(RouteKind.V2_INFER, INFER, json={}))
    headers = CIMultiDict(response.headers)
    for gone in ("Connection", "X-Hop", "Keep-Alive", "Content-Length", "Transfer-Encoding", "X-Request-ID"):
        assert gone not in headers, gone
    assert headers["X-Model-Version"] == "7"
    assert headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert response.content_type.startswith("text/plain")


async def test_upstream_cookies_never_reach_another_request() -> None:
    async def handler(request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.set_cookie("session", "user-one-secret")
        return response

    up = await start_upstream(handler)
    async with running([up.url], up) as (backend, _):
        await backend.handle(make_ctx(RouteKind.V2_INFER, INFER, json={}, subject="one"))
        await backend.handle(make_ctx(RouteKind.V2_INFER, INFER, json={}, subject="two"))
    assert "Cookie" not in up.seen[1].headers


async def test_client_accept_encoding_never_reaches_upstream() -> None:
    """Attack: ask for gzip so the answer passes the harden stage compressed (and un-hardened)."""
    payload = gzip.compress(b'{"outputs": []}')

    async def handler(request: web.Request) -> web.Response:
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=payload, headers={"Content-Encoding": "gzip"}, content_type="application/json")
        return web.json_response({"outputs": []})

    up = await start_upstream(handler)
    async with running([up.url], up) as (backend, _):
        packed = await backend.handle(make_ctx(RouteKind.V2_INFER, INFER, json={},
                                               headers=[("Accept-Encoding", "gzip")]))
    assert "Accept-Encoding" not in up.seen[0].headers
    assert packed.body == b'{"outputs": []}' and "Content-Encoding" not in packed.headers


# -- failures ----------------------------------------------------------------------


async def test_closed_port_is_502_without_internal_names() -> None:
    from tests.harness import free_port

    url = f"http://127.0.0.1:{free_port()}"
    async with running([url], retries=0) as (backend, _):
        with pytest.raises(BackendError) as info:
            await backend.handle(make_ctx(RouteKind.V2_INFER, INFER, json={}))
    assert info.value.status == 502 and info.value.message == "upstream connection failed"
    assert "127.0.0.1" not in str(info.value)


async def test_upstream_closing_mid_headers_is_502() -> None:
    error = await infer_failure(writes_then_hangs_up(b"HTTP/1.1 200 OK\r\nContent-"), BackendError, retries=0)
    assert error.status == 502


async def test_invalid_http_from_upstream_is_502() -> None:
    error = await infer_failure(writes_then_hangs_up(b"SURPRISE\r\n\r\nnot http at all"), BackendError, retries=0)
    assert error.message == "upstream sent an invalid response"


async def test_body_cut_short_is_502() -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"outp"
    await infer_failure(writes_then_hangs_up(cut), BackendError, retries=0)


async def test_slow_upstream_is_504() -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await asyncio.wait_for(release.wait(), 5)
        return web.Response(text="late")

    up = await start_upstream(slow)
    metrics = Metrics()
    backend = make_backend([up.url], timeout_s=0.3, metrics=metrics)
    await backend.start()
    started = time.monotonic()
    try:
        with pytest.raises(BackendTimeout) as info:
            await backend.handle(make_ctx(RouteKind.V2_INFER, INFER, json={}))
    finally:
        release.set()
        await backend.close()
        await up.stop()
    assert info.value.status == 504
    assert 0.25 <= time.monotonic() - started < 3
    assert metrics.registry.get_sample_value(
        "maas_upstream_requests_total", {"model": "digits", "upstream": up.url, "outcome": "timeout"}) == 1


async def test_upstream_stalling_mid_body_is_504() -> None:
    stall = writes_then_hangs_up(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", linger_s=3)
    await infer_failure(stall, BackendTimeout, timeout_s=0.3)


async def test_timeout_defaults_to_the_server_setting(upstream) -> None:
    backend = make_backend([upstream.url])
    assert backend._timeout_s == 5  # ServerConfig(upstream_timeout_s=5) in make_backend
    assert make_backend([upstream.url], timeout_s=0.5)._timeout_s == 0.5
