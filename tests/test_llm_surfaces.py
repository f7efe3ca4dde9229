"""Anthropic Messages, Ollama's native API, rerank, score and images through the gateway.

With the real clients (``anthropic`` authenticating with a maas API key in ``x-api-key``,
``ollama``) against fake upstreams that answer like vLLM and Ollama: each surface is served,
streamed event by event, refused 403 for a denied model with nothing reaching the upstream; Ollama's
model-management endpoints are never forwarded and ``/api/tags`` lists only what the caller may read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import ollama
import pytest

from gateway.auth.api_keys import generate_key, hash_key
from tests.harness import ALLOW_ANALYSTS, Keys, gateway, openai_model, upstream, write_yaml
from tests.llm_fakes import MESSAGES_INPUT, MESSAGES_OUTPUT, Fake, Gate, ollama as fake_ollama, vllm

ONLY_OPEN = {"roles": {"analyst": []}, "rules": [
    {"id": "open-models", "roles": ["analyst"], "models": ["chat", "llama", "llama-*"], "actions": ["infer", "read"],
     "effect": "allow"}]}


def ollama_model(url: str, **backend: Any) -> dict[str, Any]:
    return {"backend": {"type": "http", "protocol": "ollama", "upstreams": [url], **backend}}


def api_key(tmp_path: Path, subject: str = "svc-coder") -> tuple[str, dict[str, Any]]:
    """A maas API key for ``subject`` (role analyst) and the ``auth.api_keys`` section that knows it."""
    key = generate_key()
    path = write_yaml(tmp_path / "api_keys.yaml", [{"id": "k1", "hash": hash_key(key), "subject": subject,
                                                     "roles": ["analyst"], "attrs": {}}])
    return key, {"api_keys": {"file": str(path)}}


def jwt_and_keys(keys: Keys, extra: dict[str, Any]) -> dict[str, Any]:
    return {"jwt": keys.jwt_config(), **extra}


# -- Anthropic Messages ----------------------------------------------------------------------------

async def test_messages_json_stream_and_count_tokens_with_an_api_key(tmp_path, keys):
    key, section = api_key(tmp_path)
    gate = Gate()
    fake = Fake(gate=gate)
    async with upstream(vllm(fake)) as up, gateway(tmp_path, keys, models={"chat": openai_model(up.url)},
                                                   policy=ALLOW_ANALYSTS, auth=jwt_and_keys(keys, section)) as gw:
        client = anthropic.AsyncAnthropic(api_key=key, base_url=gw.url, max_retries=0)
        fake.gate = None
        answer = await client.messages.create(model="chat", max_tokens=50,
                                              messages=[{"role": "user", "content": "hi"}])
        assert answer.content[0].text == "Hello there"  # type: ignore[union-attr]
        assert answer.usage.output_tokens == MESSAGES_OUTPUT
        counted = await client.messages.count_tokens(model="chat", messages=[{"role": "user", "content": "hi"}])
        assert counted.input_tokens == MESSAGES_INPUT
        fake.gate = gate
        texts = []
        async with client.messages.stream(model="chat", max_tokens=50,
                                          messages=[{"role": "user", "content": "hi"}]) as stream:
            async for event in stream:
                if event.type == "message_start":
                    gate.opened.set()  # the upstream sends the rest only once this event has reached us
                if event.type == "text":
                    texts.append(event.text)
            final = await stream.get_final_message()
        assert "".join(texts) == "Hello there" and fake.held == [True]
        assert final.usage.output_tokens == MESSAGES_OUTPUT
        assert all(s.headers.get("X-Api-Key") is None for s in up.seen)  # the maas key never goes upstream
        assert {s.headers.get("X-Maas-Subject") for s in up.seen} == {"svc-coder"}


async def test_messages_for_a_denied_model_are_403_and_never_forwarded(tmp_path, keys):
    key, section = api_key(tmp_path)
    async with upstream(vllm()) as up, gateway(tmp_path, keys, models={
            "chat": openai_model(up.url), "secret": openai_model(up.url)}, policy=ONLY_OPEN,
            auth=jwt_and_keys(keys, section)) as gw:
        client = anthropic.AsyncAnthropic(api_key=key, base_url=gw.url, max_retries=0)
        with pytest.raises(anthropic.PermissionDeniedError):
            await client.messages.create(model="secret", max_tokens=5, messages=[{"role": "user", "content": "x"}])
        with pytest.raises(anthropic.PermissionDeniedError):
            await client.messages.count_tokens(model="secret", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(anthropic.BadRequestError):  # max_tokens is required: it is what is reserved
            await client.post("/v1/messages", cast_to=object,
                              body={"model": "chat", "messages": [{"role": "user", "content": "x"}]})
        assert up.seen == []


# -- Ollama -------------------------------------------------------------------------------------------

async def test_ollama_chat_generate_embed_and_show(tmp_path, keys):
    gate = Gate()
    fake = Fake()
    async with upstream(fake_ollama(fake)) as up, gateway(tmp_path, keys, models={"llama": ollama_model(up.url)},
                                                           policy=ONLY_OPEN) as gw:
        client = ollama.AsyncClient(host=gw.url, headers=keys.auth("alice"))
        chat = await client.chat(model="llama", messages=[{"role": "user", "content": "hi"}])
        assert chat.message.content == "Hello" and chat.eval_count == 3
        fake.gate = gate
        parts = []
        async for part in await client.chat(model="llama", messages=[{"role": "user", "content": "hi"}], stream=True):
            parts.append(part)
            gate.opened.set()  # the rest of the NDJSON stream is held until its first line has reached us
        assert "".join(p.message.content for p in parts) == "Hello" and parts[-1].done and fake.held == [True]
        fake.gate = None
        generated = [p async for p in await client.generate(model="llama", prompt="hi", stream=True)]
        assert "".join(p.response for p in generated) == "Hello"
        assert (await client.generate(model="llama", prompt="hi")).response == "Hello"
        assert len((await client.embed(model="llama", input=["a", "b"])).embeddings) == 2
        assert (await client.embeddings(model="llama", prompt="a")).embedding == [0.1, 0.2, 0.3]
        assert (await client.show("llama")).details.family == "llama"  # type: ignore[union-attr]
        assert [s.path for s in up.seen] == ["/api/chat", "/api/chat", "/api/generate", "/api/generate",
                                             "/api/embed", "/api/embeddings", "/api/show"]
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(x["model"], x["action"], x["decision"]) for x in lines] == (
        [("llama", "infer", "allow")] * 6 + [("llama", "read", "allow")])  # each audited with its model


async def test_ollama_denied_models_tags_and_management_endpoints(tmp_path, keys):
    async with upstream(fake_ollama()) as up, gateway(tmp_path, keys, models={
            "llama": ollama_model(up.url), "llama-big": ollama_model(up.url), "secret": ollama_model(up.url),
            "chat": openai_model(up.url)}, policy=ONLY_OPEN) as gw:
        client = ollama.AsyncClient(host=gw.url, headers=keys.auth("alice"))
        for call in (client.chat(model="secret", messages=[{"role": "user", "content": "x"}]),
                     client.generate(model="secret", prompt="x"), client.embed(model="secret", input="x"),
                     client.show("secret")):
            with pytest.raises(ollama.ResponseError) as denied:
                await call
            assert denied.value.status_code == 403
        with pytest.raises(ollama.ResponseError) as wrong_protocol:  # an openai model is no Ollama model
            await client.chat(model="chat", messages=[{"role": "user", "content": "x"}])
        assert wrong_protocol.value.status_code == 404
        listed = await client.list()
        assert sorted(m.model for m in listed.models) == ["llama", "llama-big"]  # not secret, not chat
        async with aiohttp.ClientSession() as s:
            for method, path in [("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
                                 ("POST", "/api/copy"), ("DELETE", "/api/delete"), ("POST", "/api/blobs/sha256:ab"),
                                 ("HEAD", "/api/blobs/sha256:ab"), ("POST", "/api//pull"), ("POST", "/api/./pull"),
                                 ("POST", "/api/%70ull")]:
                async with s.request(method, gw.url + path, json={"model": "llama"},
                                     headers=keys.auth("alice")) as r:
                    assert r.status == 404, (method, path, r.status)
            async with s.get(gw.url + "/api/tags") as r:
                assert r.status == 401  # no credentials: nothing is listed
        assert up.seen == []


@pytest.mark.parametrize(("path", "body"), [
    ("/api/chat", {"model": "llama", "messages": "hi"}),
    ("/api/chat", {"model": "llama", "messages": [{"role": "user", "content": 5}]}),
    ("/api/generate", {"model": "llama", "prompt": ["x"]}),
    ("/api/generate", {"model": "llama", "prompt": "x", "options": {"num_predict": "many"}}),
    ("/api/embed", {"model": "llama", "input": 3}),
    ("/api/chat", {"model": 1}),
    ("/api/chat", [1, 2]),
])
async def test_malformed_ollama_requests_are_400_in_ollamas_error_shape(tmp_path, keys, path, body):
    async with upstream(fake_ollama()) as up, gateway(tmp_path, keys, models={"llama": ollama_model(up.url)},
                                                       policy=ONLY_OPEN) as gw:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + path, json=body, headers=keys.auth("alice")) as r:
                assert r.status == 400, await r.text()
                error = (await r.json())["error"]
                assert error  # a string for /api (issue 15's flat shape) or the object elsewhere
        assert up.seen == []


# -- rerank, score, images ----------------------------------------------------------------------------

async def test_rerank_score_and_images_are_authorised_by_the_body_model(tmp_path, keys):
    async with upstream(vllm()) as up, gateway(tmp_path, keys, models={
            "chat": openai_model(up.url), "secret": openai_model(up.url)}, policy=ONLY_OPEN) as gw:
        calls = [("/v1/rerank", {"query": "q", "documents": ["a", "b"]}),
                 ("/v1/score", {"text_1": "a", "text_2": ["b"]}),
                 ("/v1/images/generations", {"prompt": "a cat"})]
        async with aiohttp.ClientSession() as s:
            for path, body in calls:
                async with s.post(gw.url + path, json={"model": "chat", **body}, headers=keys.auth("alice")) as r:
                    assert r.status == 200, (path, await r.text())
                async with s.post(gw.url + path, json={"model": "secret", **body}, headers=keys.auth("alice")) as r:
                    assert r.status == 403
                async with s.post(gw.url + path, json={"model": "chat"}, headers=keys.auth("alice")) as r:
                    assert r.status == 400
                async with s.get(gw.url + path, headers=keys.auth("alice")) as r:
                    assert r.status == 405
        assert [s.path for s in up.seen] == [p for p, _ in calls]


# -- request.params from every surface's body ----------------------------------------------------------

PARAMS_POLICY = {"roles": {"analyst": []}, "rules": [
    {"id": "open", "roles": ["analyst"], "models": ["*"], "actions": ["infer", "read"], "effect": "allow"},
    {"id": "no-logprobs", "roles": ["*"], "models": ["*"], "actions": ["infer"], "effect": "deny",
     "when": "request.params.logprobs"},
    {"id": "one-choice", "roles": ["*"], "models": ["*"], "actions": ["infer"], "effect": "deny",
     "when": "request.params.n > 1"},
    {"id": "no-web", "roles": ["*"], "models": ["*"], "actions": ["infer"], "effect": "deny",
     "when": "'web_search' in request.params.tools"},
]}
WEB_TOOL_RESPONSES = [{"type": "web_search"}]
WEB_TOOL_ANTHROPIC = [{"name": "web_search", "input_schema": {"type": "object"}}]
WEB_TOOL_OLLAMA = [{"type": "function", "function": {"name": "web_search", "parameters": {}}}]
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/responses", {"input": "hi"}, 200),
    ("/v1/responses", {"input": "hi", "tools": WEB_TOOL_RESPONSES}, 403),
    ("/v1/responses", {"input": "hi", "top_logprobs": 5}, 403),
    ("/v1/messages", {"messages": USER, "max_tokens": 5}, 200),
    ("/v1/messages", {"messages": USER, "max_tokens": 5, "tools": WEB_TOOL_ANTHROPIC}, 403),
    ("/api/chat", {"messages": USER, "stream": False}, 200),
    ("/api/chat", {"messages": USER, "stream": False, "tools": WEB_TOOL_OLLAMA}, 403),
    ("/api/chat", {"messages": USER, "stream": False, "logprobs": True}, 403),
    ("/api/generate", {"prompt": "hi", "stream": False, "logprobs": True}, 403),
    ("/v1/chat/completions", {"messages": USER, "n": 2}, 403),
])
async def test_request_params_rules_hold_on_every_surface(tmp_path, keys, path, body, status):
    handler = fake_ollama() if path.startswith("/api/") else vllm()
    protocol = "ollama" if path.startswith("/api/") else "openai"
    async with upstream(handler) as up, gateway(tmp_path, keys, models={"m": {"backend": {
            "type": "http", "protocol": protocol, "upstreams": [up.url]}}}, policy=PARAMS_POLICY) as gw:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + path, json={"model": "m", **body}, headers=keys.auth("alice")) as r:
                assert r.status == status, await r.text()
        assert len(up.seen) == (1 if status == 200 else 0)


async def test_a_smaller_model_body_limit_holds_on_json_routes(tmp_path, keys):
    async with upstream(vllm()) as up, gateway(tmp_path, keys, models={
            "chat": {**openai_model(up.url), "max_body_bytes": 300}}, policy=ONLY_OPEN) as gw:
        async with aiohttp.ClientSession() as s:
            body = {"model": "chat", "query": "q" * 400, "documents": ["a"]}
            async with s.post(gw.url + "/v1/rerank", json=body, headers=keys.auth("alice")) as r:
                assert r.status == 413
                assert (await r.json())["error"]["type"] == "payload_too_large"
            async with s.post(gw.url + "/v1/rerank", json={**body, "query": "q"}, headers=keys.auth("alice")) as r:
                assert r.status == 200
        assert len(up.seen) == 1
