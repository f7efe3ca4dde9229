"""The real ``tritonclient.http`` client, with its defaults, against the gateway.

In front of a fake Triton (``tests.triton_fake``: the binary extension as Triton
implements it) and in front of the local torch runner: binary in and out,
JSON mode, every datatype family, versions, server endpoints, generate and
generate_stream, errors the client can print, hardening of binary answers.
The client is synchronous (gevent), so each call runs in a thread.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Callable

import aiohttp
import numpy as np
import pytest

th = pytest.importorskip("tritonclient.http")
import ml_dtypes  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.harness import ALLOW_ANALYSTS, Keys, gateway, upstream, v2_model  # noqa: E402
from tests.triton_fake import SCORES, Fake  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets"
POLICY: dict[str, Any] = {
    "roles": {"analyst": [], "guarded": []},
    "rules": [*ALLOW_ANALYSTS["rules"],
              {"id": "guarded-infer", "roles": ["guarded"], "models": ["scores", "digits"], "actions": ["infer", "read"],
               "effect": "allow"}],
    "outputs": [{"id": "guarded-top2", "roles": ["guarded"], "models": ["scores", "digits"], "top_k": 2,
                 "round_decimals": 2}],
}


async def client_call(gw: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn(client)`` with a fresh tritonclient client for the gateway, in a worker thread.

    tritonclient writes ``Inference-Header-Content-Length`` into the headers dict a call is
    given, so every call here gets its own copy (``dict(auth)``).
    """
    def run() -> Any:
        client = th.InferenceServerClient(gw.url.removeprefix("http://"))
        try:
            return fn(client)
        finally:
            client.close()

    return await asyncio.to_thread(run)


