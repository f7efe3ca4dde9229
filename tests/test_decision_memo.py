"""The policy decision memo is keyed by ``Identity.cache_key``, which each authenticator sets.

So it hits for every way of authenticating (mTLS builds a new identity per
request and still hits), and it never hands one caller another's decision,
even when two identities share a key.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable

import jwt
import pytest
import yaml
from cryptography import x509

from gateway.auth.api_keys import ApiKeyStore, generate_key, hash_key
from gateway.auth.jwt import JwtVerifier
from gateway.config import JwtConfig, MtlsAuthConfig
from gateway.metrics import Metrics
from gateway.pipeline import Identity, RequestContext
from gateway.policy.enforcer import PolicyEnforcer
from gateway.policy.store import load_policy
from gateway.request import BufferedRequest, subject_of_name
from gateway.stages.authenticate import Authenticate

SECRET = "memo-test-secret-" + "x" * 32
POLICY = {
    "roles": {"service": [], "admin": [], "analyst": []},
    "subjects": {"svc-admin": ["admin"]},
    "rules": [
        {"id": "services", "roles": ["service"], "models": ["digits"], "actions": ["*"], "effect": "allow"},
        {"id": "admins", "roles": ["admin"], "models": ["secret"], "actions": ["*"], "effect": "allow"},
        {"id": "cleared", "roles": ["analyst"], "models": ["digits"], "actions": ["*"], "effect": "allow",
         "when": "subject.clearance >= 3"},
    ],
}


def _enforcer(tmp_path: Path, metrics: Metrics) -> PolicyEnforcer:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY, sort_keys=False))
    return load_policy(path, cache_size=100, metrics=metrics).enforcer


class Built:
    """Counts how often the enforcer asked for the request attributes: once per real evaluation."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> Callable[[], dict[str, Any]]:
        def build() -> dict[str, Any]:
            self.count += 1
            return {}
        return build


