"""Unit checks of gateway.llm: routes, surfaces (estimate, usage), stream watchers, ownership, multipart."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import orjson
import pytest

from gateway.errors import InvalidRequest, MethodNotAllowed, NotFound, UnsupportedMediaType
from gateway.llm import multipart
from gateway.llm.events import MessagesWatcher, OllamaWatcher, ResponsesWatcher, WatchedStream
from gateway.llm.ownership import MemoryOwners, Owners
from gateway.llm.surfaces import SURFACES, answer_usage, ollama_usage
from gateway.pipeline import RouteKind
from gateway.routing import Router
from gateway.usage import Usage

ROUTER = Router({"chat": "openai", "llama": "ollama"}, {"legacy": ["/api/*", "/predict"]})


@pytest.mark.parametrize(("method", "path", "kind", "action"), [
    ("POST", "/v1/responses", RouteKind.OPENAI, "infer"),
    ("POST", "/v1/messages", RouteKind.OPENAI, "infer"),
    ("POST", "/v1/messages/count_tokens", RouteKind.OPENAI, "infer"),
    ("POST", "/v1/rerank", RouteKind.OPENAI, "infer"),
    ("POST", "/v1/audio/transcriptions", RouteKind.OPENAI, "infer"),
    ("POST", "/api/chat", RouteKind.OLLAMA, "infer"),
    ("POST", "/api/show", RouteKind.OLLAMA, "read"),
    ("GET", "/api/tags", RouteKind.OLLAMA_TAGS, "read"),
    ("GET", "/v1/responses/resp_1", RouteKind.RESPONSE_ID, "read"),
    ("GET", "/v1/responses/resp_1/input_items", RouteKind.RESPONSE_ID, "read"),
    ("DELETE", "/v1/responses/resp_1", RouteKind.RESPONSE_ID, "infer"),
    ("POST", "/v1/responses/resp_1/cancel", RouteKind.RESPONSE_ID, "infer"),
])
def test_routes(method: str, path: str, kind: RouteKind, action: str) -> None:
    route = ROUTER.match(method, path)
    assert (route.kind, route.action, route.model) == (kind, action, None)
    assert route.json_body is (kind in (RouteKind.OPENAI, RouteKind.OLLAMA) and "audio" not in path)


@pytest.mark.parametrize(("method", "path", "error"), [
    ("POST", "/api/pull", NotFound), ("POST", "/api/push", NotFound), ("POST", "/api/create", NotFound),
    ("POST", "/api/copy", NotFound), ("DELETE", "/api/delete", NotFound), ("POST", "/api/blobs/sha256:1", NotFound),
    ("GET", "/api/chat", MethodNotAllowed), ("POST", "/v1/responses/r/cancel/x", NotFound),
    ("GET", "/v1/responses/r/cancel", MethodNotAllowed), ("PUT", "/v1/responses/r", MethodNotAllowed),
    ("GET", "/v1/responses/", NotFound), ("POST", "/api/tags", MethodNotAllowed),
])
def test_refused_routes_even_under_a_raw_glob(method: str, path: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        ROUTER.match(method, path)


def test_the_serving_protocol_is_checked() -> None:
    assert ROUTER.serves(RouteKind.OLLAMA, "llama") and not ROUTER.serves(RouteKind.OLLAMA, "chat")
    assert ROUTER.serves(RouteKind.OPENAI, "chat") and not ROUTER.serves(RouteKind.OPENAI, "llama")


def test_estimates_per_surface() -> None:
    s = SURFACES
    assert s["/v1/responses"].estimate({"input": "abcdefgh", "max_output_tokens": 10}, 99, None) == 12
    assert s["/v1/responses"].estimate({"input": [{"role": "user", "content": [{"type": "input_text",
                                                                                  "text": "abcd"}]}]}, 50, 20) == 21
    assert s["/v1/messages"].estimate({"system": "abcd", "messages": [{"role": "user", "content": "abcd"}],
                                       "max_tokens": 7}, 99, None) == 9
    assert s["/api/chat"].estimate({"messages": [{"role": "user", "content": "abcd"}],
                                    "options": {"num_predict": 5}}, 99, None) == 6
    assert s["/api/chat"].estimate({"messages": []}, 30, 10) == 10
    assert s["/api/embed"].estimate({"input": ["abcd", "efgh"]}, 99, None) == 2
    assert s["/v1/messages/count_tokens"].estimate({"messages": []}, 99, None) == 0
    hostiles: list[Any] = [None, [], {"input": {"a": [[[[[["deep"]]]]]]}}, {"max_output_tokens": 10**30, "input": 5}]
    for hostile in hostiles:
        for surface in s.values():
            assert surface.estimate(hostile, 10, 100) >= 0


def test_usage_of_answers() -> None:
    assert answer_usage({"usage": {"input_tokens": 3, "output_tokens": 4}}) == 7
    assert answer_usage({"usage": {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 2}}) == 9
    assert answer_usage({"usage": {"prompt_tokens": 3, "total_tokens": 8}}) == 8
    assert answer_usage({"usage": None}) is None and answer_usage([]) is None
    assert ollama_usage({"done": True, "prompt_eval_count": 2, "eval_count": 5}) == 7
    assert ollama_usage({"done": True}) is None


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_watchers_read_usage_and_ids_across_chunk_boundaries() -> None:
    created = b'event: response.created\ndata: ' + orjson.dumps(
        {"type": "response.created", "response": {"id": "resp_7", "usage": None}}) + b"\n\n"
    done = b'data: ' + orjson.dumps({"type": "response.completed", "response": {
        "id": "resp_7", "usage": {"input_tokens": 5, "output_tokens": 6, "total_tokens": 11}}}) + b"\n\n"
    delta = b'data: {"type":"response.output_text.delta","delta":"say \\"usage\\": response.created"}\n\n'
    whole = created + delta + done
    usage = Usage(answered=True)
    claimed: list[str] = []

    async def claim(rid: str) -> None:
        claimed.append(rid)

    pieces = [whole[i:i + 7] for i in range(0, len(whole), 7)]
    relayed = [c async for c in WatchedStream(_chunks(*pieces), ResponsesWatcher(usage), claim)]
    assert relayed == pieces and claimed == ["resp_7"] and usage.total_tokens == 11

    usage = Usage(answered=True)
    start = b'data: {"type":"message_start","message":{"usage":{"input_tokens":10,"output_tokens":1}}}\n\n'
    delta2 = b'data: {"type":"message_delta","delta":{},"usage":{"output_tokens":9}}\n\n'
    [c async for c in WatchedStream(_chunks(start, delta2), MessagesWatcher(usage))]
    assert usage.total_tokens == 19

    usage = Usage(answered=True)
    last = b'{"done":true,"prompt_eval_count":4,"eval_count":3}'  # no final newline
    [c async for c in WatchedStream(_chunks(b'{"done":false,"response":"x"}\n', last), OllamaWatcher(usage))]
    assert usage.total_tokens == 7


async def test_memory_owners_keep_the_first_owner_and_expire() -> None:
    owners = Owners(MemoryOwners())
    assert await owners.claim("response", "r1", "alice", "chat", 60)
    assert not await owners.claim("response", "r1", "bob", "chat", 60)  # never moved to another subject
    assert await owners.claim("response", "r1", "alice", "chat", 60)  # the same owner again: fine
    assert await owners.owner("response", "r1") == ("alice", "chat")
    assert await owners.owner("response", "r2") is None
    await owners.forget("response", "r1")
    assert await owners.owner("response", "r1") is None
    await owners.claim("response", "r3", "alice", "chat", 1)
    await asyncio.sleep(1.05)
    assert await owners.owner("response", "r3") is None


FORM = (b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        b'Content-Type: audio/wav\r\n\r\nRIFF--b\r\n\r\n--bxx'  # file bytes with boundary-like pieces
        b'\r\n--b\r\nContent-Disposition: form-data; name="language"\r\n\r\nen\r\n--b--\r\n')


def test_multipart_fields_sniffing_and_rewrite() -> None:
    assert multipart.boundary_of('multipart/form-data; boundary="b"') == b"b"
    with pytest.raises(UnsupportedMediaType):
        multipart.boundary_of("application/json")
    with pytest.raises(InvalidRequest):
        multipart.boundary_of("multipart/form-data")
    fields = multipart.form_fields(FORM, b"b")
    assert fields == {"model": "whisper", "language": "en", "__files__": ["file"]}
    sniffer = multipart.ModelSniffer(b"b")
    assert sniffer.feed(FORM[:40]) is None
    assert sniffer.feed(FORM[:80]) == "whisper"
    renamed = multipart.replace_field(FORM, b"b", "model", "openai/whisper-large-v3")
    assert multipart.form_fields(renamed, b"b")["model"] == "openai/whisper-large-v3"
    assert FORM[FORM.index(b"RIFF"):] == renamed[renamed.index(b"RIFF"):]
    twice = FORM.replace(b"--b--", b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nsecret\r\n--b--')
    as_file = FORM.replace(b"--b--", b'--b\r\nContent-Disposition: form-data; name="model"; filename="m"\r\n\r\n'
                                     b'secret\r\n--b--')
    for broken in (twice, as_file, b"", b"--b", b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--",
                   b"--b\r\nno headers end", b"--c\r\n", b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nx'):
        with pytest.raises(InvalidRequest):
            multipart.form_fields(broken, b"b")


def test_openapi_documents_the_llm_routes(tmp_path: Any) -> None:
    from gateway.llm.openapi_paths import llm_paths

    items = llm_paths(["chat"], ["llama"])
    assert {"/v1/responses", "/v1/responses/{id}", "/v1/messages", "/api/chat", "/api/tags",
            "/v1/audio/transcriptions"} <= set(items)
    assert items["/api/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"][
        "model"] == {"enum": ["llama"]}
    assert llm_paths([], []) == {}


@pytest.mark.parametrize(("model", "message"), [
    ({"responses_ttl_s": 0}, "responses_ttl_s: must be positive"),
    ({"max_body_bytes": 0}, "max_body_bytes: must be positive"),
    ({"backend": {"type": "http", "protocol": "ollama", "upstreams": ["http://127.0.0.1:1"], "paths": ["/x"]}},
     "paths: only for protocol raw"),
])
def test_model_settings_are_checked(tmp_path: Any, keys: Any, model: dict[str, Any], message: str) -> None:
    from gateway.config import load_config
    from gateway.errors import ConfigError
    from gateway.plugins import plug
    from tests.harness import gateway_config, openai_model, write_yaml

    config = gateway_config(tmp_path, keys, models={"m": {**openai_model("http://127.0.0.1:1"), **model}},
                            policy=None)
    with pytest.raises(ConfigError) as failed:
        plug(load_config(write_yaml(tmp_path / "gateway.yaml", config)))
    assert message in str(failed.value)
