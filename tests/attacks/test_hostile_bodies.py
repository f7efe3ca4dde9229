"""Hostile request bodies, end to end: each one gets its exact status and error type, and none reaches a model.

The gateway runs for real (harness), in front of a recording upstream; every
attack is sent over a real socket. After each refusal the upstream must have
seen nothing: a malformed body that reached a model is the failure we guard.
"""

from __future__ import annotations

import asyncio
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import ALLOW_ANALYSTS, Keys, openai_model, raw_http, start_gateway, start_upstream, v2_model
from tests.harness import error_fields

DIGITS_SCHEMA = {
    "type": "object",
    "properties": {"inputs": {"type": "array", "items": {
        "properties": {"data": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 16}}}}}},
}
GOOD_V2 = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 4], "data": [0.0, 1.5, 16, 3]}]}
GOOD_CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
MAX_BODY = 8 * 1024 * 1024  # large enough that the element limit, not the size limit, refuses the big array
TIMINGS: dict[str, float] = {}


@pytest.fixture
async def env(tmp_path: Path, keys: Keys):
    schema = tmp_path / "digits.json"
    schema.write_text(json.dumps(DIGITS_SCHEMA))
    up = await start_upstream()
    models: dict[str, Any] = {
        "digits": {**v2_model(up.url), "schema": str(schema),
                   "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 4]}]},
        "chat": {**openai_model(up.url), "max_tokens": 512},
    }
    gw = await start_gateway(tmp_path, keys, models=models, policy=ALLOW_ANALYSTS,
                             server={"max_body_bytes": MAX_BODY, "body_timeout_s": 1})
    async with aiohttp.ClientSession() as session:
        yield gw, up, session
    await gw.stop()
    await up.stop()


async def send(env: Any, keys: Keys, body: bytes, *, path: str = "/v2/models/digits/infer",
               content_type: str | None = "application/json") -> tuple[int, dict[str, Any]]:
    gw, up, session = env
    headers = keys.auth()
    if content_type is not None:
        headers["Content-Type"] = content_type
    async with session.post(gw.url + path, data=body, headers=headers,
                            skip_auto_headers=() if content_type else ("Content-Type",)) as r:
        return r.status, await r.json(content_type=None)


def assert_refused(status: int, body: dict[str, Any], want_status: int, want_type: str, up: Any) -> str:
    assert status == want_status, body
    error = error_fields(body)
    assert error["type"] == want_type and error["request_id"]
    assert up.seen == [], "a refused request reached the upstream"
    return str(error["message"])


async def test_valid_requests_pass_with_the_exact_bytes(env: Any, keys: Keys) -> None:
    gw, up, _ = env
    raw = b'{ "inputs" : [ {"datatype":"FP32", "name":"pixels", "shape":[2,4], "data":[0,1,2,3,4,5,6,7.5]} ] }'
    status, answer = await send(env, keys, raw)
    assert status == 200, answer
    assert up.seen[-1].body == raw  # the validated bytes, not a re-serialisation
    status, _ = await send(env, keys, json.dumps(GOOD_CHAT).encode(), path="/v1/chat/completions")
    assert status == 200 and up.seen[-1].body == json.dumps(GOOD_CHAT).encode()


async def test_deep_nesting_10000_levels(env: Any, keys: Keys) -> None:
    gw, up, _ = env
    body = b'{"inputs": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    tracemalloc.start()
    started = time.perf_counter()
    status, answer = await send(env, keys, body)
    TIMINGS["deep_nesting_10000"] = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    message = assert_refused(status, answer, 400, "invalid_request", up)
    assert "nesting deeper than 64" in message
    assert peak < 4 * 1024 * 1024, f"refusing a 20 KB body allocated {peak} bytes"
    print(f"\n10,000-level nesting refused in {TIMINGS['deep_nesting_10000'] * 1000:.1f} ms (end to end)")


async def test_million_element_array(env: Any, keys: Keys) -> None:
    gw, up, _ = env
    body = b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1000001], "data": [' + \
        b",".join([b"1.5"] * 1_000_001) + b"]}]}"
    tracemalloc.start()
    status, answer = await send(env, keys, body)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    message = assert_refused(status, answer, 400, "invalid_request", up)
    assert "more than 1000000 values" in message
    # The 4 MB body is held (a few copies at most); parsing it would add ~32 MB of floats.
    assert peak < 24 * 1024 * 1024, f"refusing a {len(body)} byte body allocated {peak} bytes"


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
async def test_non_finite_numbers(env: Any, keys: Keys, literal: bytes) -> None:
    gw, up, _ = env
    body = b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, %s, 3]}]}' % literal
    assert_refused(*await send(env, keys, body), 400, "invalid_request", up)


