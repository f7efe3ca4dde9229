"""The validate stage: protocol checks, per-model JSON Schema, messages, metrics, forwarded bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway.config import GatewayConfig, ModelConfig, TensorSpec
from gateway.errors import ConfigError, InvalidRequest
from gateway.metrics import Metrics
from gateway.pipeline import RequestContext, Route, RouteKind
from gateway.request import BufferedRequest
from gateway.services import Services
from gateway.stages import validate
from gateway.typedyaml import Section, Source

V2 = Route(RouteKind.V2_INFER, "infer", "digits", json_body=True)
OPENAI = Route(RouteKind.OPENAI, "infer", None, json_body=True)
RAW = Route(RouteKind.RAW, "infer", "legacy", json_body=False)
READ = Route(RouteKind.V2_METADATA, "read", "digits", json_body=False)

DIGITS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "inputs": {"type": "array", "maxItems": 1, "items": {
            "type": "object",
            "properties": {"data": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 16}}},
        }},
    },
}


def model(kind: str = "http", protocol: str = "v2", **fields: Any) -> ModelConfig:
    backend = Section({"type": kind, "protocol": protocol}, "models.m.backend", Source("gateway.yaml"))
    return ModelConfig(backend=backend, **fields)


def services(**models: ModelConfig) -> Services:
    named = {name: _named(m, name) for name, m in models.items()}
    return Services(GatewayConfig(models=named), Metrics(), None)


def _named(m: ModelConfig, name: str) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(m, name=name)


def ctx_for(route: Route, doc: Any, *, model_name: str = "digits", path: str = "/v2/models/digits/infer",
            raw: bytes | None = None) -> RequestContext:
    body = raw if raw is not None else orjson.dumps(doc)
    ctx = RequestContext(BufferedRequest("POST", path, body=body), "r1", 0.0)
    ctx.route, ctx.path, ctx.model_name, ctx.body = route, path, model_name, body
    ctx.json = doc if raw is None or route.json_body else None
    return ctx


def tensor(data: Any, shape: list[int], datatype: str = "FP32", name: str = "x") -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def v2(*tensors: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": list(tensors)}


def write_schema(tmp_path: Path, schema: Any, name: str = "schema.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(schema) if not isinstance(schema, str) else schema)
    return path


async def refused(stage: validate.Validate, ctx: RequestContext) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        await stage(ctx)
    assert info.value.status == 400 and info.value.type == "invalid_request"
    assert ctx.validated_inputs is None  # nothing is handed on after a refusal
    return info.value


def failures(svc: Services, model: str, reason: str) -> float:
    return svc.metrics.registry.get_sample_value("maas_validation_failures_total", {"model": model, "reason": reason}) or 0


# -- v2 --------------------------------------------------------------------------------

async def test_valid_v2_request_forwards_the_exact_validated_bytes() -> None:
    stage = validate.build(services(digits=model()))
    raw = b'{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2.5],[3,4]]}]}'
    ctx = ctx_for(V2, json.loads(raw), raw=raw)
    await stage(ctx)
    assert ctx.body == raw  # what the backend forwards: the received bytes, never a re-serialisation
    assert ctx.validated_inputs is not None  # passed: what was converted is handed on


@pytest.mark.parametrize("tensors, pointer, reason", [
    ([tensor([1.0, 2.0, 3.0], [1, 4])], "/inputs/0/data: has 3 values but shape [1, 4] needs 4", "v2_shape_mismatch"),
    ([tensor([[1.0, 2.0], [3.0]], [2, 2])], "/inputs/0/data: nested data must be rectangular", "v2_shape_mismatch"),
    ([tensor([1.0, "2", 3.0], [3])], "/inputs/0/data/1: must be FP32 (numbers)", "v2_datatype"),
    ([tensor([[1, 2], [3, 4.5]], [2, 2], "INT32")], "/inputs/0/data/1/1: must be INT32 (integers)", "v2_datatype"),
    ([tensor([1, True], [2], "INT8")], "/inputs/0/data/1: must be INT8 (integers)", "v2_datatype"),
    # a JSON boolean converts to 1.0 / 0.0 like a number would: among equal numbers, few or many, it is still found
    ([tensor([0.5, 1.0, True, 0.0], [4])], "/inputs/0/data/2: must be FP32 (numbers)", "v2_datatype"),
    ([tensor([[0.0] * 50, [1.0] * 49 + [False]], [2, 50], "FP64")], "/inputs/0/data/1/49: must be FP64 (numbers)",
     "v2_datatype"),
    ([tensor([None, 0.5], [2], "FP16")], "/inputs/0/data/0: must be FP16 (numbers)", "v2_datatype"),
    # past 256 values the list is converted in one C pass and only the 0/1 values are looked at again
    ([tensor([0.5] * 299 + [True], [300])], "/inputs/0/data/299: must be FP32 (numbers)", "v2_datatype"),
    ([tensor([0.0] * 150 + [False] + [1.0] * 149, [300])], "/inputs/0/data/150: must be FP32 (numbers)",
     "v2_datatype"),
    ([tensor([0.5] * 299 + ["1"], [300])], "/inputs/0/data/299: must be FP32 (numbers)", "v2_datatype"),
    ([tensor([0.5, [1.0]], [2])], "/inputs/0/data/1: must be FP32 (numbers)", "v2_datatype"),
    ([tensor([0.5, {"v": 1}], [2])], "/inputs/0/data/1: must be FP32 (numbers)", "v2_datatype"),
    ([tensor([1, 0], [2], "BOOL")], "/inputs/0/data/0: must be BOOL (booleans)", "v2_datatype"),
    ([tensor([1, 2], [2], "BYTES")], "/inputs/0/data/0: must be BYTES (strings)", "v2_datatype"),
    ([tensor([1, 300], [2], "INT8")], "/inputs/0/data/1: out of range for INT8 [-128, 127]", "v2_range"),
    ([tensor([-1], [1], "UINT8")], "/inputs/0/data/0: out of range for UINT8 [0, 255]", "v2_range"),
    ([tensor([1e6], [1], "FP16")], "/inputs/0/data/0: out of range for FP16", "v2_range"),
    ([tensor([1e39], [1], "FP32")], "/inputs/0/data/0: out of range for FP32", "v2_range"),
    ([tensor([1.0], [1], "FLOAT")], "/inputs/0/datatype: must be one of BOOL, UINT8", "v2_datatype"),
    ([tensor([1.0], [1], "fp32")], "/inputs/0/datatype: must be one of", "v2_datatype"),
    ([tensor([1.0], [-1])], "/inputs/0/shape: must be a list of at most 32 non-negative integers", "v2_shape"),
    ([tensor([1.0], [1.0])], "/inputs/0/shape: must be a list", "v2_shape"),
    ([tensor([1.0], "1")], "/inputs/0/shape: must be a list", "v2_shape"),
    ([tensor(1.0, [1])], "/inputs/0/data: must be a list of FP32 values", "v2_datatype"),
    ([tensor([1.0], [1]), tensor([2.0], [1])], "/inputs/1/name: duplicate input name 'x'", "v2_duplicate_input"),
    ([{"name": "x", "shape": [1], "datatype": "FP32"}], "/inputs/0/data: is required", "v2_body"),
    ([{"shape": [1], "datatype": "FP32", "data": [1]}], "/inputs/0/name: must be a non-empty string", "v2_body"),
    (["x"], "/inputs/0: must be an object", "v2_body"),
])
async def test_v2_violations_name_the_pointer(tensors: list[Any], pointer: str, reason: str) -> None:
    svc = services(digits=model())
    stage = validate.build(svc)
    err = await refused(stage, ctx_for(V2, v2(*tensors)))
    assert err.message.startswith(pointer)
    assert failures(svc, "digits", reason) == 1


@pytest.mark.parametrize("doc, message", [
    ([], "(root): must be an object"),
    ({}, "/inputs: must be a non-empty list"),
    ({"inputs": []}, "/inputs: must be a non-empty list"),
    ({"inputs": {"name": "x"}}, "/inputs: must be a non-empty list"),
    ({"inputs": [tensor([1.0], [1])], "id": 5}, "/id: must be a string"),
    ({"inputs": [tensor([1.0], [1])], "parameters": []}, "/parameters: must be an object"),
    ({"inputs": [tensor([1.0], [1])], "outputs": [{"name": "a"}, {"name": "a"}]}, "/outputs/1/name: duplicate"),
    ({"inputs": [tensor([1.0], [1])], "outputs": [{}]}, "/outputs/0/name: must be a non-empty string"),
])
async def test_v2_request_envelope(doc: Any, message: str) -> None:
    err = await refused(validate.build(services(digits=model())), ctx_for(V2, doc))
    assert err.message.startswith(message)


@pytest.mark.parametrize("t", [
    tensor([], [0, 4]),
    tensor([[[1, 2]], [[3, 4]]], [2, 1, 2], "INT64"),
    tensor([1, 2, 3, 4], [2, 2], "UINT64"),
    tensor([18446744073709551615], [1], "UINT64"),
    tensor([True, False], [2], "BOOL"),
    tensor(["a", "b"], [1, 2], "BYTES"),
    tensor([1, 2.5, -65504], [3], "FP16"),
    tensor([1e300], [1], "FP64"),
])
async def test_v2_valid_tensors(t: dict[str, Any]) -> None:
    ctx = ctx_for(V2, v2(t))
    await validate.build(services(digits=model()))(ctx)
    assert ctx.validated_inputs is not None


def test_v2_integer_beyond_64_bits_is_not_an_integer() -> None:
    from gateway import jsonsafe, v2 as v2_checks

    doc = jsonsafe.parse(b'{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[123456789012345678901234567890]}]}')
    with pytest.raises(v2_checks.RequestViolation, match="must be INT64"):
        v2_checks.check_infer_request(doc)


DECLARED = [TensorSpec("pixels", "FP32", [-1, 64]), TensorSpec("mask", "BOOL", [-1])]


@pytest.mark.parametrize("tensors, message, reason", [
    ([tensor([0.0] * 64, [1, 64], name="pixels")], "/inputs: missing declared input 'mask'", "v2_missing_input"),
    ([tensor([0.0] * 64, [1, 64], name="pixels"), tensor([True], [1], "BOOL", "mask"), tensor([1.0], [1], name="extra")],
     "/inputs/2/name: the model has no input 'extra'", "v2_undeclared_input"),
    ([tensor([0] * 64, [1, 64], "INT32", "pixels"), tensor([True], [1], "BOOL", "mask")],
     "/inputs/0/datatype: must be FP32 for input 'pixels'", "v2_declared_datatype"),
    ([tensor([0.0] * 63, [1, 63], name="pixels"), tensor([True], [1], "BOOL", "mask")],
     "/inputs/0/shape: [1, 63] does not match the declared shape [-1, 64]", "v2_declared_shape"),
    ([tensor([0.0] * 64, [64], name="pixels"), tensor([True], [1], "BOOL", "mask")],
     "/inputs/0/shape: [64] does not match", "v2_declared_shape"),
])
async def test_declared_inputs_from_config(tensors: list[Any], message: str, reason: str) -> None:
    svc = services(digits=model(inputs=DECLARED))
    err = await refused(validate.build(svc), ctx_for(V2, v2(*tensors)))
    assert err.message.startswith(message)
    assert failures(svc, "digits", reason) == 1


async def test_declared_inputs_accept_any_batch_size() -> None:
    stage = validate.build(services(digits=model(inputs=DECLARED)))
    ctx = ctx_for(V2, v2(tensor([0.5] * 192, [3, 64], name="pixels"), tensor([True] * 3, [3], "BOOL", "mask")))
    await stage(ctx)
    assert ctx.validated_inputs is not None


async def test_declared_inputs_from_a_backend_take_precedence() -> None:
    from_runner = {"digits": [TensorSpec("input", "FP32", [-1, 8, 8])]}
    stage = validate.build(services(digits=model(inputs=DECLARED)), declared_inputs=from_runner.get)
    await stage(ctx_for(V2, v2(tensor([0.0] * 64, [1, 8, 8], name="input"))))
    err = await refused(stage, ctx_for(V2, v2(tensor([0.0] * 64, [1, 64], name="input"))))
    assert "declared shape [-1, 8, 8]" in err.message


@pytest.mark.parametrize("spec, key", [
    (TensorSpec("x", "FLOAT32", [1]), "models.digits.inputs[0].datatype"),
    (TensorSpec("x", "FP32", [-2]), "models.digits.inputs[0].shape"),
])
def test_bad_input_declaration_is_a_config_error(spec: TensorSpec, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate.build(services(digits=model(inputs=[spec])))


# -- openai ----------------------------------------------------------------------------

CHAT = {"model": "chat", "messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}


def openai_ctx(doc: Any, path: str = "/v1/chat/completions") -> RequestContext:
    return ctx_for(OPENAI, doc, model_name="chat", path=path)


@pytest.mark.parametrize("doc, path", [
    (CHAT, "/v1/chat/completions"),
    ({**CHAT, "max_tokens": 100, "stream": True, "n": 2}, "/v1/chat/completions"),
    ({"model": "chat", "messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
                                    {"role": "tool", "content": "42", "tool_call_id": "1"}]}, "/v1/chat/completions"),
    ({"model": "chat", "prompt": "Once upon"}, "/v1/completions"),
    ({"model": "chat", "prompt": [[1, 2], [3]]}, "/v1/completions"),
    ({"model": "chat", "input": ["a", "b"]}, "/v1/embeddings"),
    ({"model": "chat", "input": [1, 2, 3], "max_completion_tokens": 100}, "/v1/embeddings"),
])
async def test_valid_openai_requests(doc: Any, path: str) -> None:
    ctx = openai_ctx(doc, path)
    await validate.build(services(chat=model(protocol="openai", max_tokens=100)))(ctx)
    assert ctx.validated_inputs is None  # passed; only v2 inputs are handed on converted


@pytest.mark.parametrize("doc, path, message, reason", [
    ({**CHAT, "model": ["chat", "gpt-4"]}, "/v1/chat/completions", "/model: must be a single non-empty string", "openai_model"),
    ({**CHAT, "model": ""}, "/v1/chat/completions", "/model: must be a single", "openai_model"),
    ({"model": "chat"}, "/v1/chat/completions", "/messages: must be a non-empty list", "openai_messages"),
    ({"model": "chat", "messages": []}, "/v1/chat/completions", "/messages: must be a non-empty list", "openai_messages"),
    ({"model": "chat", "messages": ["hi"]}, "/v1/chat/completions", "/messages/0: must be an object", "openai_messages"),
    ({"model": "chat", "messages": [{"role": "root", "content": "x"}]}, "/v1/chat/completions",
     "/messages/0/role: must be one of system, user, assistant, tool, developer, function", "openai_messages"),
    ({"model": "chat", "messages": [{"role": "user"}]}, "/v1/chat/completions", "/messages/0/content: is required",
     "openai_messages"),
    ({"model": "chat", "messages": [{"role": "user", "content": 5}]}, "/v1/chat/completions",
     "/messages/0/content: must be a string or a non-empty list of parts", "openai_messages"),
    ({"model": "chat", "messages": [{"role": "user", "content": [{"text": "x"}]}]}, "/v1/chat/completions",
     "/messages/0/content/0/type: must be a string", "openai_messages"),
    ({**CHAT, "max_tokens": 101}, "/v1/chat/completions", "/max_tokens: must be at most 100", "openai_max_tokens"),
    ({**CHAT, "max_completion_tokens": 10_000}, "/v1/chat/completions", "/max_completion_tokens: must be at most 100",
     "openai_max_tokens"),
    ({**CHAT, "max_tokens": 0}, "/v1/chat/completions", "/max_tokens: must be a positive integer", "openai_max_tokens"),
    ({**CHAT, "max_tokens": "50"}, "/v1/chat/completions", "/max_tokens: must be a positive integer", "openai_max_tokens"),
    ({**CHAT, "max_tokens": True}, "/v1/chat/completions", "/max_tokens: must be a positive integer", "openai_max_tokens"),
    ({**CHAT, "stream": "yes"}, "/v1/chat/completions", "/stream: must be a boolean", "openai_body"),
    ({"model": "chat"}, "/v1/completions", "/prompt: must be a string", "openai_prompt"),
    ({"model": "chat", "prompt": [1, "a"]}, "/v1/completions", "/prompt: must be a string", "openai_prompt"),
    ({"model": "chat", "prompt": [[1], []]}, "/v1/completions", "/prompt/1: must be a non-empty list of token ids",
     "openai_prompt"),
    ({"model": "chat", "input": []}, "/v1/embeddings", "/input: must be a string", "openai_input"),
    ({"model": "chat", "input": [-1]}, "/v1/embeddings", "/input: token ids must be non-negative", "openai_input"),
])
async def test_openai_violations(doc: Any, path: str, message: str, reason: str) -> None:
    svc = services(chat=model(protocol="openai", max_tokens=100))
    err = await refused(validate.build(svc), openai_ctx(doc, path))
    assert err.message.startswith(message), err.message
    assert failures(svc, "chat", reason) == 1


async def test_max_tokens_is_unbounded_without_a_cap() -> None:
    ctx = openai_ctx({**CHAT, "max_tokens": 1_000_000})
    await validate.build(services(chat=model(protocol="openai")))(ctx)
    assert ctx.validated_inputs is None  # passed; only v2 inputs are handed on converted


# -- JSON Schema -----------------------------------------------------------------------

async def test_schema_violation_names_pointer_and_rule(tmp_path: Path) -> None:
    svc = services(digits=model(schema=write_schema(tmp_path, DIGITS_SCHEMA)))
    stage = validate.build(svc)
    err = await refused(stage, ctx_for(V2, v2(tensor([1.0, 2.0, "3", 4.0], [4]))))
    assert err.message.startswith("/inputs/0/data/2: must be FP32")  # the protocol check speaks first
    err = await refused(stage, ctx_for(V2, v2(tensor([1.0, 2.0, 3.0, 17.0], [4]))))
    assert err.message == "/inputs/0/data/3: must be <= 16"
    assert failures(svc, "digits", "schema") == 1


@pytest.mark.parametrize("schema, doc, message", [
    ({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "number"}}}},
     {"a": [1, "two"]}, "/a/1: must be number"),
    ({"type": "object", "required": ["prompt"]}, {}, "/prompt: is required"),
    ({"type": "object", "additionalProperties": False, "properties": {"a": {}}}, {"x" * 500: 1},
     "(root): property '" + "x" * 40 + "...' is not allowed"),
    ({"type": "object", "additionalProperties": False}, {"x" * 500: 1}, "(root): has properties that are not allowed"),
    ({"type": "object", "properties": {"s": {"pattern": "^[a-z]+$"}}}, {"s": "SECRET-TOKEN-123"}, "/s: must match the pattern ^[a-z]+$"),
    ({"type": "object", "properties": {"s": {"maxLength": 3}}}, {"s": "s3cr3t-value"}, "/s: must be at most 3 characters long"),
    ({"type": "object", "properties": {"e": {"enum": ["a", "b"]}}}, {"e": "c"}, '/e: must be one of ["a","b"]'),
    ({"type": "object", "properties": {"c": {"const": 1}}}, {"c": 2}, "/c: must equal 1"),
    ({"type": "object", "properties": {"a": {"maxItems": 2}}}, {"a": [1, 2, 3]}, "/a: must have at most 2 items"),
    ({"type": "object", "properties": {"o": {"oneOf": [{"type": "string"}, {"type": "integer"}]}}}, {"o": 1.5},
     "/o: must match exactly one of the 'oneOf' schemas (it matches none)"),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, 1, "(root): must match exactly one of the 'oneOf' schemas (it matches several)"),
    ({"dependentRequired": {"a": ["b"]}}, {"a": 1}, "/b: is required"),
    ({"prefixItems": [{"type": "string"}], "items": False}, ["a", 2], "/1: is not allowed"),  # 2020-12 only
    ({"$defs": {"pos": {"type": "integer", "minimum": 1}}, "properties": {"n": {"$ref": "#/$defs/pos"}}}, {"n": 0},
     "/n: must be >= 1"),
    ({"type": "object", "unevaluatedProperties": False, "properties": {"k": {}}}, {"k": 1, "zz": 2},
     "(root): property 'zz' is not allowed"),
    ({"properties": {"a/b": {"type": "string"}, "t~": {"type": "string"}}}, {"a/b": 1}, "/a~1b: must be string"),
    ({"properties": {"m": {"format": "email"}}}, {"m": "not-an-email"}, "/m: must be a valid email"),
])
async def test_schema_messages(tmp_path: Path, schema: dict[str, Any], doc: Any, message: str) -> None:
    stage = validate.build(services(legacy=model(protocol="raw", schema=write_schema(tmp_path, schema))))
    err = await refused(stage, ctx_for(RAW, doc, model_name="legacy", path="/predict", raw=orjson.dumps(doc)))
    assert err.message.startswith(message), err.message
    assert "SECRET" not in err.message and "s3cr3t" not in err.message


async def test_raw_route_with_a_schema_parses_its_body_safely(tmp_path: Path) -> None:
    stage = validate.build(services(legacy=model(protocol="raw", schema=write_schema(tmp_path, {"type": "object"}))))
    ctx = ctx_for(RAW, None, model_name="legacy", path="/predict", raw=b'{"a": 1, "a": 2}')
    err = await refused(stage, ctx)
    assert "duplicate key" in err.message
    ctx = ctx_for(RAW, None, model_name="legacy", path="/predict", raw=b'{"a": 1}')
    await stage(ctx)
    assert ctx.json == {"a": 1} and ctx.body == b'{"a": 1}'


async def test_raw_route_without_a_schema_passes_untouched() -> None:
    stage = validate.build(services(legacy=model(protocol="raw")))
    ctx = ctx_for(RAW, None, model_name="legacy", path="/predict", raw=b"\x00 not json")
    await stage(ctx)
    assert ctx.body == b"\x00 not json" and ctx.json is None


async def test_read_routes_are_not_validated() -> None:
    stage = validate.build(services(digits=model()))
    ctx = ctx_for(READ, None, raw=b"")
    await stage(ctx)
    assert ctx.validated_inputs is None


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "schema.json:1: not valid JSON"),
    ('{"type": "nope"}', "schema.json: not a valid JSON Schema at /type"),
    ('{"$ref": "https://example.com/remote.json"}', "schema.json: cannot compile JSON Schema"),
    ('{"$ref": "#/$defs/missing"}', "schema.json: cannot compile JSON Schema"),
    ('{"properties": {"a": {"pattern": "(unclosed"}}}', "schema.json:"),
    ("[1, 2]", "schema.json: a JSON Schema must be an object or a boolean"),
    (b"\xff\xfe".decode("latin-1"), "schema.json"),
])
def test_bad_schema_file_is_a_config_error_naming_the_file(tmp_path: Path, content: str, fragment: str) -> None:
    path = write_schema(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        validate.build(services(digits=model(schema=path)))
    text = str(info.value)
    assert str(tmp_path) in text and fragment in text, text
    assert "\n" not in text



@pytest.mark.parametrize("datatype,value", [("FP64", 10**400), ("FP32", 10**39), ("FP32", -(10**400)), ("FP16", 65505)])
def test_numbers_beyond_the_datatype_are_refused_naming_the_value(datatype: str, value: int) -> None:
    from gateway.v2 import check_infer_request

    body = {"inputs": [{"name": "x", "datatype": datatype, "shape": [3], "data": [1.0, value, 2]}]}
    with pytest.raises(InvalidRequest, match=r"/inputs/0/data/1: out of range for " + datatype):
        check_infer_request(body)


def test_checked_float_inputs_are_handed_over_as_arrays() -> None:
    from gateway.v2 import check_infer_request

    arrays: dict[str, Any] = {}
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2.5], [3, 4]]},
                       {"name": "ids", "datatype": "INT64", "shape": [1], "data": [7]}]}
    check_infer_request(body, None, arrays)
    assert list(arrays) == ["x"] and arrays["x"].tolist() == [1.0, 2.5, 3.0, 4.0]
