"""Schemathesis drives a live gateway from its own OpenAPI document, in front of a recording upstream.

For every operation of ``GET /openapi.json`` (admin port), schemathesis
generates schema-conforming (positive) and schema-breaking (negative) requests
with a valid token, and every answer must hold:

- never a 5xx (the fake upstream always answers 200, so a 5xx is the gateway's);
- every 4xx is the JSON error shape, its type matching the status, echoing the request id;
- every 2xx came from the upstream, which received exactly the bytes sent (or, for
  an OpenAI stream, the validated object with ``include_usage`` added);
- a body that conforms to the document's schema (checked with python-jsonschema,
  not the gateway's validator) reaches the upstream, for the operations whose
  schema says everything the gateway checks (declared inputs with fixed shapes,
  the OpenAI routes, a raw path with a schema).

Bounded: a fixed number of examples per operation, derandomised (the same
examples every run), well under two minutes on a busy CI machine.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from gateway.openapi import ERRORS
from tests.harness import ALLOW_ANALYSTS, Keys, openai_model, start_gateway, start_upstream, v2_model
from tests.harness import error_fields

POSITIVE_EXAMPLES = 40
NEGATIVE_EXAMPLES = 30
FEW_EXAMPLES = 3
READ_EXAMPLES = 3  # GET operations have no body: a few examples cover them
LLM_SURFACES = ("/v1/responses", "/v1/messages", "/v1/rerank", "/v1/score", "/v1/images", "/v1/audio", "/api/")
FULLY_DESCRIBED = {  # operations whose request schema states every rule the gateway enforces
    ("POST", "/v2/models/digits/infer"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("POST", "/predict"),
}
# routes the gateway answers itself: a 2xx there reaches no upstream
GATEWAY_ANSWERED = {("GET", "/v1/models"), ("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready")}
STATUS_TYPE = {status: error_type for status, (_, error_type, _) in ERRORS.items()}

pytestmark = pytest.mark.slow


@pytest.fixture
async def live(tmp_path: Path, keys: Keys):
    (tmp_path / "digits.json").write_text(json.dumps({
        "type": "object",
        "properties": {"inputs": {"type": "array", "items": {"properties": {
            "data": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 16}}}}}},
    }))
    (tmp_path / "chat.json").write_text(json.dumps({"properties": {"temperature": {"type": "number", "minimum": 0, "maximum": 2}}}))
    (tmp_path / "legacy.json").write_text(json.dumps({
        "type": "object", "required": ["features"], "additionalProperties": False,
        "properties": {"features": {"type": "array", "maxItems": 16, "items": {"type": "number"}},
                       "explain": {"type": "boolean"}},
    }))
    up = await start_upstream()
    models = {
        "digits": {**v2_model(up.url), "schema": str(tmp_path / "digits.json"),
                   "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 8]}]},
        "sentiment": v2_model(up.url),
        "chat": {**openai_model(up.url), "schema": str(tmp_path / "chat.json"), "max_tokens": 64},
        "legacy": {"schema": str(tmp_path / "legacy.json"),
                   "backend": {"type": "http", "protocol": "raw", "upstreams": [up.url], "paths": ["/predict"]}},
    }
    gw = await start_gateway(tmp_path, keys, models=models, policy=ALLOW_ANALYSTS)
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.admin_url + "/openapi.json") as r:
            document = await r.json()
    yield gw, up, document
    await gw.stop()
    await up.stop()


# The gateway's documented contract: an integer is an integer literal (5, not 5.0), since a backend
# reading 5.0 as a float for a count or a tensor dimension would fail or misbehave. JSON Schema's
# "integer" also admits 5.0, so the oracle narrows it the same way.
StrictIntegers = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)),
)


def request_schema(document: dict[str, Any], operation: Any) -> dict[str, Any] | None:
    body = operation.definition.raw.get("requestBody")
    content = (body or {}).get("content", {}).get("application/json")
    if content is None:
        return None
    return {**content["schema"], "components": document["components"]}


def fuzz(document: dict[str, Any], gateway_url: str, token: str, upstream: Any) -> dict[str, int]:
    """Runs in a worker thread (schemathesis calls are blocking); the gateway serves from the test's loop."""
    schema = schemathesis.openapi.from_dict(document)
    ids = itertools.count()
    stats = {"calls": 0, "reached_upstream": 0, "expected_valid": 0}
    for result in schema.get_all_operations():
        operation = result.ok()
        key = (operation.method.upper(), operation.path)
        body_schema = request_schema(document, operation)
        oracle = StrictIntegers(body_schema) if body_schema is not None else None
        # a versioned path is the same operation as its unversioned twin, generate takes any object: a few each
        few = "/versions/" in key[1] or key[1].endswith(("/generate", "/generate_stream")) or key[1].startswith(
            LLM_SURFACES)  # the newer LLM surfaces (issue 16): fuzzed in full by hand, a few examples each here
        modes = [(GenerationMode.POSITIVE, (FEW_EXAMPLES if few else POSITIVE_EXAMPLES) if oracle else READ_EXAMPLES)]
        if oracle is not None:
            modes.append((GenerationMode.NEGATIVE, FEW_EXAMPLES if few else NEGATIVE_EXAMPLES))
        for mode, examples in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                request_id = f"fuzz-{next(ids)}"
                response = case.call(base_url=gateway_url, timeout=10,
                                     headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id})
                stats["calls"] += 1
                status = response.status_code
                sent = response.request.body or b""
                sent = sent.encode() if isinstance(sent, str) else sent
                where = f"{key} {mode.value} body={sent[:300]!r} -> {status} {response.content[:300]!r}"
                assert status < 500, where
                assert response.headers.get("x-request-id") == [request_id], where  # schemathesis: lower-case, lists
                if 400 <= status < 500:
                    error = error_fields(response.content)  # flat on /v2/..., nested elsewhere
                    assert error["type"] == STATUS_TYPE.get(status, error["type"]), where
                    assert error["request_id"] == request_id, where
                    assert error["message"], where
                seen = [s for s in upstream.seen if s.headers.get("X-Request-ID") == request_id]
                if 200 <= status < 300 and key not in GATEWAY_ANSWERED:
                    assert len(seen) == 1, where
                    if key[0] == "POST":
                        assert_forwarded_as_validated(key[1], sent, seen[0].body, where)
                    stats["reached_upstream"] += 1
                else:
                    assert seen == [], where
                authorised = response.request.headers.get("Authorization") == f"Bearer {token}"  # negative mode garbles it
                json_case = case.media_type in (None, "application/json") and not any(
                    h.lower() == "inference-header-content-length" for h in (case.headers or {}))  # not binary
                if (authorised and json_case and oracle is not None and key in FULLY_DESCRIBED
                        and case.body is not None and oracle.is_valid(case.body)
                        and not _duplicate_output_names(case.body)):
                    stats["expected_valid"] += 1
                    assert status == 200, f"valid per the document but refused: {where}"

            check()
    return stats