@pytest.mark.parametrize("body", [
    b'{"inputs": [{"name": "pixels", "datatype": "FP32", "datatype": "BYTES", "shape": [1, 4], "data": [0, 1, 2, 3]}]}',
    b'{"model": "chat", "model": "other", "messages": [{"role": "user", "content": "hi"}]}',
    b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 3],'
    b' "parameters": {"a": [1, {"x": 1, "x": 2}]}}]}',
])
async def test_duplicate_keys_nested(env: Any, keys: Keys, body: bytes) -> None:
    gw, up, _ = env
    path = "/v1/chat/completions" if b'"model"' in body else "/v2/models/digits/infer"
    message = assert_refused(*await send(env, keys, body, path=path), 400, "invalid_request", up)
    assert "duplicate key" in message


@pytest.mark.parametrize("body", [
    b'{"inputs": [{"name": "pix\xffels", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 3]}]}',
    b'{"inputs": [{"name": "\xed\xa0\x80", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 3]}]}',
    b'{"inputs": [{"name": "\\ud800", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 3]}]}',
])
async def test_bad_utf8_and_lone_surrogates(env: Any, keys: Keys, body: bytes) -> None:
    gw, up, _ = env
    assert_refused(*await send(env, keys, body), 400, "invalid_request", up)


@pytest.mark.parametrize("tail", [b"x", b'{"inputs": []}', b"\x00", b"]"])
async def test_trailing_garbage(env: Any, keys: Keys, tail: bytes) -> None:
    gw, up, _ = env
    assert_refused(*await send(env, keys, json.dumps(GOOD_V2).encode() + tail), 400, "invalid_request", up)


@pytest.mark.parametrize("tensor, fragment", [
    ({"name": "pixels", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2]}, "has 3 values but shape [1, 4] needs 4"),
    ({"name": "pixels", "datatype": "FP32", "shape": [2, 4], "data": [0, 1, 2, 3]}, "has 4 values but shape [2, 4] needs 8"),
    ({"name": "pixels", "datatype": "FP32", "shape": [1, 4], "data": [0, "1", 2, 3]}, "/inputs/0/data/1: must be FP32"),
    ({"name": "pixels", "datatype": "INT8", "shape": [1, 4], "data": [0, 1, 2, 3]}, "/inputs/0/datatype: must be FP32"),
    ({"name": "pixels", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 17]}, "/inputs/0/data/3: must be <= 16"),
    ({"name": "image", "datatype": "FP32", "shape": [1, 4], "data": [0, 1, 2, 3]}, "/inputs/0/name: the model has no input"),
])
async def test_v2_tensor_mismatches(env: Any, keys: Keys, tensor: dict[str, Any], fragment: str) -> None:
    gw, up, _ = env
    message = assert_refused(*await send(env, keys, json.dumps({"inputs": [tensor]}).encode()), 400, "invalid_request", up)
    assert fragment in message
    failures = gw.gateway.metrics.registry.get_sample_value
    assert sum(failures("maas_validation_failures_total", {"model": "digits", "reason": r}) or 0
               for r in ("v2_shape_mismatch", "v2_datatype", "v2_declared_datatype", "schema", "v2_undeclared_input")) == 1


async def test_duplicate_input_names(env: Any, keys: Keys) -> None:
    gw, up, _ = env
    tensor = GOOD_V2["inputs"][0]
    message = assert_refused(*await send(env, keys, json.dumps({"inputs": [tensor, tensor]}).encode()),
                             400, "invalid_request", up)
    assert "/inputs/1/name: duplicate input name 'pixels'" in message


