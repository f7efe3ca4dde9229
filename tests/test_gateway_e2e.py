"""The gateway core end to end: real sockets, a real upstream, the real server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.harness import ALLOW_ANALYSTS, Keys, gateway, raw_http, upstream, v2_model
from tests.harness import error_fields

V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}]}


@pytest.fixture
async def setup(tmp_path: Path, keys: Keys):
    async with upstream() as up, gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                                         server={"max_body_bytes": 4096}) as gw, aiohttp.ClientSession() as session:
        yield gw, up, session


def assert_error_shape(body: dict, error_type: str) -> None:
    error = error_fields(body)  # flat on /v2/..., nested elsewhere
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["request_id"], str) and error["request_id"]


async def test_forwards_with_identity_and_request_id(setup, keys: Keys) -> None:
    gw, up, s = setup
    r = await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers={**keys.auth("alice"), "X-Request-ID": "abc-123"})
    assert r.status == 200
    assert r.headers["X-Request-ID"] == "abc-123"
    seen = up.seen[-1]
    assert seen.path == "/v2/models/digits/infer"
    assert json.loads(seen.body) == V2_BODY
    assert seen.headers["X-Maas-Subject"] == "alice"
    assert seen.headers["X-Request-ID"] == "abc-123"
    assert "Authorization" not in seen.headers


@pytest.mark.parametrize("bad_id", ["a" * 129, "bad id", "x\u00e9", "semi;colon", ""])
async def test_unsafe_request_id_replaced(setup, keys: Keys, bad_id: str) -> None:
    gw, up, s = setup
    r = await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers={**keys.auth(), "X-Request-ID": bad_id})
    assert r.status == 200
    assert r.headers["X-Request-ID"] != bad_id and 1 <= len(r.headers["X-Request-ID"]) <= 128


async def test_unauthenticated_gets_401_even_for_unknown_routes(setup) -> None:
    gw, up, s = setup
    for path in ("/v2/models/digits/infer", "/v2/models/secret-model/infer", "/admin", "/v1/models"):
        r = await s.post(gw.url + path, json={})
        assert r.status == 401, path
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert_error_shape(await r.json(), "unauthenticated")
    assert up.seen == []


async def test_unknown_model_and_route_are_404_after_auth(setup, keys: Keys) -> None:
    gw, up, s = setup
    r = await s.post(gw.url + "/v2/models/nope/infer", json=V2_BODY, headers=keys.auth())
    assert r.status == 404
    assert_error_shape(await r.json(), "not_found")
    r = await s.get(gw.url + "/etc/passwd", headers=keys.auth())
    assert r.status == 404
    assert up.seen == []


@pytest.mark.parametrize("path", [
    "/v2//models/digits/infer",
    "/v2/models/x/../digits/infer",
    "/v2/models/%64igits/infer",
    "/v2/./models/digits/infer",
    "/v2/models/%2e%2e/models/digits/infer",
])
async def test_path_confusion_normalised_to_the_same_model(setup, keys: Keys, path: str) -> None:
    gw, up, s = setup
    r = await s.post(gw.url + path, json=V2_BODY, headers=keys.auth(), skip_auto_headers=())
    # aiohttp's client would re-normalise: send the raw target ourselves
    port = int(gw.url.rsplit(":", 1)[1])
    body = json.dumps(V2_BODY).encode()
    raw = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {keys.auth()['Authorization']}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    answer = await raw_http(port, raw)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert up.seen[-1].path == "/v2/models/digits/infer"
    assert r.status == 200


@pytest.mark.parametrize("path", [
    "/v2/models/dig%2Fits/infer",
    "/v2/models/digits%2finfer",
    "/v2/models/digits%5Cinfer",
    "/v2/models/digits%00/infer",
    "/v2/models/digits%0d%0a/infer",
])
async def test_ambiguous_paths_refused_with_400(setup, keys: Keys, path: str) -> None:
    gw, up, s = setup
    port = int(gw.url.rsplit(":", 1)[1])
    raw = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {keys.auth()['Authorization']}\r\n"
           f"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}").encode()
    answer = await raw_http(port, raw)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"invalid_request"' in answer
    assert up.seen == []


async def test_absolute_form_and_spoofed_host_do_not_choose_the_model(setup, keys: Keys) -> None:
    gw, up, s = setup
    port = int(gw.url.rsplit(":", 1)[1])
    body = json.dumps(V2_BODY).encode()
    raw = (f"POST http://other-host/v2/models/nope/infer HTTP/1.1\r\nHost: evil\r\n"
           f"Authorization: {keys.auth()['Authorization']}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    answer = await raw_http(port, raw)
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    raw = raw.replace(b"http://other-host/v2/models/nope/infer", b"/v2/models/digits/infer")
    answer = await raw_http(port, raw)
    assert answer.startswith(b"HTTP/1.1 200")
    assert up.seen[-1].path == "/v2/models/digits/infer"


async def test_duplicate_authorization_header_refused(setup, keys: Keys) -> None:
    gw, up, s = setup
    port = int(gw.url.rsplit(":", 1)[1])
    good = keys.auth()["Authorization"]
    raw = (f"GET /v2/models/digits HTTP/1.1\r\nHost: x\r\nAuthorization: {good}\r\nAuthorization: Bearer junk\r\n"
           f"Connection: close\r\n\r\n").encode()
    answer = await raw_http(port, raw)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert up.seen == []


async def test_duplicate_content_length_refused(setup, keys: Keys) -> None:
    gw, up, s = setup
    port = int(gw.url.rsplit(":", 1)[1])
    raw = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nAuthorization: {keys.auth()['Authorization']}\r\n"
           f"Content-Type: application/json\r\nContent-Length: 2\r\nContent-Length: 40\r\nConnection: close\r\n\r\n{{}}").encode()
    answer = await raw_http(port, raw)
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]
    assert b'"error"' in answer
    assert up.seen == []


async def test_declared_oversized_body_refused_before_reading(setup, keys: Keys) -> None:
    gw, up, s = setup
    port = int(gw.url.rsplit(":", 1)[1])
    # declares 10 MB but sends nothing: the answer must come at once, not after a read timeout
    raw = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nAuthorization: {keys.auth()['Authorization']}\r\n"
           f"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n").encode()
    answer = await asyncio.wait_for(raw_http(port, raw, timeout=3), 5)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"payload_too_large"' in answer


async def test_chunked_oversized_body_cut_off(setup, keys: Keys) -> None:
    gw, up, s = setup

    async def chunks():
        for _ in range(100):
            yield b" " * 1024

    r = await s.post(gw.url + "/v2/models/digits/infer", data=chunks(),
                     headers={**keys.auth(), "Content-Type": "application/json"})
    assert r.status == 413
    assert_error_shape(await r.json(), "payload_too_large")
    assert up.seen == []


async def test_lying_content_length_times_out_cleanly(tmp_path: Path, keys: Keys) -> None:
    async with upstream() as up, gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS,
                                         server={"body_timeout_s": 0.5}) as gw:
        port = int(gw.url.rsplit(":", 1)[1])
        raw = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nAuthorization: {keys.auth()['Authorization']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"inputs\":").encode()
        answer = await asyncio.wait_for(raw_http(port, raw, timeout=5), 8)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"request_timeout"' in answer
        assert up.seen == []


async def test_malformed_http_gets_json_error(setup) -> None:
    gw, up, s = setup
    port = int(gw.url.rsplit(":", 1)[1])
    answer = await raw_http(port, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]
    assert b'"invalid_request"' in answer


async def test_health_and_ready_on_admin_port(setup) -> None:
    gw, up, s = setup
    assert (await s.get(gw.admin_url + "/healthz")).status == 200
    r = await s.get(gw.admin_url + "/readyz")
    assert r.status == 200, await r.text()
    metrics = await (await s.get(gw.admin_url + "/metrics")).text()
    assert "maas_requests_total" in metrics
    # the admin routes are not on the public port
    assert (await s.get(gw.url + "/metrics")).status == 401


async def test_audit_line_per_request_without_secrets(setup, keys: Keys, tmp_path: Path) -> None:
    gw, up, s = setup
    token = keys.token("alice")
    await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers={"Authorization": f"Bearer {token}"})
    await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY)
    gw.gateway.audit.flush()
    text = (tmp_path / "audit.log").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["status"] for line in lines[-2:]] == [200, 401]
    first = lines[-2]
    assert list(first) == ["ts", "request_id", "subject", "roles", "model", "action", "decision", "rule", "quota",
                           "status", "latency_ms", "client", "bytes_in", "bytes_out", "monitors", "seq", "prev"]
    assert first["subject"] == "alice" and first["decision"] == "allow" and first["model"] == "digits"
    assert token not in text and "1.0, 2.0" not in text


async def test_upstream_errors_map_to_502_and_504(tmp_path: Path, keys: Keys) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)  # a real upstream slower than the gateway's real timeout
        return web.json_response({})

    async with upstream(slow) as up, gateway(tmp_path, keys, policy=ALLOW_ANALYSTS,
                                             models={"slow": v2_model(up.url, timeout_s=0.3),
                                                     "dead": v2_model("http://127.0.0.1:9", retries=0)}) as gw:
        async with aiohttp.ClientSession() as s:
            r = await s.post(gw.url + "/v2/models/slow/infer", json=V2_BODY, headers=keys.auth())
            assert r.status == 504
            assert_error_shape(await r.json(), "backend_timeout")
            r = await s.post(gw.url + "/v2/models/dead/infer", json=V2_BODY, headers=keys.auth())
            assert r.status in (502, 503)
            assert_error_shape(await r.json(), "backend_error" if r.status == 502 else "unavailable")


async def test_an_upstream_cannot_set_the_request_id_or_a_second_content_type(tmp_path: Path, keys: Keys) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=b'{"outputs": []}', content_type="application/json",
                            headers={"X-Request-ID": "upstream-id", "X-Model-Version": "7"})

    async with upstream(answer) as up, gateway(tmp_path, keys, models={"digits": v2_model(up.url)},
                                               policy=ALLOW_ANALYSTS) as gw:
        async with aiohttp.ClientSession() as s:
            r = await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY,
                             headers={**keys.auth("alice"), "X-Request-ID": "abc-123"})
            assert r.status == 200
            assert r.headers.getall("X-Request-ID") == ["abc-123"]
            assert r.headers.getall("Content-Type") == ["application/json"]
            assert r.headers["X-Model-Version"] == "7"


async def test_an_upstream_cannot_set_the_gateways_rate_limit_headers(tmp_path: Path, keys: Keys) -> None:
    """The gateway's RateLimit-* replace an upstream's of the same name, whatever its spelling; others pass."""
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=b'{"outputs": []}', content_type="application/json",
                            headers={"RateLimit-Remaining": "999999", "ratelimit-limit": "999999",
                                     "X-Model-Version": "7"})

    policy = {**ALLOW_ANALYSTS, "quotas": [{"roles": ["*"], "models": ["*"], "rate_per_s": 100, "burst": 50}]}
    async with upstream(answer) as up, gateway(tmp_path, keys, models={"digits": v2_model(up.url)},
                                               policy=policy, quota={"store": "memory"}) as gw:
        async with aiohttp.ClientSession() as s:
            for _ in range(2):  # the second answer takes the remembered set of replaced names
                r = await s.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers=keys.auth("alice"))
                assert r.status == 200
                assert r.headers.getall("RateLimit-Limit") == ["50"]
                assert r.headers.getall("RateLimit-Remaining") != ["999999"]
                assert len(r.headers.getall("RateLimit-Remaining")) == 1
                assert r.headers["X-Model-Version"] == "7"
