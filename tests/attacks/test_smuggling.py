"""Request smuggling: every framing two parsers could read differently is refused before any upstream sees it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import ALLOW_ANALYSTS, Keys, raw_http, start_gateway, start_upstream, v2_model

BODY = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,1],"data":[1.0]}]}'
CHUNKED = hex(len(BODY))[2:].encode() + b"\r\n" + BODY + b"\r\n0\r\n\r\n"


@pytest.fixture
async def gateway(tmp_path: Path, keys: Keys):
    up = await start_upstream()
    gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS)
    yield gw, up, int(gw.url.rsplit(":", 1)[1])
    await gw.stop()
    await up.stop()


def head(keys: Keys, extra: str) -> bytes:
    return (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nAuthorization: {keys.auth()['Authorization']}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


@pytest.mark.parametrize("name, extra, payload", [
    ("content-length and transfer-encoding", f"Content-Length: {len(BODY)}\r\nTransfer-Encoding: chunked\r\n", CHUNKED),
    ("transfer coding we do not apply", "Transfer-Encoding: gzip, chunked\r\n", CHUNKED),
    ("transfer-encoding twice", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", CHUNKED),
    ("identity transfer coding", f"Transfer-Encoding: identity\r\nContent-Length: {len(BODY)}\r\n", BODY),
    ("bad chunk size", "Transfer-Encoding: chunked\r\n", b"zz\r\n" + BODY),
    ("obsolete line folding", f"X-Note: a\r\n  b\r\nContent-Length: {len(BODY)}\r\n", BODY),
    ("space before colon", f"Content-Length : {len(BODY)}\r\n", BODY),
    ("signed content-length", f"Content-Length: +{len(BODY)}\r\n", BODY),
    ("two content-lengths", f"Content-Length: {len(BODY)}\r\nContent-Length: 5\r\n", BODY),
    ("two content-types", f"Content-Type: text/plain\r\nContent-Length: {len(BODY)}\r\n", BODY),
    ("two hosts", f"Host: other\r\nContent-Length: {len(BODY)}\r\n", BODY),
    ("two request ids", f"X-Request-ID: a\r\nX-Request-ID: b\r\nContent-Length: {len(BODY)}\r\n", BODY),
])
async def test_ambiguous_framing_is_refused(gateway, keys: Keys, name: str, extra: str, payload: bytes) -> None:
    gw, up, port = gateway
    answer = await raw_http(port, head(keys, extra) + payload, timeout=3)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.endswith(b" 400 Bad Request"), (name, answer[:300])
    assert b'"invalid_request"' in answer, name
    assert up.seen == [], name


async def test_plain_chunked_body_is_forwarded_with_a_length(gateway, keys: Keys) -> None:
    gw, up, port = gateway
    answer = await raw_http(port, head(keys, "Transfer-Encoding: chunked\r\nConnection: close\r\n") + CHUNKED, timeout=3)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    seen = up.seen[-1]
    assert seen.body == BODY
    assert seen.headers.get("Content-Length") == str(len(BODY)) and "Transfer-Encoding" not in seen.headers
