"""The OpenAPI document: valid OpenAPI 3.1, faithful to the config, served and printed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_openapi

from gateway import openapi
from gateway.config import load_config
from gateway.errors import ConfigError
from tests import harness
from tests.harness import ALLOW_ANALYSTS, Keys, write_yaml

DIGITS_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://example.test/digits.json",
    "$defs": {"pixel": {"type": "number", "minimum": 0, "maximum": 16}},
    "type": "object",
    "properties": {"inputs": {"type": "array", "items": {"properties": {"data": {"type": "array", "items": {"$ref": "#/$defs/pixel"}}}}}},
}


def write_config(tmp_path: Path, keys: Keys, *, api_keys: bool = True, **models: Any) -> Path:
    (tmp_path / "schemas").mkdir(parents=True, exist_ok=True)
    (tmp_path / "schemas" / "digits.json").write_text(json.dumps(DIGITS_SCHEMA))
    (tmp_path / "schemas" / "chat.json").write_text(json.dumps({"properties": {"temperature": {"maximum": 1}}}))
    (tmp_path / "keys.yaml").write_text("[]\n")
    auth: dict[str, Any] = {"jwt": keys.jwt_config()}
    if api_keys:
        auth["api_keys"] = {"file": "keys.yaml"}
    config = {
        "server": {"host": "127.0.0.1", "port": 8443},
        "auth": auth,
        "models": models or {
            "digits": {"schema": "schemas/digits.json",
                       "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64]}],
                       "backend": {"type": "http", "protocol": "v2", "upstreams": ["http://127.0.0.1:9"]}},
            "sentiment-v1": {"backend": {"type": "http", "protocol": "v2", "upstreams": ["http://127.0.0.1:9"]}},
            "chat": {"schema": "schemas/chat.json", "max_tokens": 256,
                     "backend": {"type": "http", "protocol": "openai", "upstreams": ["http://127.0.0.1:9"]}},
            "tiny-llm": {"backend": {"type": "http", "protocol": "openai", "upstreams": ["http://127.0.0.1:9"]}},
            "legacy": {"schema": "schemas/digits.json",
                       "backend": {"type": "http", "protocol": "raw", "upstreams": ["http://127.0.0.1:9"],
                                   "paths": ["/predict", "/batch/*"]}},
            "blob": {"backend": {"type": "http", "protocol": "raw", "upstreams": ["http://127.0.0.1:9"],
                                 "paths": ["/upload"]}},
        },
    }
    return write_yaml(tmp_path / "gateway.yaml", config)


@pytest.fixture
def document(tmp_path: Path, keys: Keys) -> dict[str, Any]:
    return openapi.build_document(load_config(write_config(tmp_path, keys)))


def resolve(document: dict[str, Any], ref: str) -> Any:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def request_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    """The request body schema of ``POST path`` as a standalone JSON Schema (refs resolve into the document)."""
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return {**schema, "$defs": {}, "components": document["components"]}


def is_valid(document: dict[str, Any], path: str, body: Any) -> bool:
    validator = jsonschema.Draft202012Validator(request_schema(document, path))
    return validator.is_valid(body)


def test_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"] == "3.1.0"
    validate_openapi(document)


def test_routes_per_model_protocol(document: dict[str, Any]) -> None:
    paths = document["paths"]
    for model in ("digits", "sentiment-v1"):
        assert "post" in paths[f"/v2/models/{model}/infer"]
        assert "get" in paths[f"/v2/models/{model}"] and "get" in paths[f"/v2/models/{model}/ready"]
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert "post" in paths[route]
    assert "get" in paths["/v1/models"]
    assert "post" in paths["/predict"] and "post" in paths["/upload"]
    assert "/batch/*" not in paths and document["x-maas-raw-path-patterns"] == ["/batch/*"]
    assert not any(p.startswith("/v2/models/chat") for p in paths)  # openai models get no v2 routes
    assert document["servers"] == [{"url": "http://127.0.0.1:8443"}]


def test_error_responses_carry_the_json_error_shape(document: dict[str, Any]) -> None:
    responses = document["paths"]["/v2/models/digits/infer"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "413", "415", "429", "502", "503", "504"} <= set(responses)
    error_schema = document["components"]["schemas"]["Error"]
    for status, ref in responses.items():
        if status == "200":
            continue
        response = resolve(document, ref["$ref"])
        assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    body = {"error": {"type": "invalid_request", "message": "/inputs: is required", "request_id": "abc-1"}}
    jsonschema.validate(body, error_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"error": {"type": "invalid_request"}}, error_schema)
    assert "Retry-After" in document["components"]["responses"]["RateLimited"]["headers"]
    assert "WWW-Authenticate" in document["components"]["responses"]["Unauthenticated"]["headers"]


def test_security_schemes_follow_the_config(tmp_path: Path, keys: Keys, document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                     "description": "A JWT from the identity provider or an API key (mk_...)"}
    assert schemes["apiKeyAuth"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert document["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}]
    jwt_only = openapi.build_document(load_config(write_config(tmp_path / "jwt", keys, api_keys=False)))
    assert set(jwt_only["components"]["securitySchemes"]) == {"bearerAuth"}


def test_model_schema_is_inlined_with_working_refs(document: dict[str, Any]) -> None:
    inlined = document["components"]["schemas"]["model.digits"]
    assert "$id" not in inlined and "$schema" not in inlined
    ref = inlined["properties"]["inputs"]["items"]["properties"]["data"]["items"]["$ref"]
    assert ref == "#/components/schemas/model.digits/$defs/pixel"
    assert resolve(document, ref) == {"type": "number", "minimum": 0, "maximum": 16}


def test_declared_inputs_pin_the_v2_request(document: dict[str, Any]) -> None:
    path = "/v2/models/digits/infer"
    good = {"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
    assert is_valid(document, path, good)
    assert not is_valid(document, path, {"inputs": [{**good["inputs"][0], "data": [1.0] * 63}]})
    assert not is_valid(document, path, {"inputs": [{**good["inputs"][0], "name": "other"}]})
    assert not is_valid(document, path, {"inputs": [{**good["inputs"][0], "data": [17.0] * 64}]})  # model schema
    assert not is_valid(document, path, {"inputs": [good["inputs"][0], good["inputs"][0]]})
    generic = {"inputs": [{"name": "x", "shape": [2], "datatype": "INT8", "data": [1, 2]}]}
    assert is_valid(document, "/v2/models/sentiment-v1/infer", generic)
    assert not is_valid(document, "/v2/models/sentiment-v1/infer", {"inputs": []})


def test_openai_requests_per_model(document: dict[str, Any]) -> None:
    chat = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    route = "/v1/chat/completions"
    assert is_valid(document, route, chat)
    assert is_valid(document, route, {**chat, "model": "tiny-llm", "max_tokens": 100_000})
    assert not is_valid(document, route, {**chat, "max_tokens": 257})  # chat's cap
    assert not is_valid(document, route, {**chat, "temperature": 2})  # chat's own schema
    assert not is_valid(document, route, {**chat, "model": "unknown"})
    assert not is_valid(document, route, {**chat, "model": ["chat"]})
    assert is_valid(document, "/v1/embeddings", {"model": "tiny-llm", "input": [[1, 2], [3]]})
    assert not is_valid(document, "/v1/completions", {"model": "tiny-llm"})


def test_raw_paths_without_schema_take_any_body(document: dict[str, Any]) -> None:
    upload = document["paths"]["/upload"]["post"]
    assert upload["requestBody"] == {"required": False, "content": {"*/*": {"schema": {}}}}
    assert "415" not in upload["responses"]
    assert document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/model.legacy"}


def test_torch_models_speak_v2(tmp_path: Path, keys: Keys) -> None:
    from gateway.plugins import backends_for

    torch = {"backend": {"type": "torch", "path": "digits.safetensors"}}
    config = load_config(write_config(tmp_path, keys, d=torch))
    assert openapi.protocol_of(backends_for(config)["d"]) == "v2"
    assert "/v2/models/d/infer" in openapi.build_document(config)["paths"]


def test_model_names_that_are_not_component_names(tmp_path: Path, keys: Keys) -> None:
    up = {"backend": {"type": "http", "protocol": "v2", "upstreams": ["http://127.0.0.1:9"]}}
    document = openapi.build_document(load_config(write_config(tmp_path, keys, **{"a:b": up, "a_b": up, "ü": up})))
    validate_openapi(document)
    assert {"/v2/models/a:b/infer", "/v2/models/a_b/infer", "/v2/models/%C3%BC/infer"} <= set(document["paths"])


def test_bad_schema_file_is_a_config_error(tmp_path: Path, keys: Keys) -> None:
    path = write_config(tmp_path, keys)
    (tmp_path / "schemas" / "chat.json").write_text("{oops")
    with pytest.raises(ConfigError, match=r"chat\.json:1: not valid JSON"):
        openapi.build_document(load_config(path))


def test_cli_prints_the_document(tmp_path: Path, keys: Keys, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    path = write_config(tmp_path, keys)
    assert main(["openapi", "-c", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    validate_openapi(printed)
    assert "/v2/models/digits/infer" in printed["paths"]
    out = tmp_path / "openapi.json"
    assert main(["openapi", "-c", str(path), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == printed


def test_cli_bad_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["openapi", "-c", str(tmp_path / "missing.yaml")]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.yaml" in err


def test_register_adds_the_command() -> None:
    parser = argparse.ArgumentParser()
    openapi.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["openapi", "-c", "x.yaml"])
    assert args.config == "x.yaml" and args.func is openapi._command


async def test_served_on_the_admin_port(tmp_path: Path, keys: Keys) -> None:
    async with (harness.upstream() as up,
                harness.gateway(tmp_path, keys, models={"digits": {"backend": {"type": "http", "protocol": "v2",
                                                                              "upstreams": [up.url]}}},
                                policy=ALLOW_ANALYSTS) as gw):
        async with aiohttp.ClientSession() as session:
            r = await session.get(gw.admin_url + "/openapi.json")
            assert r.status == 200 and r.content_type == "application/json"
            document = await r.json()
            r = await session.get(gw.url + "/openapi.json", headers=keys.auth())
            assert r.status == 404  # the public port does not serve it
    validate_openapi(document)
    assert "/v2/models/digits/infer" in document["paths"]


def test_v2_surface_binary_versions_generate_and_server(document: dict[str, Any]) -> None:
    paths = document["paths"]
    infer = paths["/v2/models/digits/infer"]["post"]
    assert "application/octet-stream" in infer["requestBody"]["content"]
    assert "application/octet-stream" in infer["responses"]["200"]["content"]
    assert [p["name"] for p in infer["parameters"]] == ["Inference-Header-Content-Length"]
    versioned = paths["/v2/models/digits/versions/{version}/infer"]["post"]
    assert [p["name"] for p in versioned["parameters"]] == ["version", "Inference-Header-Content-Length"]
    for tail in ("", "/ready", "/generate", "/generate_stream"):
        assert "/v2/models/digits" + tail in paths and "/v2/models/digits/versions/{version}" + tail in paths
    stream = paths["/v2/models/digits/generate_stream"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in stream
    for path in ("/v2", "/v2/health/live", "/v2/health/ready"):
        assert set(paths[path]) == {"get"}
    error = document["components"]["schemas"]["Error"]
    jsonschema.validate({"error": "unknown model", "type": "not_found", "request_id": "r-1"}, error)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"error": "x", "type": "not_found"}, error)
