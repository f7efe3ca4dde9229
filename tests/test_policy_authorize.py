"""The authorise stage: decision on the context, 403 without rule contents, metrics, shadow logging."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml

from gateway.config import ModelConfig, PolicyConfig
from gateway.errors import Forbidden
from gateway.metrics import Metrics
from gateway.pipeline import Identity, RequestContext, Route, RouteKind
from gateway.policy.store import PolicyStore
from gateway.request import BufferedRequest, CertificateSubject
from gateway.stages.authorize import Authorize, utc_hour
from gateway.typedyaml import Section, Source

POLICY = {
    "roles": {"analyst": [], "lead": ["analyst"]},
    "rules": [
        {"id": "analysts-digits", "roles": ["analyst"], "models": ["digits"], "actions": ["infer", "read"],
         "effect": "allow"},
        {"id": "leads-internal", "roles": ["lead"], "models": ["*"], "actions": ["*"], "effect": "allow",
         "when": "model.labels.sensitivity == 'internal' and request.method == 'POST'"},
        {"id": "secret-needs-mtls", "roles": ["*"], "models": ["secret"], "actions": ["*"], "effect": "deny",
         "when": "not request.mtls"},
        {"id": "trial", "roles": ["*"], "models": ["digits"], "actions": ["infer"], "effect": "deny",
         "when": "subject.clearance < 2", "mode": "shadow"},
    ],
}


def model(name: str, **labels: str) -> ModelConfig:
    return ModelConfig(backend=Section({"type": "http"}, "backend", Source("x")), labels=labels, name=name)


MODELS = {"digits": model("digits"), "chat": model("chat", sensitivity="internal"), "secret": model("secret")}


def ctx_for(roles: Any, model_name: str | None, *, action: str = "infer", method: str = "POST", mtls: bool = False,
            **claims: Any) -> RequestContext:
    request = BufferedRequest(method, f"/v2/models/{model_name}/infer", peer="10.0.0.1", secure=mtls,
                              client_subject=CertificateSubject((("CN", "u"),)) if mtls else None)
    ctx = RequestContext(request, "req-1", time.monotonic())
    ctx.path = request.path
    ctx.route = Route(RouteKind.V2_INFER, action, model_name, json_body=True)
    ctx.model_name = model_name
    ctx.model = MODELS.get(model_name) if model_name else None
    ctx.identity = Identity("u", roles, MappingProxyType({"sub": "u", "roles": roles, **claims}), "jwt")
    return ctx


@pytest.fixture
async def stage(tmp_path: Path):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))
    metrics = Metrics()
    store = PolicyStore(PolicyConfig(file=path, watch=False), metrics)
    await store.start()
    yield Authorize(store, metrics)
    await store.close()


async def test_allow_puts_the_decision_on_the_context(stage: Authorize) -> None:
    ctx = ctx_for(("analyst",), "digits")
    await stage(ctx)
    assert ctx.decision is not None and ctx.decision.allowed and ctx.decision.rule == "analysts-digits"
    assert stage.metrics.registry.get_sample_value("maas_policy_decisions_total", {"rule": "analysts-digits", "decision": "allow"}) == 1


async def test_deny_raises_forbidden_without_rule_contents(stage: Authorize) -> None:
    ctx = ctx_for(("analyst",), "secret")
    with pytest.raises(Forbidden) as info:
        await stage(ctx)
    assert info.value.status == 403 and info.value.message == "denied by policy"
    assert ctx.decision is not None and ctx.decision.rule == "secret-needs-mtls"
    assert stage.metrics.registry.get_sample_value("maas_policy_decisions_total", {"rule": "secret-needs-mtls", "decision": "deny"}) == 1


async def test_request_attributes_reach_conditions(stage: Authorize) -> None:
    await stage(ctx_for(("lead",), "chat"))
    with pytest.raises(Forbidden):
        await stage(ctx_for(("lead",), "chat", method="PUT"))
    with pytest.raises(Forbidden):  # deny: mtls false
        await stage(ctx_for(("lead",), "secret"))
    with pytest.raises(Forbidden):  # mtls true: the deny is lifted, but nothing allows the unlabelled model
        await stage(ctx_for(("lead",), "secret", mtls=True))


async def test_shadow_rules_are_counted_and_logged_not_enforced(stage: Authorize, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="maas.policy")
    ctx = ctx_for(("analyst",), "digits", clearance=1)
    await stage(ctx)
    assert ctx.decision is not None and ctx.decision.allowed and ctx.decision.shadow == (("trial", False),)
    assert stage.metrics.policy_shadow.labels(rule="trial", would="deny")._value.get() == 1
    assert any("shadow rule trial would deny" in r.getMessage() and "req-1" in r.getMessage() for r in caplog.records)


async def test_roles_that_are_not_a_list_are_no_roles(stage: Authorize) -> None:
    # never an allow: the policy refuses it, or (the native build, gateway/native.py) the typed call refuses a
    # str where the roles' tuple belongs
    with pytest.raises((Forbidden, TypeError)):
        await stage(ctx_for("analyst", "digits"))  # type: ignore[arg-type]


async def test_no_policy_denies_everything() -> None:
    stage = Authorize(None, Metrics())
    ctx = ctx_for(("analyst",), "digits")
    with pytest.raises(Forbidden):
        await stage(ctx)
    assert ctx.decision is not None and ctx.decision.rule == "default-deny"


async def test_missing_identity_or_model_denies(stage: Authorize) -> None:
    ctx = ctx_for(("analyst",), "digits")
    ctx.identity = None
    with pytest.raises(Forbidden):
        await stage(ctx)
    with pytest.raises(Forbidden):
        await stage(ctx_for(("analyst",), None))


async def test_allowed_models_lists_only_readable_models(stage: Authorize) -> None:
    assert stage.allowed_models(ctx_for(("analyst",), None), MODELS) == ["digits"]
    assert stage.allowed_models(ctx_for(("lead",), None, method="POST"), MODELS) == ["digits", "chat"]
    assert stage.allowed_models(ctx_for((), None), MODELS) == []


def test_utc_hour() -> None:
    assert utc_hour() == time.gmtime().tm_hour or utc_hour() == (time.gmtime().tm_hour + 1) % 24
