"""Authorisation end to end: the example policy through real HTTP, and hot reload under load."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt as pyjwt
import pytest
import yaml

from tests.harness import AUDIENCE, ISSUER, Keys, eventually, gateway_config, start_gateway, start_upstream, v2_model, write_yaml
from tests.harness import error_fields

ROOT = Path(__file__).resolve().parent.parent
V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}]}
LABELS = {"digits": {"sensitivity": "internal"}, "sentiment-en": {"sensitivity": "public"},
          "churn": {"sensitivity": "internal"}, "chat": {"sensitivity": "confidential"},
          "vault": {"sensitivity": "restricted"}, "finance-forecast": {"sensitivity": "confidential"}}


def example_policy() -> dict[str, Any]:
    """policies/policy.yaml without its quotas and outputs: this test is about decisions only."""
    policy = yaml.safe_load((ROOT / "policies" / "policy.yaml").read_text())
    policy.pop("quotas", None)
    policy.pop("outputs", None)
    return policy


def models(url: str) -> dict[str, Any]:
    return {name: {**v2_model(url), "labels": labels} for name, labels in LABELS.items()}


def office_hours() -> bool:
    hour = time.gmtime().tm_hour
    return 8 <= hour < 20


# subject claims, model, action -> expected allow (None: depends on the hour, contractors only)
MATRIX: list[tuple[str, dict[str, Any], str, str, bool | None]] = [
    ("alice", {"roles": []}, "digits", "infer", True),                      # static binding: data-scientist
    ("alice", {"roles": []}, "churn", "infer", True),                       # internal label
    ("alice", {"roles": []}, "chat", "infer", False),                       # confidential
    ("alice", {"roles": []}, "chat", "read", True),                         # read via viewer, 3 levels up
    ("carol", {"roles": ["ml-lead"]}, "chat", "infer", True),
    ("carol", {"roles": ["ml-lead"]}, "vault", "infer", False),             # restricted: no clearance claim
    ("carol", {"roles": ["ml-lead"], "clearance": 5}, "vault", "infer", True),
    ("carol", {"roles": ["ml-lead"], "clearance": 4}, "vault", "infer", False),
    ("bob", {"roles": [], "clearance": 3}, "finance-forecast", "infer", False),  # needs mTLS: plain HTTP here
    ("bob", {"roles": []}, "finance-forecast", "read", True),
    ("erin", {"roles": ["analyst"]}, "sentiment-en", "infer", True),
    ("erin", {"roles": ["analyst"]}, "churn", "infer", False),
    ("erin", {"roles": ["analyst"], "employment": "staff"}, "digits", "infer", True),
    ("dave", {"roles": ["analyst"], "employment": "contractor"}, "digits", "infer", None),
    ("dave", {"roles": ["analyst"], "employment": "contractor"}, "digits", "read", None),
    ("erin", {"roles": ["analyst"], "suspended": True}, "digits", "infer", False),
    ("svc-batch", {"roles": []}, "digits", "infer", True),
    ("svc-batch", {"roles": []}, "sentiment-en", "infer", False),
    ("ian", {"roles": ["auditor"]}, "digits", "infer", False),
    ("ian", {"roles": ["auditor"]}, "digits", "read", True),
    ("nobody", {"roles": []}, "digits", "read", False),
    ("mallory", {"roles": "analyst"}, "digits", "infer", False),             # roles claim not a list
    ("mallory", {"roles": ["admin"]}, "digits", "infer", False),
]


@pytest.fixture
async def example(tmp_path: Path, keys: Keys):
    up = await start_upstream()
    gw = await start_gateway(tmp_path, keys, models=models(up.url), policy=example_policy())
    async with aiohttp.ClientSession() as session:
        yield gw, up, session
    await gw.stop()
    await up.stop()


def token(keys: Keys, sub: str, roles: Any, **claims: Any) -> str:
    """A token whose roles claim is exactly ``roles`` (even when it is not a list)."""
    if isinstance(roles, list):
        return keys.token(sub, roles, **claims)
    now = int(time.time())
    payload = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, "roles": roles, **claims}
    return pyjwt.encode(payload, keys.private_pem, algorithm="RS256", headers={"kid": keys.kid})


async def call(session: aiohttp.ClientSession, url: str, model: str, action: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
    if action == "infer":
        return await session.post(f"{url}/v2/models/{model}/infer", json=V2_BODY, headers=headers)
    return await session.get(f"{url}/v2/models/{model}", headers=headers)


async def test_decision_matrix_through_http(example, keys: Keys) -> None:
    gw, up, s = example
    for sub, claims, model, action, expected in MATRIX:
        claims = dict(claims)
        roles = claims.pop("roles")
        headers = {"Authorization": f"Bearer {token(keys, sub, roles, **claims)}"}
        if expected is None:
            expected = office_hours()
        before = len(up.seen)
        r = await call(s, gw.url, model, action, headers)
        body = await r.json()
        case = f"{sub} {claims} {model} {action}"
        if expected:
            assert r.status == 200, (case, body)
            assert len(up.seen) == before + 1, case
        else:
            assert r.status == 403, (case, body)
            assert error_fields(body) == {"type": "forbidden", "message": "denied by policy",
                                     "request_id": r.headers["X-Request-ID"]}, case
            assert len(up.seen) == before, f"denied request reached the upstream: {case}"


async def test_models_list_shows_only_readable_models(example, keys: Keys) -> None:
    gw, up, s = example
    for sub, roles, expected in [("alice", [], sorted(LABELS)), ("svc-batch", [], ["digits"]), ("nobody", [], [])]:
        r = await s.get(gw.url + "/v1/models", headers=keys.auth(sub, roles))
        assert r.status == 200
        assert sorted(m["id"] for m in (await r.json())["data"]) == expected, sub
    assert up.seen == []


async def test_decisions_are_counted_by_rule(example, keys: Keys) -> None:
    gw, up, s = example
    await call(s, gw.url, "digits", "infer", keys.auth("svc-batch", []))
    await call(s, gw.url, "chat", "infer", keys.auth("alice", []))
    async with s.get(gw.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'maas_policy_decisions_total{decision="allow",rule="batch-scores-digits"} 1.0' in text
    assert 'maas_policy_decisions_total{decision="deny",rule="default-deny"} 1.0' in text
    assert "maas_policy_loaded 1.0" in text


STRICTER = {"roles": {"analyst": []}, "rules": [
    {"id": "analysts-all", "roles": ["analyst"], "models": ["*"], "actions": ["*"], "effect": "allow"},
    {"id": "freeze-digits", "roles": ["*"], "models": ["digits"], "actions": ["*"], "effect": "deny"}]}
OPEN = {"roles": {"analyst": []}, "rules": STRICTER["rules"][:1]}


@pytest.mark.slow
async def test_hot_reload_under_load(tmp_path: Path, keys: Keys) -> None:
    from gateway.config import load_config
    from gateway.server import start

    up = await start_upstream()
    config = gateway_config(tmp_path, keys, models={"digits": v2_model(up.url), "other": v2_model(up.url)}, policy=OPEN)
    config["policy"].update({"watch": True, "watch_interval_s": 0.2})
    running = await start(load_config(write_yaml(tmp_path / "gateway.yaml", config)), port=0, admin_port=0)
    url = f"http://127.0.0.1:{running.port}"
    policy_path = Path(config["policy"]["file"])
    results: list[tuple[float, str, int]] = []
    stop = asyncio.Event()
    headers = keys.auth("alice", ["analyst"])

    async def client(model: str) -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                r = await call(s, url, model, "infer", headers)
                await r.read()
                results.append((time.monotonic(), model, r.status))

    def replace(text: str) -> float:
        tmp = policy_path.with_suffix(".new")
        tmp.write_text(text)
        tmp.replace(policy_path)
        return time.monotonic()

    tasks = [asyncio.create_task(client(m)) for m in ("digits", "digits", "other")]
    try:
        await eventually(lambda: sum(m == "digits" for _, m, _ in results) >= 10)  # the load is flowing
        assert {s for _, m, s in results if m == "digits"} == {200}
        switched = replace(yaml.safe_dump(STRICTER))
        await asyncio.sleep(2.5)  # a real gateway's file watch on the real clock: answers in the 2 s after the switch, and after
        late = [s for t, m, s in results if m == "digits" and t > switched + 2.0]
        assert late and set(late) == {403}, "stricter policy not in force within 2 s"
        first_403 = min(t for t, m, s in results if m == "digits" and s == 403)
        assert first_403 - switched < 2.0
        broken_at = replace("rules: [ {id: half")
        await asyncio.sleep(1.0)  # a real gateway's file watch: a second of answers while the file is broken
        after = [(m, s) for t, m, s in results if t > broken_at]
        assert after and {s for m, s in after if m == "digits"} == {403} and {s for m, s in after if m == "other"} == {200}
        assert running.gateway.metrics.policy_reloads.labels(result="error")._value.get() >= 1
        assert running.gateway.not_ready() == []  # /readyz stays green on a refused reload
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await running.stop()
        await up.stop()
    assert all(s < 500 for _, _, s in results), "a request failed with 5xx during reload"
    assert len(results) > 50