def tensor(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> Any:
    t = th.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


CASES = {
    "FP32": np.array([[0.5, -1.25, 3.0]], np.float32),
    "INT64": np.array([[1, -2, 2**40]], np.int64),
    "FP16": np.array([[0.5, 2.0]], np.float16),
    "BF16": np.array([[1.5, -2.0, 0.25]], np.float32).astype(ml_dtypes.bfloat16),
    "BOOL": np.array([[True, False, True]]),
    "BYTES": np.array([[b"hello", b"", "wörld".encode()]], dtype=object),
    "UINT8": np.array([[0, 255]], np.uint8),
    "INT8": np.array([[-128, 127]], np.int8),
    "FP64": np.array([[1e300, -0.0]], np.float64),
}


@pytest.fixture
async def triton(tmp_path: Path, keys: Keys) -> Any:
    fake = Fake()
    async with upstream(fake.handler) as up, gateway(
        tmp_path, keys, models={"ident": v2_model(up.url), "scores": v2_model(up.url)}, policy=POLICY
    ) as gw:
        yield gw, up, fake


async def test_stock_client_defaults_round_trip_every_datatype(triton: Any, keys: Keys) -> None:
    gw, up, _ = triton
    auth = keys.auth()
    inputs = [tensor(f"in_{dt}", array, dt) for dt, array in CASES.items()]

    result = await client_call(gw, lambda c: c.infer("ident", inputs, headers=dict(auth)))
    for dt, array in CASES.items():
        got = result.as_numpy(f"OUT_in_{dt}")
        assert got is not None, dt
        if dt == "BYTES":
            assert got.reshape(-1).tolist() == array.reshape(-1).tolist()
        else:
            assert np.array_equal(got.astype(np.float64), array.astype(np.float64)), dt
    body, json_size = th.InferenceServerClient.generate_request_body(inputs)
    seen = up.seen[-1]
    assert seen.body == body, "a binary request that passed must be forwarded byte for byte"
    assert seen.headers["Inference-Header-Content-Length"] == str(json_size)
    assert all(o["parameters"]["binary_data_size"] > 0 for o in result.get_response()["outputs"])


async def test_json_mode_still_works(triton: Any, keys: Keys) -> None:
    gw, up, _ = triton
    x = np.array([[1.0, 2.0]], np.float32)
    outputs = [th.InferRequestedOutput("OUT_x", binary_data=False)]
    result = await client_call(gw, lambda c: c.infer("ident", [tensor("x", x, "FP32", binary=False)],
                                                     outputs=outputs, headers=keys.auth()))
    assert result.get_response()["outputs"][0]["data"] == [1.0, 2.0]
    assert "Inference-Header-Content-Length" not in up.seen[-1].headers
    assert np.array_equal(result.as_numpy("OUT_x"), x)


async def test_versioned_model_paths(triton: Any, keys: Keys) -> None:
    gw, up, _ = triton
    auth = keys.auth()
    x = np.ones((1, 2), np.float32)
    result = await client_call(gw, lambda c: c.infer("ident", [tensor("x", x, "FP32")], model_version="2",
                                                     headers=dict(auth)))
    assert np.array_equal(result.as_numpy("OUT_x"), x)
    assert up.seen[-1].path == "/v2/models/ident/versions/2/infer"
    meta = await client_call(gw, lambda c: c.get_model_metadata("ident", model_version="1", headers=dict(auth)))
    assert meta["name"] == "ident" and up.seen[-1].path == "/v2/models/ident/versions/1"
    assert await client_call(gw, lambda c: c.is_model_ready("ident", "1", headers=dict(auth)))
    denied = keys.auth("mallory", roles=["guest"])  # authorised as the model: a version is no way around policy
    with pytest.raises(InferenceServerException) as refused:
        await client_call(gw, lambda c: c.infer("ident", [tensor("x", x, "FP32")], model_version="2", headers=dict(denied)))
    assert "denied by policy" in str(refused.value) and refused.value.status() == "403"


async def test_server_endpoints_are_answered_by_the_gateway(triton: Any, keys: Keys) -> None:
    gw, up, _ = triton
    before = len(up.seen)
    auth = keys.auth("nobody-special", roles=[])  # authenticated, no policy needed
    assert await client_call(gw, lambda c: c.is_server_live(headers=dict(auth)))
    assert await client_call(gw, lambda c: c.is_server_ready(headers=dict(auth)))
    meta = await client_call(gw, lambda c: c.get_server_metadata(headers=dict(auth)))
    assert meta["name"] == "maas-gateway" and "binary_tensor_data" in meta["extensions"]
    assert not await client_call(gw, lambda c: c.is_server_live())  # unauthenticated: 401
    with pytest.raises(InferenceServerException) as refused:
        await client_call(gw, lambda c: c.get_server_metadata())
    assert refused.value.status() == "401" and "missing credentials" in str(refused.value)
    assert len(up.seen) == before


async def test_refused_calls_print_their_reason(triton: Any, keys: Keys) -> None:
    gw, up, _ = triton
    before = len(up.seen)
    x = np.ones((1, 2), np.float32)
    with pytest.raises(InferenceServerException) as refused:
        await client_call(gw, lambda c: c.infer("nope", [tensor("x", x, "FP32")], headers=keys.auth()))
    assert "unknown model" in str(refused.value) and refused.value.status() == "404"
    bad = tensor("x", x, "FP32")
    bad._raw_data = bad._raw_data[:4]  # a binary_data_size that disagrees with the shape
    bad._parameters["binary_data_size"] = 4
    with pytest.raises(InferenceServerException) as refused:
        await client_call(gw, lambda c: c.infer("ident", [bad], headers=keys.auth()))
    assert "input 'x'" in str(refused.value) and "needs 8" in str(refused.value)
    shm = th.InferInput("x", [1, 2], "FP32")
    shm.set_shared_memory("region0", 8)  # point Triton at memory the gateway cannot see
    with pytest.raises(InferenceServerException) as refused:
        await client_call(gw, lambda c: c.infer("ident", [shm], headers=keys.auth()))
    assert "shared_memory_region" in str(refused.value) and refused.value.status() == "400"
    assert len(up.seen) == before


async def test_generate_and_generate_stream(triton: Any, keys: Keys) -> None:
    gw, up, fake = triton
    async with aiohttp.ClientSession(headers=keys.auth()) as s:  # tritonclient has no generate call
        async with s.post(gw.url + "/v2/models/ident/generate", json={"text_input": "Hello"}) as r:
            assert r.status == 200 and (await r.json())["text_output"] == "Hello world"
        async with s.post(gw.url + "/v2/models/ident/versions/1/generate_stream",
                          json={"text_input": "Hello"}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)  # before the rest exists
            assert json.loads(first.removeprefix(b"data: "))["text_output"] == "Hello"
            fake.release.set()
            rest = await asyncio.wait_for(r.content.read(), 5)
        texts = [json.loads(line.removeprefix(b"data: "))["text_output"] for line in rest.split(b"\n\n") if line]
        assert texts == [" wor", "ld"]
        assert up.seen[-1].path == "/v2/models/ident/versions/1/generate_stream"
        async with s.post(gw.url + "/v2/models/ident/generate", json={"text_input": "x"},
                          headers={"Inference-Header-Content-Length": "3"}) as r:
            assert r.status == 400 and "infer only" in (await r.json())["error"]


async def _infer_scores(gw: Any, auth: dict[str, str], binary: bool) -> Any:
    x = np.ones((2, 3), np.float32)
    outputs = None if binary else [th.InferRequestedOutput("scores", binary_data=False)]  # JSON answer
    return await client_call(gw, lambda c: c.infer("scores", [tensor("x", x, "FP32", binary)], outputs=outputs,
                                                   headers=dict(auth)))


async def test_binary_answers_are_hardened_like_json(triton: Any, keys: Keys) -> None:
    gw, _, _ = triton
    auth = keys.auth("bob", roles=["guarded"])
    binary = await _infer_scores(gw, auth, True)
    plain = await _infer_scores(gw, auth, False)
    names = [o["name"] for o in binary.get_response()["outputs"]]
    assert names == ["top_k_indices", "top_k_scores"] and binary.as_numpy("scores") is None
    assert all("binary_data_size" in o["parameters"] for o in binary.get_response()["outputs"])
    assert binary.as_numpy("top_k_indices").dtype == np.int64
    assert binary.as_numpy("top_k_indices").tolist() == [[2, 4], [2, 4]]
    assert np.array_equal(binary.as_numpy("top_k_indices"), plain.as_numpy("top_k_indices"))
    assert np.allclose(binary.as_numpy("top_k_scores"), plain.as_numpy("top_k_scores"))
    assert binary.as_numpy("top_k_scores").tolist()[0] == pytest.approx([0.6, 0.1])
    body, json_size = th.InferenceServerClient.generate_request_body([tensor("x", np.ones((1, 3), np.float32), "FP32")])
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v2/models/scores/infer", data=body,
                          headers={**auth, "Inference-Header-Content-Length": str(json_size)}) as r:
            raw = await r.read()
            assert r.status == 200 and r.headers["Content-Type"] == "application/octet-stream"
            assert int(r.headers["Inference-Header-Content-Length"]) < len(raw)
    assert np.asarray(SCORES, "<f4").tobytes() not in raw and np.float32(0.02).tobytes() not in raw


