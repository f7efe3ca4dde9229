"""Hostile binary tensor bodies, shared memory and Triton's admin endpoints: refused, never forwarded.

Every request here goes through the real gateway to an upstream that records
what it receives; each must be answered 4xx in the flat v2 error shape (the
message naming what is wrong) and the upstream must see nothing.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests.harness import ALLOW_ANALYSTS, Keys, gateway, upstream, v2_model

URL_PATH = "/v2/models/m/infer"


def binary_body(inputs: list[dict[str, Any]], tail: bytes, **extra: Any) -> tuple[bytes, int]:
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + tail, len(header)


def fp32(name: str, shape: list[int], size: int) -> dict[str, Any]:
    return {"name": name, "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": size}}


FOUR = np.arange(4, dtype="<f4").tobytes()
BYTES_PAST = struct.pack("<I", 2) + b"ok" + struct.pack("<I", 99) + b"short"

# (name, body, header value, expected message fragment)
HOSTILE: list[tuple[str, bytes, str | None, str]] = []


def _case(name: str, inputs: list[dict[str, Any]], tail: bytes, fragment: str, *, header: str | None = None,
          **extra: Any) -> None:
    body, length = binary_body(inputs, tail, **extra)
    HOSTILE.append((name, body, header if header is not None else str(length), fragment))


_case("size larger than the body", [fp32("x", [8], 32)], FOUR, "only 16 bytes of binary data are left")
_case("size smaller than the body", [fp32("x", [2], 8)], FOUR, "8 bytes of binary data follow")
_case("size disagrees with shape", [fp32("x", [4], 12)], FOUR[:12], "12 bytes, but shape [4] of FP32 needs 16")
_case("sizes do not add up", [fp32("a", [2], 8), fp32("b", [2], 8)], FOUR + b"\0" * 4, "4 bytes of binary data follow")
_case("second input runs past", [fp32("a", [2], 8), fp32("b", [4], 16)], FOUR, "input 'b'")
_case("BYTES length past the buffer", [{"name": "s", "datatype": "BYTES", "shape": [2],
                                        "parameters": {"binary_data_size": len(BYTES_PAST)}}],
      BYTES_PAST, "element 1 (99 bytes) runs past")
_case("negative size", [fp32("x", [4], -16)], FOUR, "non-negative integer")
_case("NaN in binary", [fp32("x", [1], 4)], np.array([np.nan], "<f4").tobytes(), "NaN or infinite")
_case("BOOL that is no bool", [{"name": "b", "datatype": "BOOL", "shape": [1], "parameters": {"binary_data_size": 1}}],
      b"\x07", "not a BOOL")
_case("shared memory input", [{**fp32("x", [4], 16), "parameters": {"shared_memory_region": "r", "binary_data_size": 16}}],
      FOUR, "shared_memory_region")
_case("shared memory output", [fp32("x", [4], 16)], FOUR, "shared_memory_region",
      outputs=[{"name": "y", "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 64}}])
for value in ("-1", "99999999999999999999", "abc", "0", "100000"):
    _case(f"header length {value}", [fp32("x", [4], 16)], FOUR, "Inference-Header-Content-Length", header=value)


@pytest.fixture
async def env(tmp_path: Path, keys: Keys) -> Any:
    raw = {"backend": {"type": "http", "protocol": "raw", "upstreams": [], "paths": ["/v2/*"],
                       "methods": ["GET", "POST", "PUT", "DELETE"]}}
    async with upstream() as up:
        raw["backend"]["upstreams"] = [up.url]  # a raw glob over /v2/*: Triton's admin paths must still never pass
        async with gateway(tmp_path, keys, models={"m": v2_model(up.url), "wide": raw}, policy=ALLOW_ANALYSTS) as gw, \
                aiohttp.ClientSession(headers=keys.auth()) as session:
            yield gw, up, session


@pytest.mark.parametrize("name,body,header,fragment", HOSTILE, ids=[c[0] for c in HOSTILE])
async def test_hostile_binary_body_is_400_and_never_forwarded(env: Any, name: str, body: bytes, header: str,
                                                              fragment: str) -> None:
    gw, up, session = env
    async with session.post(gw.url + URL_PATH, data=body, headers={"Inference-Header-Content-Length": header},
                            skip_auto_headers=("Content-Type",)) as r:
        answer = await r.json(content_type=None)
    assert r.status == 400, (name, answer)
    assert set(answer) == {"error", "type", "request_id"} and answer["type"] == "invalid_request"
    assert fragment in answer["error"], (name, answer["error"])
    assert up.seen == []


async def test_json_requests_cannot_smuggle_binary_or_bf16(env: Any) -> None:
    gw, up, session = env
    for doc, fragment in (
        ({"inputs": [fp32("x", [4], 16)]}, "needs the Inference-Header-Content-Length"),
        ({"inputs": [{"name": "x", "datatype": "BF16", "shape": [1], "data": [1.0]}]}, "BF16 is sent only as binary"),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0],
                      "parameters": {"shared_memory_region": "r"}}]}, "shared memory"),
    ):
        async with session.post(gw.url + URL_PATH, json=doc) as r:
            answer = await r.json()
        assert r.status == 400 and fragment in answer["error"], answer
    async with session.post(gw.url + URL_PATH, data=b"{}", headers={"Content-Type": "text/plain",
                                                                   "Inference-Header-Content-Length": "2"}) as r:
        assert r.status == 415
    assert up.seen == []


async def test_header_sent_twice_is_refused(env: Any) -> None:
    gw, up, session = env
    body, length = binary_body([fp32("x", [4], 16)], FOUR)
    headers = [("Inference-Header-Content-Length", str(length)), ("Inference-Header-Content-Length", "2")]
    async with session.post(gw.url + URL_PATH, data=body, headers=headers) as r:
        assert r.status == 400 and "more than once" in (await r.json())["error"]
    assert up.seen == []


TRITON_ADMIN = [
    ("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/m/load"),
    ("POST", "/v2/repository/models/m/unload"), ("GET", "/v2/systemsharedmemory/status"),
    ("POST", "/v2/systemsharedmemory/region/r0/register"), ("POST", "/v2/cudasharedmemory/region/r0/register"),
    ("GET", "/v2/cudasharedmemory/status"), ("GET", "/v2/logging"), ("POST", "/v2/logging"),
    ("GET", "/v2/trace/setting"), ("POST", "/v2/trace/setting"), ("GET", "/v2/models/m/stats"),
    ("GET", "/v2/models/m/versions/1/stats"), ("GET", "/v2/models/stats"), ("POST", "/v2/models/m/trace/setting"),
    ("GET", "/v2/models/m/config"), ("DELETE", "/v2/models/m"), ("PUT", "/v2/models/m/infer"),
    ("POST", "/v2/health/ready"), ("GET", "/v2/models/m/versions/1/../../../../repository/index"),
]


async def test_triton_admin_endpoints_never_reach_a_model_server(env: Any) -> None:
    gw, up, session = env
    for method, path in TRITON_ADMIN:
        async with session.request(method, gw.url + path, data=b"{}") as r:
            answer = await r.json(content_type=None)
        assert r.status in (404, 405), (method, path, r.status)
        assert isinstance(answer["error"], str) and answer["type"] in ("not_found", "method_not_allowed")
    assert up.seen == []
    async with session.get(gw.url + "/v2/other") as r:  # the raw glob still serves what is not Triton's admin
        assert r.status == 200
    assert [s.path for s in up.seen] == ["/v2/other"]
