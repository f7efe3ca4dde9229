"""Issue 14, policy side: request.params, monitor.* and outputs entries with `when`, checked and tested as code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.errors import ConfigError
from gateway.policy.compile import compile_policy
from gateway.policy.document import load_document
from gateway.policy.enforcer import PolicyEnforcer
from gateway.policy.testing import explain, load_cases, outputs_entry, run_cases
from gateway.policy.truth import Alarms
from gateway.policy.when import WhenError, compile_when
from gateway.request_params import llm_params, v2_params

ROOT = Path(__file__).resolve().parents[1]

POLICY = """
roles: {partner: [], owner: []}
rules:
  - {id: partners, roles: [partner], models: [digits, chat], actions: [infer], effect: allow}
  - {id: no-logprobs, roles: ["*"], models: [chat], actions: [infer], effect: deny, when: "request.params.logprobs"}
  - {id: no-bias, roles: ["*"], models: [chat], actions: [infer], effect: deny, when: "request.params.logit_bias"}
  - {id: small-batches, roles: [partner], models: [digits], actions: [infer], effect: deny,
     when: "request.params.batch > 64"}
  - {id: alarmed, roles: ["*"], models: [digits], actions: [infer], effect: deny, when: "monitor.stream"}
  - {id: no-web, roles: ["*"], models: [chat], actions: [infer], effect: deny,
     when: "'web_search' in request.params.tools"}
outputs:
  - {id: partner-top1, roles: [partner], models: [digits], top_k: 1}
  - {id: alarm-degrade, roles: ["*"], models: [digits], label_only: true, noise_epsilon: 1, when: "monitor.stream"}
  - {id: night, subjects: [acme], models: [digits], label_only: true, when: "subject.tier == 'trial'"}
monitors:
  - {id: stream, roles: [partner], models: [digits], signal: low_confidence, threshold: 0.9, window: 10, alarm_rate: 0.3}
"""


def enforcer(tmp_path: Path, text: str = POLICY) -> PolicyEnforcer:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return PolicyEnforcer(compile_policy(load_document(str(path))), cache_size=100)


def decide(e: PolicyEnforcer, model: str, params: dict[str, Any], monitors: tuple[str, ...] = (),
           sub: str = "acme", **claims: Any) -> str:
    d = e.decide(subject=sub, roles=["partner"], claims={"sub": sub, "roles": ["partner"], **claims}, model=model,
                 labels=None, action="infer", request={"params": params}, monitor=Alarms(monitors))
    return d.rule if not d.allowed else "allow"


def test_request_params_in_deny_rules(tmp_path: Path) -> None:
    e = enforcer(tmp_path)
    assert decide(e, "chat", llm_params({"messages": []})) == "allow"
    assert decide(e, "chat", llm_params({"logprobs": True})) == "no-logprobs"
    assert decide(e, "chat", llm_params({"top_logprobs": 5})) == "no-logprobs"
    assert decide(e, "chat", llm_params({"logit_bias": {"50256": -100}})) == "no-bias"
    assert decide(e, "chat", llm_params({"tools": [{"type": "function", "function": {"name": "f"}}]})) == "allow"
    assert decide(e, "chat", llm_params({"tools": [{"type": "web_search"}]})) == "no-web"
    assert decide(e, "digits", v2_params(_v2(64))) == "allow"
    assert decide(e, "digits", v2_params(_v2(65))) == "small-batches"
    assert decide(e, "digits", {}) == "small-batches"  # batch unknown: a deny applies


def test_monitor_in_when_is_true_or_false_never_unknown(tmp_path: Path) -> None:
    e = enforcer(tmp_path)
    assert decide(e, "digits", {"batch": 1}, ()) == "allow"
    assert decide(e, "digits", {"batch": 1}, ("stream",)) == "alarmed"
    assert compile_when("not monitor.stream").evaluate(_facts()) is True  # absent alarm: false, not unknown


def test_decision_reading_a_monitor_is_not_memoised_per_identity(tmp_path: Path) -> None:
    from gateway.pipeline import Identity

    e = enforcer(tmp_path)
    who = Identity("acme", ("partner",), {"sub": "acme", "roles": ["partner"]}, "jwt", cache_key="jwt:x")
    request = lambda: {"params": {"batch": 1}}  # noqa: E731
    assert e.decide_for(who, "digits", None, "infer", request, Alarms()).allowed
    assert not e.decide_for(who, "digits", None, "infer", request, Alarms(["stream"])).allowed
    assert e.decide_for(who, "digits", None, "infer", request, Alarms()).allowed


def test_llm_params_spellings_and_unknowns() -> None:
    p = llm_params({"max_completion_tokens": 9, "options": {"temperature": 0.2}, "stream": True, "n": 3,
                    "tool_choice": {"type": "function", "function": {"name": "lookup"}}})
    assert p == {"n": 3, "stream": True, "logprobs": False, "logit_bias": False, "tools": [], "max_tokens": 9,
                 "temperature": 0.2, "tool_choice": "lookup"}
    p = llm_params({"options": {"num_predict": 7}})
    assert p["max_tokens"] == 7 and "temperature" not in p and "tool_choice" not in p
    assert "max_tokens" not in llm_params({}) and llm_params({})["n"] == 1
    assert v2_params(_v2(3)) == {"binary": False, "batch": 3}
    assert v2_params({"inputs": [{"name": "a", "shape": [2, 1], "parameters": {"binary_data_size": 8}},
                                 {"name": "b", "shape": [9, 1]}]}) == {"binary": True, "batch": 9}


@pytest.mark.parametrize("text, message", [
    ("request.params.logporbs", "request.params has"),
    ("request.params", "unknown attribute request.params"),
    ("monitor.a.b", "by its id alone"),
    ("'x' in subject", "needs a literal list"),
])
def test_when_refuses_bad_params_and_monitors(text: str, message: str) -> None:
    with pytest.raises(WhenError, match=message):
        compile_when(text)


def test_literal_in_list_attribute_three_valued() -> None:
    cond = compile_when("'admin' in subject.roles")
    assert cond.evaluate(_facts(roles=["admin"])) is True
    assert cond.evaluate(_facts(roles=["user"])) is False
    assert repr(cond.evaluate(_facts(roles="admin"))) == "unknown"  # not a list


def test_unknown_monitor_id_is_a_load_error_with_line(tmp_path: Path) -> None:
    text = POLICY.replace('when: "monitor.stream"}\n  - {id: night', 'when: "monitor.steam"}\n  - {id: night')
    with pytest.raises(ConfigError, match=r"policy.yaml:\d+: outputs\[1\].when: unknown monitor 'steam'"):
        enforcer(tmp_path, text)


@pytest.mark.parametrize("array, message", [
    (np.zeros((3,), dtype=np.float32), "expected a 2-D numeric array"),
    (np.array([["a", "b"]]), "expected a 2-D numeric array"),
    (np.full((2, 2), np.nan, dtype=np.float32), "NaN"),
])
def test_reference_file_is_checked_at_load(tmp_path: Path, array: np.ndarray, message: str) -> None:
    np.save(tmp_path / "ref.npy", array)
    text = ("monitors:\n  - {id: ood, signal: out_of_distribution, reference: ref.npy, distance: 3}\n")
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_document(str(tmp_path / "p.yaml"))
    (tmp_path / "q.yaml").write_text(text.replace("ref.npy", "missing.npy"))
    with pytest.raises(ConfigError, match=r"q.yaml:2: monitors\[0\].reference: cannot read"):
        load_document(str(tmp_path / "q.yaml"))


def test_outputs_entry_with_when_beats_entries_without(tmp_path: Path) -> None:
    e = enforcer(tmp_path)
    partner = {"sub": "bob", "roles": ["partner"]}
    assert outputs_entry(e, partner, "digits", {}, None)[1].id == "partner-top1"  # type: ignore[index]
    assert outputs_entry(e, partner, "digits", {"monitors": ["stream"]}, None)[1].id == "alarm-degrade"  # type: ignore[index]
    trial = {"sub": "acme", "roles": ["partner"], "tier": "trial"}
    assert outputs_entry(e, trial, "digits", {}, None)[1].id == "night"  # type: ignore[index]
    # an unknown `when` (no tier claim) does not apply
    assert outputs_entry(e, {"sub": "acme", "roles": ["partner"]}, "digits", {}, None)[1].id == "partner-top1"  # type: ignore[index]


def test_policy_cases_take_params_monitors_and_expect_outputs(tmp_path: Path) -> None:
    e = enforcer(tmp_path)
    cases = tmp_path / "cases.yaml"
    cases.write_text("""