async def test_local_runner_behind_the_same_surface(tmp_path: Path, keys: Keys) -> None:
    backend = {"type": "torch", "path": str(ASSETS / "digits.safetensors"), "arch": "digits-mlp",
               "max_batch_delay_ms": 0}
    async with gateway(tmp_path, keys, models={"digits": {"backend": backend}}, policy=POLICY) as gw:
        x = np.random.default_rng(0).uniform(0, 16, (3, 64)).astype(np.float32)
        auth = keys.auth()
        binary = await client_call(gw, lambda c: c.infer("digits", [tensor("input", x, "FP32")], headers=dict(auth)))
        plain = await client_call(gw, lambda c: c.infer(
            "digits", [tensor("input", x, "FP32", False)], model_version="1",
            outputs=[th.InferRequestedOutput("output", binary_data=False)], headers=dict(auth)))
        assert binary.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 3 * 10 * 4
        assert "data" in plain.get_response()["outputs"][0]
        assert np.allclose(binary.as_numpy("output"), plain.as_numpy("output"), atol=1e-6)
        guarded = await client_call(gw, lambda c: c.infer("digits", [tensor("input", x, "FP32")],
                                                          headers=keys.auth("bob", roles=["guarded"])))
        assert guarded.as_numpy("output") is None
        expected = np.argsort(-binary.as_numpy("output"), axis=1, kind="stable")[:, :2]
        assert np.array_equal(guarded.as_numpy("top_k_indices"), expected)
        with pytest.raises(InferenceServerException) as refused:
            await client_call(gw, lambda c: c.infer("digits", [tensor("input", x, "FP32")], model_version="7",
                                                    headers=dict(auth)))
        assert "no version '7'" in str(refused.value)
        with pytest.raises(InferenceServerException) as refused:
            await client_call(gw, lambda c: c.infer("digits", [tensor("input", x[:, :10], "FP32")], headers=dict(auth)))
        assert "shape" in str(refused.value) and refused.value.status() == "400"
        assert await client_call(gw, lambda c: c.is_server_ready(headers=dict(auth)))
        meta = await client_call(gw, lambda c: c.get_model_metadata("digits", headers=dict(auth)))
        assert meta["inputs"][0]["shape"] == [-1, 64]