def _hits(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("maas_policy_cache_total", {"result": "hit"}) or 0.0


def _mtls_ctx(subject: str) -> RequestContext:
    """A request over a connection whose verified client certificate has the RFC 4514 subject ``subject``."""
    cert = subject_of_name(x509.Name.from_rfc4514_string(subject))
    return RequestContext(BufferedRequest("GET", "/v2/models/digits", secure=True, client_subject=cert), "t", 0.0)


async def _mtls_identity(stage: Authenticate, subject: str) -> Identity:
    ctx = _mtls_ctx(subject)
    await stage(ctx)
    assert ctx.identity is not None
    return ctx.identity


# -- mTLS ---------------------------------------------------------------------------------------------


async def test_the_memo_hits_for_mtls_identities(tmp_path: Path) -> None:
    metrics = Metrics()
    stage = Authenticate(metrics, mtls=MtlsAuthConfig(roles=["service"]))
    enforcer = _enforcer(tmp_path, metrics)
    built = Built()
    identities = [await _mtls_identity(stage, "CN=svc-batch,O=Acme") for _ in range(3)]
    assert identities[0] is not identities[1]  # a new object per request: an id()-keyed memo never hit
    assert {i.cache_key for i in identities} == {"mtls:svc-batch"}
    for identity in identities:
        assert enforcer.decide_for(identity, "digits", None, "infer", built()).allowed
    assert built.count == 1  # evaluated once; the other two were memo hits
    assert _hits(metrics) == 2


async def test_two_certificates_never_share_a_decision(tmp_path: Path) -> None:
    metrics = Metrics()
    stage = Authenticate(metrics, mtls=MtlsAuthConfig(roles=["service"]))
    enforcer = _enforcer(tmp_path, metrics)
    admin = await _mtls_identity(stage, "CN=svc-admin")
    batch = await _mtls_identity(stage, "CN=svc-batch")
    assert admin.cache_key != batch.cache_key
    for _ in range(2):  # the second round is served from the memo
        assert enforcer.decide_for(admin, "secret", None, "infer", dict).allowed
        assert not enforcer.decide_for(batch, "secret", None, "infer", dict).allowed


# -- JWT ----------------------------------------------------------------------------------------------


def _token(sub: str, **claims: Any) -> str:
    payload = {"sub": sub, "exp": int(time.time()) + 300, "roles": ["analyst"], **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


@pytest.fixture
def verifier(monkeypatch: pytest.MonkeyPatch) -> JwtVerifier:
    monkeypatch.setenv("MEMO_TEST_SECRET", SECRET)
    # no token cache: every verify builds a new Identity, so a memo hit can only come from the key
    return JwtVerifier.from_config(JwtConfig(hs256_secret_env="MEMO_TEST_SECRET", algorithms=["HS256"],
                                             cache_size=0), Metrics())


def test_a_jwt_identity_is_keyed_by_the_hash_of_its_token(verifier: JwtVerifier) -> None:
    token = _token("alice")
    identity = verifier.verify_now(token)
    assert identity.cache_key == "jwt:" + hashlib.sha256(token.encode()).hexdigest()
    assert verifier.verify_now(_token("alice", clearance=1)).cache_key != identity.cache_key


def test_jwt_callers_hit_the_memo_and_are_never_confused(tmp_path: Path, verifier: JwtVerifier) -> None:
    metrics = Metrics()
    enforcer = _enforcer(tmp_path, metrics)
    cleared, uncleared = _token("alice", clearance=5), _token("alice", clearance=1)  # one subject, two claims
    built = Built()
    for _ in range(3):
        assert enforcer.decide_for(verifier.verify_now(cleared), "digits", None, "infer", built()).allowed
        assert not enforcer.decide_for(verifier.verify_now(uncleared), "digits", None, "infer", built()).allowed
    assert built.count == 2  # one evaluation per token, then memo hits


# -- API keys -----------------------------------------------------------------------------------------


def _key_store(tmp_path: Path, entries: list[dict[str, Any]]) -> ApiKeyStore:
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(entries))
    return ApiKeyStore.load(path)


def test_an_api_key_identity_is_keyed_by_its_id_and_an_edited_entry_is_not_confused(tmp_path: Path) -> None:
    metrics = Metrics()
    enforcer = _enforcer(tmp_path, metrics)
    key = generate_key()
    entry = {"id": "k1", "hash": hash_key(key), "subject": "svc-a", "roles": ["service"], "attrs": {"level": 1}}
    before = _key_store(tmp_path, [entry]).authenticate(key)
    assert before.cache_key is not None and before.cache_key.startswith("api_key:k1:")
    assert _key_store(tmp_path, [entry]).authenticate(key).cache_key == before.cache_key  # a reload, unchanged
    built = Built()
    for _ in range(2):
        assert enforcer.decide_for(before, "digits", None, "infer", built()).allowed
    assert built.count == 1
    # the security team edits the entry in place (same id, same key): the old decision must not be reused
    after = _key_store(tmp_path, [{**entry, "roles": ["analyst"]}]).authenticate(key)
    assert after.cache_key != before.cache_key
    assert not enforcer.decide_for(after, "digits", None, "infer", built()).allowed
    assert built.count == 2
    # an attr whose type alone changed compares equal in Python (True == 1) but not to a policy: a new key
    retyped = _key_store(tmp_path, [{**entry, "attrs": {"level": True}}]).authenticate(key)
    assert retyped.claims == before.claims and retyped.cache_key != before.cache_key


def test_a_shared_key_with_a_different_identity_is_a_miss_not_the_other_decision(tmp_path: Path) -> None:
    metrics = Metrics()
    enforcer = _enforcer(tmp_path, metrics)  # an authenticator bug that reuses a key must not leak a decision
    service = Identity("svc", ("service",), {"sub": "svc", "roles": ["service"]}, "api_key", cache_key="shared")
    analyst = Identity("svc", ("analyst",), {"sub": "svc", "roles": ["analyst"]}, "api_key", cache_key="shared")
    for _ in range(2):
        assert enforcer.decide_for(service, "digits", None, "infer", dict).allowed
        assert not enforcer.decide_for(analyst, "digits", None, "infer", dict).allowed


# -- without a key ------------------------------------------------------------------------------------


def test_an_identity_without_a_cache_key_is_never_memoised(tmp_path: Path) -> None:
    metrics = Metrics()
    enforcer = _enforcer(tmp_path, metrics)
    caller = Identity("svc", ("service",), {"sub": "svc", "roles": ["service"]}, "mtls")
    built = Built()
    for _ in range(3):
        assert enforcer.decide_for(caller, "digits", None, "infer", built()).allowed
    assert built.count == 3
    assert len(enforcer._by_identity) == 0
