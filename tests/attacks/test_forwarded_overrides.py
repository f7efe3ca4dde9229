"""Attacks through headers and methods that make an upstream see another path, method or client.

Frameworks behind a gateway honour ``X-Original-URL`` (another path),
``X-HTTP-Method-Override`` (another method) or ``X-Real-IP`` (another
client): forwarded, they undo what the gateway authorised. ``TRACE`` echoes
the request back, headers included, so on a raw path it would hand the caller
the secret header the backend is configured to add. The upstreams here record
every method and header they receive.
"""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp import web
from tests import harness
from tests.harness import ALLOW_ANALYSTS, raw_http, start_gateway, start_upstream, v2_model
from tests.harness import error_fields
from tests.http_helpers import make_ctx
from tests.upstreams import running

from gateway.errors import MethodNotAllowed
from gateway.pipeline import RouteKind

SECRET = "upstream-secret-7f3a9c"
OVERRIDES = [
    ("X-Original-URL", "/admin/delete"),
    ("X-Rewrite-URL", "/admin/delete"),
    ("X-HTTP-Method", "DELETE"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("X-Method-Override", "PUT"),
    ("X-Real-IP", "10.0.0.1"),
    ("True-Client-IP", "10.0.0.1"),
    ("X-Client-IP", "10.0.0.1"),
    ("CF-Connecting-IP", "10.0.0.1"),
    ("X-Cluster-Client-IP", "10.0.0.1"),
    ("Forwarded", "for=10.0.0.1;host=internal;proto=https"),
    ("X-Forwarded-Host", "internal.example"),
    ("X-Forwarded-Port", "8443"),
]
OVERRIDE_NAMES = {name.lower() for name, _ in OVERRIDES}


async def echo(request: web.Request) -> web.Response:
    """What a TRACE handler does: the request, headers included, sent back."""
    lines = [f"{request.method} {request.raw_path}"] + [f"{k}: {v}" for k, v in request.headers.items()]
    return web.Response(text="\n".join(lines), content_type="message/http")


def raw_model(url: str, **backend) -> dict:
    return {"backend": {"type": "http", "protocol": "raw", "upstreams": [url], "paths": ["/predict"],
                        "headers": {"X-Upstream-Secret": SECRET}, **backend}}


@pytest.fixture
async def setup(tmp_path, keys):
    up = await start_upstream(echo)
    gw = await start_gateway(tmp_path, keys, policy=ALLOW_ANALYSTS, models={
        "legacy": raw_model(up.url),
        "crud": {"backend": {"type": "http", "protocol": "raw", "upstreams": [up.url], "paths": ["/items/*"],
                             "methods": ["POST", "PUT", "GET"]}},
        "digits": v2_model(up.url),
    })
    yield gw, up
    await gw.stop()
    await up.stop()


@pytest.mark.parametrize("path", ["/predict", "/v2/models/digits/infer"])
async def test_override_headers_never_reach_the_upstream(setup, keys, path: str) -> None:
    gw, up = setup
    # each header in several spellings: the drop is case-insensitive
    sent = OVERRIDES + [(n.upper(), v) for n, v in OVERRIDES] + [(n.lower(), v) for n, v in OVERRIDES]
    headers = [*keys.auth().items(), ("Content-Type", "application/json"), *sent]
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + path, data=body, headers=headers) as r:
            assert r.status == 200
            echoed = await r.text()
    seen = up.seen[-1]
    assert seen.method == "POST" and seen.path == path
    received = {name.lower() for name, _ in seen.all_headers}
    assert not received & OVERRIDE_NAMES, received & OVERRIDE_NAMES
    assert "/admin/delete" not in echoed and "10.0.0.1" not in echoed and "internal" not in echoed
    # the gateway's own forwarding headers still arrive, once, with its values
    assert [v for n, v in seen.all_headers if n.lower() == "x-forwarded-for"] == ["127.0.0.1"]
    assert [v for n, v in seen.all_headers if n.lower() == "x-forwarded-proto"] == ["http"]


@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
@pytest.mark.parametrize("path", ["/predict", "/items/1", "/v2/models/digits/infer", "/v1/chat/completions"])
async def test_trace_and_track_are_never_forwarded(setup, keys, method: str, path: str) -> None:
    gw, up = setup
    async with aiohttp.ClientSession() as s:
        async with s.request(method, gw.url + path, headers=keys.auth()) as r:
            text = await r.text()
            if method == "TRACK":  # not a method llhttp knows: aiohttp's parser refuses it as malformed, 400
                assert r.status in (400, 405), text
            else:
                assert r.status == 405, text
                assert error_fields(text)["type"] == "method_not_allowed"
    assert SECRET not in text
    assert up.seen == []


async def test_trace_without_credentials_is_401_and_reaches_nothing(setup) -> None:
    gw, up = setup
    async with aiohttp.ClientSession() as s:
        async with s.request("TRACE", gw.url + "/predict") as r:
            assert r.status == 401
            assert SECRET not in await r.text()
    assert up.seen == []


async def test_connect_is_never_forwarded(setup, keys) -> None:
    gw, up = setup
    port = int(gw.url.rsplit(":", 1)[1])
    auth = keys.auth()["Authorization"]
    for target in (f"127.0.0.1:{port}", "/predict"):
        answer = await raw_http(port, f"CONNECT {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                                      f"Content-Length: 0\r\n\r\n".encode())
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500 and status != 401, answer[:200]
        assert SECRET.encode() not in answer
    assert up.seen == []


async def test_raw_paths_forward_only_their_methods(setup, keys) -> None:
    gw, up = setup
    async with aiohttp.ClientSession(headers=keys.auth()) as s:
        for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
            async with s.request(method, gw.url + "/predict", data=b"{}") as r:  # legacy: POST only (default)
                assert r.status == 405, method
                assert error_fields(await r.text())["type"] == "method_not_allowed"
        assert up.seen == []
        async with s.post(gw.url + "/predict", data=b"{}") as r:
            assert r.status == 200
        for method in ("PUT", "GET", "POST"):  # crud: methods [POST, PUT, GET]
            async with s.request(method, gw.url + "/items/7", data=b"{}" if method != "GET" else None) as r:
                assert r.status == 200, method
        async with s.delete(gw.url + "/items/7") as r:
            assert r.status == 405
    assert [seen.method for seen in up.seen] == ["POST", "PUT", "GET", "POST"]


@pytest.mark.parametrize(("kind", "path", "method"), [
    (RouteKind.RAW, "/predict", "TRACE"),
    (RouteKind.RAW, "/predict", "GET"),
    (RouteKind.RAW, "/predict", "CONNECT"),
    (RouteKind.V2_INFER, "/v2/models/digits/infer", "TRACE"),
    (RouteKind.OPENAI, "/v1/chat/completions", "TRACK"),
])
async def test_the_backend_refuses_a_method_even_if_routing_let_it_through(kind, path: str, method: str) -> None:
    """Defence in depth: the http backend checks the method itself before anything is sent."""
    protocol = {RouteKind.RAW: "raw", RouteKind.V2_INFER: "v2", RouteKind.OPENAI: "openai"}[kind]
    options = {"paths": ["/predict"]} if protocol == "raw" else {}
    async with (harness.upstream(echo) as up,
                running([up.url], protocol=protocol, headers={"X-Upstream-Secret": SECRET}, **options) as (backend, _)):
        with pytest.raises(MethodNotAllowed):
            await backend.handle(make_ctx(kind, path, method=method, json={"model": "digits"}))
    assert up.seen == []
