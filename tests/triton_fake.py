"""A fake Triton server for tests: the binary tensor extension as Triton implements it, written independently.

``handler`` serves (through ``tests.harness.upstream``, which records every
request it receives):

* ``POST /v2/models/{m}[/versions/{v}]/infer``: an identity model: every input
  comes back as output ``OUT_<input name>`` with the same datatype, shape and
  bytes; a model named ``scores`` answers a fixed FP32 [n, 10] score tensor
  ``scores`` instead. Inputs may be JSON or binary (``Inference-Header-Content-Length``),
  outputs go back binary when the request asks as Triton reads it
  (``binary_data_output``, or an output's own ``binary_data``).
* ``POST .../generate``: ``{"text_output": <text_input> + " world"}``;
  ``.../generate_stream``: three SSE events, the second and third only once
  ``Fake.release`` is set, so a test sees the first arrive on its own.
* ``GET /v2/models/{m}[/versions/{v}]``, ``.../ready``: metadata, readiness.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import numpy as np
from aiohttp import web

DTYPES = {"BOOL": "u1", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1",
          "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "BF16": "<u2", "FP32": "<f4",
          "FP64": "<f8"}
SCORES = [0.01, 0.02, 0.6, 0.05, 0.1, 0.02, 0.05, 0.05, 0.07, 0.03]


def _json_values(datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        out, pos = [], 0
        while pos < len(raw):
            (n,) = struct.unpack_from("<I", raw, pos)
            out.append(raw[pos + 4:pos + 4 + n].decode("utf-8", "replace"))
            pos += 4 + n
        return out
    values = np.frombuffer(raw, dtype=DTYPES[datatype])
    return values.astype(bool).tolist() if datatype == "BOOL" else values.tolist()


def _raw_values(datatype: str, data: list[Any]) -> bytes:
    if datatype == "BYTES":
        parts = [str(v).encode() for v in data]
        return b"".join(struct.pack("<I", len(p)) + p for p in parts)
    return np.asarray(data, dtype=DTYPES[datatype]).tobytes()


class Fake:
    """The fake server's state: ``release`` lets a stream go on."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        parts = path.split("/")
        if len(parts) < 4 or parts[:3] != ["", "v2", "models"]:
            return web.json_response({"error": "unknown route"}, status=404)
        model = parts[3]
        tail = parts[4:]
        if tail[:1] == ["versions"]:
            tail = tail[2:]
        if request.method == "GET" and not tail:
            return web.json_response({"name": model, "versions": ["1", "2"], "platform": "fake",
                                      "inputs": [], "outputs": []})
        if request.method == "GET" and tail == ["ready"]:
            return web.Response(status=200)
        body = await request.read()
        if tail == ["infer"]:
            return self._infer(model, body, request.headers.get("Inference-Header-Content-Length"))
        if tail == ["generate"]:
            doc = json.loads(body)
            return web.json_response({"model_name": model, "text_output": doc.get("text_input", "") + " world"})
        if tail == ["generate_stream"]:
            return await self._stream(request)
        return web.json_response({"error": "unknown route"}, status=404)

    def _infer(self, model: str, body: bytes, header: str | None) -> web.Response:
        length = int(header) if header is not None else len(body)
        doc = json.loads(body[:length])
        offset = length
        outputs: list[dict[str, Any]] = []
        for tensor in doc["inputs"]:
            size = (tensor.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                raw = body[offset:offset + size]
                offset += size
            else:
                raw = _raw_values(tensor["datatype"], tensor["data"])
            outputs.append({"name": "OUT_" + tensor["name"], "datatype": tensor["datatype"],
                            "shape": tensor["shape"], "raw": raw})
        if model == "scores":
            n = doc["inputs"][0]["shape"][0]
            outputs = [{"name": "scores", "datatype": "FP32", "shape": [n, 10],
                        "raw": np.tile(np.asarray(SCORES, "<f4"), n).tobytes()}]
        default = (doc.get("parameters") or {}).get("binary_data_output", False)
        asked = {o["name"]: (o.get("parameters") or {}).get("binary_data", default) for o in doc.get("outputs", [])}
        header_outputs, buffers = [], []
        for out in outputs:
            if asked and out["name"] not in asked:
                continue
            entry = {k: v for k, v in out.items() if k != "raw"}
            if asked.get(out["name"], default):
                entry["parameters"] = {"binary_data_size": len(out["raw"])}
                buffers.append(out["raw"])
            else:
                entry["data"] = _json_values(out["datatype"], out["raw"])
            header_outputs.append(entry)
        answer = json.dumps({"model_name": model, "model_version": "1", "outputs": header_outputs}).encode()
        if not buffers:
            return web.Response(body=answer, content_type="application/json")
        return web.Response(body=answer + b"".join(buffers), content_type="application/octet-stream",
                            headers={"Inference-Header-Content-Length": str(len(answer))})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"text_output": "Hello"}\n\n')
        await self.release.wait()
        for word in (" wor", "ld"):
            await response.write(b'data: {"text_output": "%s"}\n\n' % word.encode())
        await response.write_eof()
        return response