def assert_forwarded_as_validated(path: str, sent: bytes, forwarded: bytes, where: str) -> None:
    """The upstream got the validated request: the same bytes, or (OpenAI streaming) the validated
    object re-serialised with ``stream_options.include_usage`` added for token accounting."""
    if forwarded == sent:
        return
    assert path.startswith("/v1/"), f"forwarded bytes differ: {forwarded[:300]!r} {where}"
    original, upstream = json.loads(sent), json.loads(forwarded)
    assert original.get("stream") is True, where
    assert upstream.pop("stream_options", {}).get("include_usage") is True, where
    original.pop("stream_options", None)
    assert upstream == original, where


def _duplicate_output_names(body: Any) -> bool:
    """The one v2 rule a JSON Schema cannot state: requested output names are unique."""
    outputs = body.get("outputs") if isinstance(body, dict) else None
    names = [o.get("name") for o in outputs if isinstance(o, dict)] if isinstance(outputs, list) else []
    return len(names) != len(set(names))


async def test_schemathesis_against_a_live_gateway(live: Any, keys: Keys) -> None:
    gw, up, document = live
    stats = await asyncio.wait_for(asyncio.to_thread(fuzz, document, gw.url, keys.token(ttl_s=600), up), 110)
    print(f"\nschemathesis: {stats}")
    assert stats["calls"] > 200
    assert stats["expected_valid"] > 20, stats  # the generator does produce valid requests, and they pass
    assert stats["reached_upstream"] >= stats["expected_valid"]