RUNNER_CASES = {
    "FP32": np.array([[0.5, -1.25, 3.0]], np.float32),
    "FP16": np.array([[0.5, 2.0, -4.0]], np.float16),
    "BF16": np.array([[1.5, -2.0, 0.25]], np.float32).astype(ml_dtypes.bfloat16),
    "INT64": np.array([[1, -2, 2**40]], np.int64),
    "INT32": np.array([[7, -8, 2**29]], np.int32),
    "BOOL": np.array([[True, False, True]]),
}


async def test_local_runner_round_trips_every_number_datatype(tmp_path: Path, keys: Keys) -> None:
    """A TorchScript model per datatype behind the local runner, called by the stock client (binary both ways):
    its answer keeps the model's datatype (a BF16 model answers BF16); BYTES, which no torch model takes, is
    refused with a reason the client prints."""
    import torch
    from torch import nn

    from tests.test_torch_guard import archive

    class Doubles(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + x

    class Negates(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.logical_not(x)

    models = {}
    for dt in RUNNER_CASES:
        path = tmp_path / f"{dt}.pt"
        path.write_bytes(archive(torch.jit.script(Negates() if dt == "BOOL" else Doubles())))
        models[dt.lower()] = {"backend": {"type": "torch", "path": str(path), "allow_torchscript": True,
                                          "input_shape": [3], "input_datatype": dt, "max_batch_delay_ms": 0}}
    async with gateway(tmp_path, keys, models=models, policy=ALLOW_ANALYSTS) as gw:
        auth = keys.auth()
        for dt, array in RUNNER_CASES.items():
            meta = await client_call(gw, lambda c: c.get_model_metadata(dt.lower(), headers=dict(auth)))
            assert meta["inputs"][0]["datatype"] == dt and meta["outputs"][0]["datatype"] == dt
            result = await client_call(gw, lambda c: c.infer(dt.lower(), [tensor("input", array, dt)],
                                                             headers=dict(auth)))
            answer = result.get_response()["outputs"][0]
            assert answer["datatype"] == dt and answer["parameters"]["binary_data_size"] > 0, dt
            expected = ~array if dt == "BOOL" else array.astype(np.float64) * 2
            got = result.as_numpy("output")
            assert got is not None and np.array_equal(got.astype(np.float64), expected.astype(np.float64)), dt
            if dt != "BF16":  # (BF16 travels only as binary data)
                plain = await client_call(gw, lambda c: c.infer(
                    dt.lower(), [tensor("input", array, dt, False)],
                    outputs=[th.InferRequestedOutput("output", binary_data=False)], headers=dict(auth)))
                assert np.array_equal(plain.as_numpy("output").astype(np.float64), expected.astype(np.float64)), dt
        words = np.array([[b"a", b"b", b"c"]], dtype=object)
        with pytest.raises(InferenceServerException) as refused:
            await client_call(gw, lambda c: c.infer("fp32", [tensor("input", words, "BYTES")], headers=dict(auth)))
        assert refused.value.status() == "400" and "FP32" in str(refused.value)