@pytest.mark.parametrize("model", [["chat", "other"], {"name": "chat"}, 7, None])
async def test_model_that_is_not_one_string(env: Any, keys: Keys, model: Any) -> None:
    gw, up, _ = env
    body = json.dumps({**GOOD_CHAT, "model": model}).encode()
    assert_refused(*await send(env, keys, body, path="/v1/chat/completions"), 400, "invalid_request", up)


async def test_max_tokens_over_the_model_cap(env: Any, keys: Keys) -> None:
    gw, up, _ = env
    body = json.dumps({**GOOD_CHAT, "max_tokens": 513}).encode()
    message = assert_refused(*await send(env, keys, body, path="/v1/chat/completions"), 400, "invalid_request", up)
    assert "/max_tokens: must be at most 512" in message


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          "application/jsonx", "text/json"])
async def test_wrong_content_type(env: Any, keys: Keys, content_type: str) -> None:
    gw, up, _ = env
    status, answer = await send(env, keys, json.dumps(GOOD_V2).encode(), content_type=content_type)
    assert_refused(status, answer, 415, "unsupported_media_type", up)
    status, answer = await send(env, keys, json.dumps(GOOD_CHAT).encode(), path="/v1/chat/completions",
                                content_type=content_type)
    assert_refused(status, answer, 415, "unsupported_media_type", up)


async def test_missing_content_type(env: Any, keys: Keys) -> None:
    gw, up, _ = env
    status, answer = await send(env, keys, json.dumps(GOOD_CHAT).encode(), path="/v1/chat/completions", content_type=None)
    assert_refused(status, answer, 415, "unsupported_media_type", up)
    status, _ = await send(env, keys, json.dumps(GOOD_V2).encode(), content_type=None)  # stock Triton clients send none
    assert status == 200 and len(up.seen) == 1


def _port(gw: Any) -> int:
    return int(gw.url.rsplit(":", 1)[1])


def _status_and_body(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body[: _content_length(head)])


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return len(head)


async def test_content_length_larger_than_the_body(env: Any, keys: Keys) -> None:
    """The client promises more than it sends and hangs up: a 400 (or a closed socket), never a forwarded request."""
    gw, up, _ = env
    body = json.dumps(GOOD_V2).encode()
    request = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys.token()}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n").encode() + body
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(gw))
    writer.write(request)
    await writer.drain()
    writer.write_eof()  # half-close: the promised bytes will never come
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    if raw:
        status, answer = _status_and_body(raw)
        assert_refused(status, answer, 400, "invalid_request", up)
    assert up.seen == []


async def test_content_length_larger_than_the_body_and_stalling(env: Any, keys: Keys) -> None:
    """Same lie, but the client keeps the socket open: refused after body_timeout_s, not held forever."""
    gw, up, _ = env
    body = json.dumps(GOOD_V2).encode()
    request = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys.token()}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n").encode() + body
    raw = await raw_http(_port(gw), request, timeout=10)
    status, answer = _status_and_body(raw)
    assert_refused(status, answer, 408, "request_timeout", up)


async def test_content_length_smaller_than_the_body(env: Any, keys: Keys) -> None:
    """The first N bytes are the request (truncated JSON -> 400); the rest is never read as part of it."""
    gw, up, _ = env
    body = json.dumps(GOOD_V2).encode()
    request = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys.token()}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body) - 10}\r\n"
               f"Connection: close\r\n\r\n").encode() + body
    raw = await raw_http(_port(gw), request)
    status, answer = _status_and_body(raw)
    assert_refused(status, answer, 400, "invalid_request", up)


async def test_content_length_over_the_limit_is_refused_unread(env: Any, keys: Keys) -> None:
    gw, up, _ = env
    request = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys.token()}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n").encode() + b"{"
    raw = await raw_http(_port(gw), request)
    status, answer = _status_and_body(raw)
    assert_refused(status, answer, 413, "payload_too_large", up)


async def test_empty_body(env: Any, keys: Keys) -> None:
    gw, up, _ = env
    assert_refused(*await send(env, keys, b""), 400, "invalid_request", up)
