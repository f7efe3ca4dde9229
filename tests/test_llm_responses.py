"""The Responses API through the gateway, with the real ``openai`` client against a vLLM-like upstream.

Response ids are bound to the subject that created them (from the JSON answer or the stream's
``response.created``): the creator can retrieve, list input items, cancel and delete; anyone else,
and everyone once the record expired, gets 404 and the upstream never hears of it. Two replicas on
one Redis agree.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from tests.harness import ALLOW_ANALYSTS, Keys, gateway, openai_model, upstream
from tests.llm_fakes import RESPONSE_USAGE, Fake, Gate, _sse, response_object, vllm
from tests.quota_support import delete_prefix, unique_prefix


def client(gw: Any, keys: Keys, sub: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=keys.token(sub), max_retries=0)


def forwarded(up: Any) -> list[str]:
    return [f"{s.method} {s.path}" for s in up.seen]


async def test_creator_owns_a_json_response_and_nobody_else_sees_it(tmp_path, keys):
    async with upstream(vllm()) as up, gateway(tmp_path, keys, models={"chat": openai_model(up.url)},
                                               policy=ALLOW_ANALYSTS) as gw:
        alice, bob = client(gw, keys, "alice"), client(gw, keys, "bob")
        created = await alice.responses.create(model="chat", input="hi")
        assert created.output_text == "Hello there"
        rid = created.id
        assert (await alice.responses.retrieve(rid)).id == rid
        items = await alice.responses.input_items.list(rid)
        assert [i.id for i in items.data] == ["in_1"]
        before = len(up.seen)
        for attempt in (bob.responses.retrieve(rid), bob.responses.input_items.list(rid),
                        bob.responses.cancel(rid), bob.responses.delete(rid),
                        bob.responses.create(model="chat", input="more", previous_response_id=rid)):
            with pytest.raises(openai.NotFoundError):
                await attempt
        assert len(up.seen) == before, forwarded(up)[before:]  # not one of bob's requests was forwarded
        assert (await alice.responses.cancel(rid)).status == "cancelled"
        follow = await alice.responses.create(model="chat", input="more", previous_response_id=rid)
        assert follow.id != rid
        await alice.responses.delete(rid)
        with pytest.raises(openai.NotFoundError):  # forgotten with its deletion: answered by the gateway
            await alice.responses.retrieve(rid)
        assert forwarded(up)[-1] == f"DELETE /v1/responses/{rid}"


async def test_a_streamed_response_is_owned_from_its_created_event_and_relayed_as_it_comes(tmp_path, keys):
    gate = Gate()
    fake = Fake(gate=gate)
    async with upstream(vllm(fake)) as up, gateway(tmp_path, keys, models={"chat": openai_model(up.url)},
                                                   policy=ALLOW_ANALYSTS) as gw:
        alice, bob = client(gw, keys, "alice"), client(gw, keys, "bob")
        stream = await alice.responses.create(model="chat", input="hi", stream=True)
        events = []
        async for event in stream:
            events.append(event)
            if event.type == "response.created":
                rid = event.response.id
                # the upstream holds the rest of its stream until the first event has reached us
                assert (await alice.responses.retrieve(rid)).id == rid  # owned before the event arrived
                with pytest.raises(openai.NotFoundError):
                    await bob.responses.retrieve(rid)
                gate.opened.set()
        assert fake.held == [True]
        assert [e.type for e in events][-1] == "response.completed"
        assert events[-1].response.usage.total_tokens == RESPONSE_USAGE["total_tokens"]


async def test_unknown_malformed_and_expired_ids_are_404_for_everyone(tmp_path, keys):
    model = openai_model_with(responses_ttl_s=1)
    async with upstream(vllm()) as up, gateway(tmp_path, keys, models={"chat": model(up.url)},
                                               policy=ALLOW_ANALYSTS) as gw:
        alice = client(gw, keys, "alice")
        rid = (await alice.responses.create(model="chat", input="hi")).id
        seen = len(up.seen)
        async with aiohttp.ClientSession() as s:
            for path in ("/v1/responses/resp_9999", "/v1/responses/%00x", "/v1/responses/a%2Fb/cancel",
                         "/v1/responses/" + "x" * 300, f"/v1/responses/{rid}/unknown"):
                async with s.get(gw.url + path, headers=keys.auth("alice")) as r:
                    assert r.status in (400, 404), (path, r.status)
                    assert r.status != 404 or (await r.json())["error"]["type"] == "not_found"
            async with s.put(gw.url + f"/v1/responses/{rid}", headers=keys.auth("alice")) as r:
                assert r.status == 405
        assert len(up.seen) == seen
        await asyncio.sleep(1.2)
        with pytest.raises(openai.NotFoundError):  # past responses_ttl_s: unknown, even to its creator
            await alice.responses.retrieve(rid)
        assert len(up.seen) == seen


def openai_model_with(**model: Any) -> Any:
    def build(url: str) -> dict[str, Any]:
        return {**openai_model(url), **model}
    return build


async def test_a_denied_model_is_403_and_never_forwarded(tmp_path, keys):
    policy = {"roles": {"analyst": []}, "rules": [
        {"id": "only-chat", "roles": ["analyst"], "models": ["chat"], "actions": ["infer", "read"], "effect": "allow"}]}
    async with upstream(vllm()) as up, gateway(tmp_path, keys, models={
            "chat": openai_model(up.url), "secret": openai_model(up.url)}, policy=policy) as gw:
        alice = client(gw, keys, "alice")
        with pytest.raises(openai.PermissionDeniedError):
            await alice.responses.create(model="secret", input="hi")
        with pytest.raises(openai.PermissionDeniedError):
            await alice.responses.create(model="secret", input="hi", stream=True)
        assert up.seen == []


@pytest.mark.parametrize("body", [
    {"model": "chat", "input": 5},
    {"model": "chat", "input": "x", "max_output_tokens": 0},
    {"model": "chat", "input": "x", "stream": "yes"},
    {"model": "chat", "input": "x", "previous_response_id": 7},
    {"model": "chat", "input": "x", "conversation": {"id": 3}},
    {"model": ["chat"], "input": "x"},
])
async def test_malformed_response_requests_are_400(tmp_path, keys, body):
    async with upstream(vllm()) as up, gateway(tmp_path, keys, models={"chat": openai_model(up.url)},
                                               policy=ALLOW_ANALYSTS) as gw:
        async with aiohttp.ClientSession() as s:
            async with s.post(gw.url + "/v1/responses", json=body, headers=keys.auth("alice")) as r:
                assert r.status == 400, await r.text()
                assert (await r.json())["error"]["type"] == "invalid_request"
        assert up.seen == []


async def test_a_conversation_the_caller_does_not_own_is_404(tmp_path, keys):
    async with upstream(vllm()) as up, gateway(tmp_path, keys, models={"chat": openai_model(up.url)},
                                               policy=ALLOW_ANALYSTS) as gw:
        async with aiohttp.ClientSession() as s:
            body = {"model": "chat", "input": "x", "conversation": "conv_someone_elses"}
            async with s.post(gw.url + "/v1/responses", json=body, headers=keys.auth("bob")) as r:
                assert r.status == 404
        assert up.seen == []


async def test_two_replicas_on_one_redis_agree_on_owners(tmp_path, keys, redis_url):
    prefix = unique_prefix()
    quota = {"store": redis_url, "key_prefix": prefix}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        async with upstream(vllm()) as up, \
                gateway(tmp_path / "a", keys, models={"chat": openai_model(up.url)}, policy=ALLOW_ANALYSTS,
                        quota=quota) as one, \
                gateway(tmp_path / "b", keys, models={"chat": openai_model(up.url)}, policy=ALLOW_ANALYSTS,
                        quota=quota) as two:
            rid = (await client(one, keys, "alice").responses.create(model="chat", input="hi")).id
            stream = await client(one, keys, "alice").responses.create(model="chat", input="hi", stream=True)
            streamed = [e async for e in stream][0].response.id
            for other in (rid, streamed):
                assert (await client(two, keys, "alice").responses.retrieve(other)).id == other
                with pytest.raises(openai.NotFoundError):
                    await client(two, keys, "bob").responses.retrieve(other)
            await client(two, keys, "alice").responses.delete(rid)
            with pytest.raises(openai.NotFoundError):
                await client(one, keys, "alice").responses.retrieve(rid)
    finally:
        delete_prefix(redis_url, prefix)


async def test_an_ownership_store_that_cannot_answer_fails_closed(tmp_path, keys):
    from tests.harness import free_port

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: every call fails at once
    async with upstream(vllm()) as up, gateway(tmp_path, keys, models={"chat": openai_model(up.url)},
                                               policy=ALLOW_ANALYSTS,
                                               quota={"store": dead, "on_store_error": "allow"}) as gw:
        alice = client(gw, keys, "alice")
        created = await alice.responses.create(model="chat", input="hi")  # answered; its owner could not be kept
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + f"/v1/responses/{created.id}", headers=keys.auth("alice")) as r:
                assert r.status == 503  # never "assume it is yours"
                assert (await r.json())["error"]["type"] == "unavailable"
        assert [x.path for x in up.seen] == ["/v1/responses"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_a_conversation_the_gateway_saw_created_belongs_to_its_creator(tmp_path, keys, stream):
    async with upstream(vllm()) as up, gateway(tmp_path, keys, models={"chat": openai_model(up.url)},
                                               policy=ALLOW_ANALYSTS) as gw:
        async with aiohttp.ClientSession() as s:
            body = {"model": "chat", "input": "hi", "metadata": {"new_conversation": "yes"}, "stream": stream}
            async with s.post(gw.url + "/v1/responses", json=body, headers=keys.auth("alice")) as r:
                assert r.status == 200
                text = await r.text()
            conversation = "conv_0002"  # the fake numbers ids: resp_0001, then conv_0002
            assert conversation in text
            follow = {"model": "chat", "input": "more", "conversation": conversation}
            async with s.post(gw.url + "/v1/responses", json=follow, headers=keys.auth("bob")) as r:
                assert r.status == 404
            async with s.post(gw.url + "/v1/responses", json={**follow, "conversation": {"id": conversation}},
                              headers=keys.auth("alice")) as r:
                assert r.status == 200, await r.text()
        assert len(up.seen) == 2


async def test_redis_records_expire_with_responses_ttl(tmp_path, keys, redis_url):
    prefix = unique_prefix()
    try:
        async with upstream(vllm()) as up, gateway(tmp_path, keys, models={"chat": openai_model_with(
                responses_ttl_s=1)(up.url)}, policy=ALLOW_ANALYSTS, quota={"store": redis_url,
                                                                           "key_prefix": prefix}) as gw:
            alice = client(gw, keys, "alice")
            rid = (await alice.responses.create(model="chat", input="hi")).id
            assert (await alice.responses.retrieve(rid)).id == rid
            await asyncio.sleep(1.3)
            with pytest.raises(openai.NotFoundError):
                await alice.responses.retrieve(rid)
    finally:
        delete_prefix(redis_url, prefix)


async def test_a_pushed_stream_holds_the_created_event_until_its_id_is_claimed(tmp_path, keys, monkeypatch):
    """Streams are written from the upstream connection's callback, which cannot wait; the chunk that
    carries a response id is handed back to the relay task and leaves only once the id is the caller's.
    With a slow claim, the client must still see ``response.created`` after the claim, never before."""
    from gateway.llm.ownership import MemoryOwners

    claimed_at: list[float] = []
    claim_owner = MemoryOwners.claim_owner

    async def slow_claim(self: Any, key: str, value: str, ttl_s: int) -> bool:
        await asyncio.sleep(0.3)
        ok = await claim_owner(self, key, value, ttl_s)
        claimed_at.append(asyncio.get_running_loop().time())
        return ok

    monkeypatch.setattr(MemoryOwners, "claim_owner", slow_claim)

    async def late_first_event(request: web.Request) -> web.StreamResponse:
        """The head at once, the events later: the relay is pushing by the time ``response.created`` comes."""
        await request.read()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await asyncio.sleep(0.2)
        start = response_object("resp_late", "chat", status="in_progress")
        await out.write(_sse("response.created", {"type": "response.created", "sequence_number": 0, "response": start}))
        await asyncio.sleep(0.05)
        done = response_object("resp_late", "chat")
        await out.write(_sse("response.completed", {"type": "response.completed", "sequence_number": 1,
                                                     "response": done}))
        await out.write_eof()
        return out

    async with upstream(late_first_event) as up, gateway(tmp_path, keys, models={"chat": openai_model(up.url)},
                                                         policy=ALLOW_ANALYSTS) as gw:
        alice = client(gw, keys, "alice")
        stream = await alice.responses.create(model="chat", input="hi", stream=True)
        seen_at: dict[str, float] = {}
        async for event in stream:
            seen_at.setdefault(event.type, asyncio.get_running_loop().time())
        assert claimed_at and seen_at["response.created"] >= claimed_at[0]
        assert list(seen_at)[-1] == "response.completed"