- {name: ok, subject: {sub: bob, roles: [partner]}, model: digits, action: infer, request: {params: {batch: 2}},
   expect: allow, expect_outputs: {top_k: 1}}
- {name: alarm, subject: {sub: bob, roles: [partner]}, model: digits, action: infer,
   request: {params: {batch: 2}, monitors: [stream]}, expect: deny, rule: alarmed,
   expect_outputs: {id: alarm-degrade}}
- {name: wrong, subject: {sub: bob, roles: [partner]}, model: digits, action: infer, request: {params: {batch: 2}},
   expect: allow, expect_outputs: {label_only: true}}
- {name: none, subject: {sub: bob, roles: [owner]}, model: chat, action: infer, expect: deny, expect_outputs: {}}
""")
    results = run_cases(e, load_cases(cases))
    assert [r.passed for r in results] == [True, True, False, True]
    assert "expected outputs {'label_only': True}, got partner-top1" in results[2].failure()
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {subject: {sub: a}, model: m, action: infer, expect: allow, request: {params: {logporbs: 1}}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:1: \[0\].request.params.logporbs: unknown parameter"):
        load_cases(bad)


def test_shipped_protected_classifier_policy_passes_its_cases() -> None:
    from gateway.policy.store import load_policy

    loaded = load_policy(ROOT / "policies" / "protected-classifier.yaml", cache_size=0)
    results = run_cases(loaded.enforcer, load_cases(ROOT / "policies" / "protected-classifier.cases.yaml"))
    assert results and all(r.passed for r in results), [r.failure() for r in results if not r.passed]
    why = explain(loaded.enforcer, {"sub": "acme", "roles": ["partner"]}, "digits", "infer",
                  {"params": {"batch": 1}, "monitors": ["digits_low_confidence"]})
    assert why.decision.rule == "deny-callers-in-extraction-alarm"


def _v2(rows: int) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 64], "data": [0.0] * (rows * 64)}]}


def _facts(**claims: Any) -> Any:
    from gateway.policy.enforcer import make_facts

    return make_facts("s", [], {"sub": "s", **claims}, "m", None, {}, Alarms())
