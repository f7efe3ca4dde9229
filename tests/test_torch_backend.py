"""The torch backend end to end below HTTP: loading, v2 metadata/ready/infer, request checks, config."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from backends.torch import TorchBackend, TorchBackendConfig
from backends.torch.archs import DigitsMLP
from gateway.backend import BackendEnv
from gateway.config import ModelConfig, ServerConfig
from gateway.errors import ConfigError, InvalidRequest
from gateway.metrics import Metrics
from gateway.pipeline import RequestContext, Route, RouteKind
from gateway.request import BufferedRequest
from gateway.typedyaml import Source, build, loads

ASSETS = Path(__file__).resolve().parents[1] / "backends" / "torch" / "assets"


def make_backend(base: Path, model_extra: dict[str, Any] | None = None, **backend: Any) -> TorchBackend:
    source = Source(file=str(base / "config.yaml"), base_dir=base)
    data = {"backend": {"type": "torch", **backend}, **(model_extra or {})}
    model = build(ModelConfig, data, "models.digits", source)
    return TorchBackend("digits", model, model.backend.build(TorchBackendConfig), BackendEnv(ServerConfig(), Metrics()))


def context(kind: RouteKind, payload: Any = None) -> RequestContext:
    ctx = RequestContext(BufferedRequest("POST", "/v2/models/digits/infer"), "rid", 0.0)
    ctx.route = Route(kind, "infer" if kind is RouteKind.V2_INFER else "read", "digits", kind is RouteKind.V2_INFER)
    ctx.model_name = "digits"
    ctx.json = payload
    return ctx


def infer_body(rows: Any, n: int = 1, datatype: str = "FP32", name: str = "input") -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": [n, 64], "datatype": datatype, "data": rows}]}


@pytest.fixture
async def digits() -> Any:
    backend = make_backend(ASSETS, path="digits.safetensors", arch="digits-mlp", verify_key_file="digits_signing.pub",
                           max_batch_delay_ms=5)
    await backend.start()
    yield backend
    await backend.close()


async def test_bundled_model_loads_signed(digits: TorchBackend) -> None:
    assert digits.ready() and digits.protocol() == "v2"
    assert digits.info["format"] == "safetensors" and digits.info["signed"] and not digits.info["encrypted"]


async def test_metadata_and_ready(digits: TorchBackend) -> None:
    meta = await digits.handle(context(RouteKind.V2_METADATA))
    doc = orjson.loads(meta.body or b"")
    assert doc["name"] == "digits" and doc["platform"] == "pytorch_safetensors"
    assert doc["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert doc["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    ready = await digits.handle(context(RouteKind.V2_READY))
    assert ready.status == 200 and ready.json == {"name": "digits", "ready": True}


@pytest.mark.slow
async def test_held_out_accuracy_and_v2_answer_shape(digits: TorchBackend) -> None:
    pytest.importorskip("sklearn")
    from backends.torch.train_digits import split

    _, x_test, _, y_test = split()
    answer = await digits.handle(context(RouteKind.V2_INFER, {**infer_body(x_test.tolist(), n=len(x_test)), "id": "q1"}))
    assert answer.status == 200
    doc = orjson.loads(answer.body or b"")
    assert doc["id"] == "q1" and doc["model_name"] == "digits"
    (out,) = doc["outputs"]
    assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [len(x_test), 10]
    scores = np.asarray(out["data"], dtype=np.float32).reshape(-1, 10)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)  # probabilities
    accuracy = float((scores.argmax(axis=1) == y_test).mean())
    assert accuracy >= 0.95
    assert answer.json["outputs"][0]["data"] == pytest.approx(out["data"], abs=1e-7)  # json mirrors body


async def test_concurrent_single_requests_are_batched(digits: TorchBackend) -> None:
    pytest.importorskip("sklearn")
    from backends.torch.train_digits import split

    _, x_test, _, y_test = split()
    answers = await asyncio.gather(*(digits.handle(context(RouteKind.V2_INFER, infer_body(row.tolist())))
                                     for row in x_test[:64]))
    predicted = [int(np.argmax(a.json["outputs"][0]["data"])) for a in answers]
    assert sum(p == y for p, y in zip(predicted, y_test[:64])) >= 60
    assert digits.stats()["max_batch_size_seen"] > 1


async def test_int64_pixels_and_nested_data_are_accepted(digits: TorchBackend) -> None:
    flat = [0] * 64
    a = await digits.handle(context(RouteKind.V2_INFER, infer_body(flat, datatype="INT64")))
    b = await digits.handle(context(RouteKind.V2_INFER, infer_body([flat], datatype="FP32")))
    assert a.json["outputs"][0]["data"] == b.json["outputs"][0]["data"]


async def test_inputs_checked_by_the_validate_stage_give_the_same_answer(digits: TorchBackend) -> None:
    from gateway.v2 import check_infer_request

    rng = np.random.default_rng(7)
    body = infer_body([round(float(v), 6) for v in rng.uniform(0, 16, 64)])
    plain = await digits.handle(context(RouteKind.V2_INFER, body))
    checked: dict[str, np.ndarray] = {}
    check_infer_request(body, None, checked)
    assert set(checked) == {"input"} and checked["input"].dtype == np.float64
    ctx = context(RouteKind.V2_INFER, body)
    ctx.validated_inputs = checked
    assert (await digits.handle(ctx)).body == plain.body


async def test_checked_inputs_of_another_document_are_never_used(digits: TorchBackend) -> None:
    """ctx.validated_inputs belongs to ctx.json: a body parsed here (no json attached) ignores them."""
    ctx = context(RouteKind.V2_INFER)
    ctx.body = orjson.dumps(infer_body([0] * 64))
    ctx.validated_inputs = {"input": np.full(64, 9.0)}
    zeros = await digits.handle(context(RouteKind.V2_INFER, infer_body([0] * 64)))
    assert (await digits.handle(ctx)).body == zeros.body


async def test_body_is_parsed_when_no_json_was_attached(digits: TorchBackend) -> None:
    ctx = context(RouteKind.V2_INFER)
    ctx.body = orjson.dumps(infer_body([1] * 64))
    assert (await digits.handle(ctx)).status == 200


@pytest.mark.parametrize("payload,message", [
    ({"inputs": []}, "exactly one input"),
    ({"inputs": "x"}, "'inputs' list"),
    ([], "'inputs' list"),
    (infer_body([0] * 64, name="pixels"), "unknown input 'pixels'"),
    (infer_body([0] * 64, datatype="BYTES"), r"datatype must be FP32 \(a torch model takes numbers\)"),
    ({"inputs": [{"name": "input", "shape": [1, 63], "datatype": "FP32", "data": [0] * 63}]}, "shape must be"),
    ({"inputs": [{"name": "input", "shape": [0, 64], "datatype": "FP32", "data": []}]}, "shape must be"),
    ({"inputs": [{"name": "input", "shape": [1, 64, 1], "datatype": "FP32", "data": [0] * 64}]}, "shape must be"),
    ({"inputs": [{"name": "input", "shape": [1, True], "datatype": "FP32", "data": [0] * 64}]}, "shape must be"),
    # the values themselves: gateway.v2's check (the same one the validate stage runs), with JSON pointers
    (infer_body([0] * 63), r"/inputs/0/data: has 63 values but shape \[1, 64\] needs 64"),
    (infer_body([0] * 64, n=2), r"has 64 values but shape \[2, 64\] needs 128"),
    (infer_body([1e39] + [0] * 63), "/inputs/0/data/0: out of range for FP32"),
    (infer_body(["1"] * 64), r"/inputs/0/data/0: must be FP32 \(numbers\)"),
    (infer_body([True] * 64), r"/inputs/0/data/0: must be FP32 \(numbers\)"),
    (infer_body([0.5] * 64, datatype="INT64"), r"/inputs/0/data/0: must be INT64 \(integers\)"),
    (infer_body([2**70] * 64, datatype="INT64"), "/inputs/0/data/0: out of range for INT64"),
    (infer_body([[0] * 32, [0] * 31]), "nested data must be rectangular"),
    (infer_body({"a": 1}), "/inputs/0/data: must be a list of FP32 values"),
    ({**infer_body([0] * 64), "outputs": [{"name": "logits"}]}, "unknown output"),
])
async def test_malformed_requests_are_400(digits: TorchBackend, payload: Any, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        await digits.handle(context(RouteKind.V2_INFER, payload))


async def test_torchscript_model_needs_the_flag_and_uses_input_shape(tmp_path: Path) -> None:
    torch.manual_seed(0)
    buffer = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(DigitsMLP()), buffer)
    (tmp_path / "m.pt").write_bytes(buffer.getvalue())
    with pytest.raises(ConfigError, match="TorchScript model: a program, not just weights.*allow_torchscript: true"):
        await make_backend(tmp_path, path="m.pt").start()
    with pytest.raises(ConfigError, match=r"test run with input shape \[1, 63\] failed"):
        await make_backend(tmp_path, path="m.pt", input_shape=[63], allow_torchscript=True).start()
    backend = make_backend(tmp_path, path="m.pt", input_shape=[64], allow_torchscript=True)
    await backend.start()
    try:
        doc = orjson.loads((await backend.handle(context(RouteKind.V2_METADATA))).body or b"")
        assert doc["platform"] == "pytorch_torchscript" and doc["outputs"][0]["shape"] == [-1, 10]
        answer = await backend.handle(context(RouteKind.V2_INFER, infer_body([3] * 64)))
        assert answer.json["outputs"][0]["shape"] == [1, 10]
    finally:
        await backend.close()


async def test_model_inputs_declared_in_config_give_the_shape(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(DigitsMLP()), buffer)
    (tmp_path / "m.pt").write_bytes(buffer.getvalue())
    backend = make_backend(tmp_path, {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]}, path="m.pt",
                           allow_torchscript=True)
    await backend.start()
    await backend.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
async def test_cuda_requested_without_cuda_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model digits: device: cuda is configured but CUDA is not available"):
        await make_backend(ASSETS, path="digits.safetensors", arch="digits-mlp", device="cuda").start()


def test_import_does_not_load_torch() -> None:
    code = "import sys, backends.torch, backends.torch.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("backend,message", [
    ("{type: torch, path: m.st, key_env: K, key_file: k}", "give key_env or key_file, not both"),
    ("{type: torch, path: m.st, key_env: 'abc def'}", "must be an environment variable name"),
    ("{type: torch, path: m.st, max_batch_size: 0}", "max_batch_size: must be at least 1"),
    ("{type: torch, path: m.st, device: tpu}", "expected one of 'auto', 'cpu', 'cuda'"),
    ("{type: torch, path: m.st, max_queue: -1}", "max_queue: must be at least 1"),
    ("{type: torch, path: m.st, input_shape: [0]}", "input_shape"),
    ("{type: torch, path: m.st, batch: 3}", "unknown key"),
    ("{type: torch}", "missing required key 'path'"),
])
def test_config_mistakes_name_file_and_line(tmp_path: Path, backend: str, message: str) -> None:
    text = f"digits:\n  backend: {backend}\n"
    data, source = loads(text, file="config.yaml", base_dir=tmp_path)
    model = build(ModelConfig, data["digits"], "digits", source)
    with pytest.raises(ConfigError, match=message) as info:
        model.backend.build(TorchBackendConfig)
    assert str(info.value).startswith("config.yaml:2: digits.backend")


def test_paths_resolve_relative_to_the_config_file(tmp_path: Path) -> None:
    data, source = loads("backend: {type: torch, path: m/x.st, key_file: k.key, verify_key_file: /abs/p.pub}",
                         file="c.yaml", base_dir=tmp_path)
    cfg = build(ModelConfig, data, "models.d", source).backend.build(TorchBackendConfig)
    assert cfg.path == tmp_path / "m/x.st" and cfg.key_file == tmp_path / "k.key"
    assert cfg.verify_key_file == Path("/abs/p.pub")
