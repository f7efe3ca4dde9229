"""Decisions made by real Casbin from YAML policies: semantics, deciding rules, shadow rules, the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.metrics import Metrics
from gateway.pipeline import Decision, Identity
from gateway.policy.enforcer import PolicyEnforcer
from gateway.policy.store import load_policy


def enforcer(tmp_path: Path, policy: dict[str, Any], *, cache_size: int = 100, metrics: Metrics | None = None) -> PolicyEnforcer:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return load_policy(path, cache_size=cache_size, metrics=metrics).enforcer


def decide(e: PolicyEnforcer, sub: str = "u", roles: Any = (), *, model: str = "digits", action: str = "infer",
           labels: dict | None = None, request: dict | None = None, **claims: Any) -> Decision:
    return e.decide(subject=sub, roles=roles, claims={"sub": sub, "roles": roles, **claims}, model=model,
                    labels=labels, action=action, request=request or {})


def allow(id: str, roles: list[str], models: list[str] = ["*"], actions: list[str] = ["*"], **extra: Any) -> dict:
    return {"id": id, "roles": roles, "models": models, "actions": actions, "effect": "allow", **extra}


def deny(id: str, roles: list[str], models: list[str] = ["*"], actions: list[str] = ["*"], **extra: Any) -> dict:
    return {"id": id, "roles": roles, "models": models, "actions": actions, "effect": "deny", **extra}


def test_deny_overrides_allow_and_names_the_deny(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("a1", ["analyst"]), deny("no-finance", ["analyst"], ["finance-*"]),
                                      allow("a2", ["analyst"], ["finance-*"])]})
    assert decide(e, roles=["analyst"], model="finance-eu") == Decision(False, "no-finance", ("analyst",))
    assert decide(e, roles=["analyst"], model="digits") == Decision(True, "a1", ("analyst",))


def test_default_deny(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("a1", ["analyst"], ["digits"], ["infer"])]})
    assert decide(e, roles=["analyst"], model="other").rule == "default-deny"
    assert decide(e, roles=["analyst"], action="read") == Decision(False, "default-deny", ("analyst",))
    assert decide(e, roles=["analyst"]).allowed


def test_empty_policy_denies_everything(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {})
    assert decide(e, roles=["admin"]) == Decision(False, "default-deny", ("admin",))


def test_role_inheritance_across_three_levels(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {
        "roles": {"viewer": [], "analyst": ["viewer"], "data-scientist": ["analyst"], "lead": ["data-scientist"]},
        "rules": [allow("viewers-read", ["viewer"], actions=["read"]),
                  allow("analysts-infer", ["analyst"], ["digits"], ["infer"])],
    })
    d = decide(e, roles=["lead"], action="read")
    assert d == Decision(True, "viewers-read", ("analyst", "data-scientist", "lead", "viewer"))
    assert decide(e, roles=["lead"], action="infer").rule == "analysts-infer"
    assert not decide(e, roles=["viewer"], action="infer").allowed  # inheritance goes one way only


def test_static_subject_bindings_merge_with_token_roles(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"roles": {"a": [], "b": []}, "subjects": {"alice": ["b"]},
                            "rules": [allow("for-a", ["a"], ["m1"]), allow("for-b", ["b"], ["m2"])]})
    assert decide(e, "alice", ["a"], model="m1").allowed
    assert decide(e, "alice", ["a"], model="m2").roles == ("a", "b")
    assert not decide(e, "bob", ["a"], model="m2").allowed


def test_subject_with_no_roles(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("a1", ["analyst"]), deny("d-all-night", ["*"], when="request.hour > 30")]})
    assert decide(e, roles=[], request={"hour": 3}) == Decision(False, "default-deny", ())
    assert decide(e, roles=[], request={"hour": 31}).rule == "d-all-night"  # "*" rules still apply to it


@pytest.mark.parametrize("roles", ["analyst", {"analyst": True}, None, 7, [1, None, ["analyst"]]])
def test_roles_claim_that_is_not_a_list_of_strings_counts_as_no_roles(tmp_path: Path, roles: Any) -> None:
    e = enforcer(tmp_path, {"rules": [allow("a1", ["analyst"])]})
    assert decide(e, roles=roles) == Decision(False, "default-deny", ())


def test_wildcard_role_allow_matches_any_subject(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("public-read", ["*"], ["*"], ["read"])]})
    assert decide(e, roles=[], action="read").allowed
    assert not decide(e, roles=[], action="infer").allowed


def test_model_globs(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("s", ["a"], ["digits", "sentiment-*"])]})
    assert decide(e, roles=["a"], model="sentiment-en").allowed
    assert decide(e, roles=["a"], model="digits").allowed
    assert not decide(e, roles=["a"], model="digits2").allowed
    assert not decide(e, roles=["a"], model="xsentiment-en").allowed


@pytest.mark.parametrize("pattern,model,matches", [
    ("llama-*b", "llama-70b", True), ("llama-*b", "llama-secret", False),  # casbin 1.43 matched the second
    ("a*c", "abc", True), ("a*c", "abd", False), ("*s", "digitx", False), ("*-en", "sentiment-en", True),
    ("sentiment-{en,fr}", "sentiment-en", False),  # no brace expansion (pycasbin 2 would expand)
    ("digit?", "digits", True), ("dig[i]ts", "digits", True), ("dig[!i]ts", "digits", False),
    ("*", "anything", True), ("Digits", "digits", False),
])
def test_a_model_pattern_means_the_same_in_rules_and_quotas(tmp_path: Path, pattern: str, model: str,
                                                              matches: bool) -> None:
    """Rules (through Casbin), quotas and outputs read a ``models`` pattern one way: shell-style, the whole name."""
    from gateway.specificity import model_matcher

    e = enforcer(tmp_path, {"rules": [allow("r", ["a"], [pattern])]})
    assert decide(e, roles=["a"], model=model).allowed is matches
    assert model_matcher(pattern)[1](model) is matches  # what a quota or outputs entry with the pattern selects


def test_first_matching_allow_in_file_order_decides(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("narrow", ["a"], ["digits"], when="subject.x == 1"),
                                      allow("broad", ["a"]), allow("later", ["a"])]})
    assert decide(e, roles=["a"], x=1).rule == "narrow"
    assert decide(e, roles=["a"], x=2).rule == "broad"


# -- three-valued logic -------------------------------------------------------------------


def test_deny_with_a_condition_on_a_missing_claim_denies(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("a1", ["a"]),
                                      deny("low-clearance", ["*"], when="subject.clearance < 3")]})
    assert decide(e, roles=["a"]) == Decision(False, "low-clearance", ("a",))
    assert decide(e, roles=["a"], clearance=5).allowed
    assert not decide(e, roles=["a"], clearance=1).allowed


def test_allow_with_a_condition_on_a_missing_claim_does_not_allow(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("cleared", ["a"], when="subject.clearance >= 3")]})
    assert decide(e, roles=["a"]) == Decision(False, "default-deny", ("a",))
    assert decide(e, roles=["a"], clearance="5").rule == "default-deny"  # wrong type: unknown, no door
    assert decide(e, roles=["a"], clearance=3).allowed


def test_has_makes_both_explicit(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [
        allow("a1", ["a"]),
        deny("contractors-at-night", ["*"],
             when="subject has employment and subject.employment == 'contractor' and request.hour >= 20"),
        allow("no-clearance-needed", ["b"], when="not subject has clearance"),
    ]})
    night = {"hour": 22}
    assert decide(e, roles=["a"], request=night).allowed  # no employment claim: the deny does not apply
    assert decide(e, roles=["a"], request=night, employment="staff").allowed
    assert decide(e, roles=["a"], request=night, employment="contractor").rule == "contractors-at-night"
    assert decide(e, roles=["b"]).rule == "no-clearance-needed"  # `has` is never unknown
    assert not decide(e, roles=["b"], clearance=1).allowed


def test_conditions_read_model_labels(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("internal", ["a"], when="model.labels.sensitivity == 'internal'")]})
    assert decide(e, roles=["a"], labels={"sensitivity": "internal"}).allowed
    assert not decide(e, roles=["a"], labels={"sensitivity": "secret"}).allowed
    assert not decide(e, roles=["a"]).allowed


# -- shadow rules ----------------------------------------------------------------------------


def test_shadow_rules_are_recorded_and_never_enforced(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [
        allow("a1", ["a"]),
        deny("trial-deny", ["*"], ["finance-*"], when="subject.clearance < 4", mode="shadow"),
        allow("trial-allow", ["b"], mode="shadow"),
        deny("enforced-deny", ["*"], ["blocked"]),
    ]})
    d = decide(e, roles=["a"], model="finance-eu", clearance=3)
    assert d.allowed and d.rule == "a1" and d.shadow == (("trial-deny", False),)
    d = decide(e, roles=["a"], model="finance-eu", clearance=5)
    assert d.allowed and d.shadow == ()
    d = decide(e, roles=["b"], model="digits")
    assert d == Decision(False, "default-deny", ("b",), (("trial-allow", True),))  # it would have allowed
    d = decide(e, roles=["b"], model="blocked")
    assert d.rule == "enforced-deny" and d.shadow == (("trial-allow", False),)  # a deny would still win


def test_rules_compile_to_casbin_rows_carrying_rule_ids(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"roles": {"x": ["y"]}, "rules": [
        allow("a1", ["a", "b"], ["digits"], ["infer", "read"]), deny("d1", ["*"], ["m"], ["read"]),
        allow("s1", ["a"], mode="shadow")]})
    rows = e.compiled.enforcer.get_policy()
    assert rows[0] == ["*", "m", "read", "deny", "d1"]  # denies first: Casbin stops at the deciding one
    assert sorted(rows[1:]) == sorted([[r, "digits", a, "allow", "a1"] for r in ("a", "b") for a in ("infer", "read")])
    assert e.compiled.enforcer.get_grouping_policy() == [["x", "y"]]
    assert e.compiled.shadow_enforcer is not None
    assert e.compiled.shadow_enforcer.get_policy() == [["a", "*", "*", "allow", "s1"]]


# -- the decision cache ------------------------------------------------------------------------


def test_cache_hits_count_and_keep_decisions(tmp_path: Path) -> None:
    metrics = Metrics()
    e = enforcer(tmp_path, {"rules": [allow("a1", ["a"])]}, metrics=metrics)
    for _ in range(5):
        assert decide(e, roles=["a"]).allowed
    assert metrics.registry.get_sample_value("maas_policy_cache_total", {"result": "miss"}) == 1
    assert metrics.registry.get_sample_value("maas_policy_cache_total", {"result": "hit"}) == 4


def test_cache_keys_on_the_claims_a_condition_reads(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("cleared", ["a"], when="subject.clearance >= 3"),
                                      deny("blocked", ["*"], when="subject has blocked")]})
    assert decide(e, "u1", ["a"], clearance=5).allowed
    assert not decide(e, "u2", ["a"], clearance=1).allowed  # same roles/model/action, different claim
    assert not decide(e, "u3", ["a"]).allowed
    assert not decide(e, "u4", ["a"], clearance=5, blocked=False).allowed
    assert decide(e, "u5", ["a"], clearance=4).allowed
    assert not decide(e, "u6", ["a"], clearance="5").allowed  # a string is not a number, even cached
    assert decide(e, "u7", ["a"], clearance=3.0).allowed
    assert len(e.cache) == 7
    assert decide(e, "u8", ["a"], clearance=5).allowed  # same reads as u1: served from the cache
    assert len(e.cache) == 7
    assert not decide(e, "u9", ["a"], clearance=5, blocked="no").allowed  # `has`: present means present


def test_decisions_that_read_the_request_are_not_cached(tmp_path: Path) -> None:
    metrics = Metrics()
    e = enforcer(tmp_path, {"rules": [
        allow("a1", ["a"]),
        deny("night", ["*"], when="subject has employment and subject.employment == 'contractor' and request.hour >= 20"),
    ]}, metrics=metrics)
    assert not decide(e, roles=["a"], employment="contractor", request={"hour": 22}).allowed
    assert decide(e, roles=["a"], employment="contractor", request={"hour": 10}).allowed
    assert not decide(e, roles=["a"], employment="contractor", request={"hour": 21}).allowed
    assert len(e.cache) == 0
    assert decide(e, roles=["a"], employment="staff", request={"hour": 22}).allowed  # never read the hour
    assert decide(e, roles=["a"], employment="staff", request={"hour": 3}).allowed
    assert len(e.cache) == 1
    assert metrics.registry.get_sample_value("maas_policy_cache_total", {"result": "hit"}) == 1


def test_cache_is_bounded(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("a1", ["*"])]}, cache_size=3)
    for i in range(10):
        assert decide(e, roles=[f"r{i}"]).allowed
    assert len(e.cache) == 3


def test_cache_disabled_with_size_zero(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("a1", ["a"])]}, cache_size=0)
    decide(e, roles=["a"])
    assert len(e.cache) == 0


def test_shadow_outcomes_survive_the_cache(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("a1", ["a"]),
                                      deny("trial", ["*"], when="subject.clearance < 4", mode="shadow")]})
    first = decide(e, roles=["a"], clearance=3)
    second = decide(e, "other", roles=["a"], clearance=3)
    assert first.shadow == second.shadow == (("trial", False),)
    assert decide(e, roles=["a"], clearance=5).shadow == ()


# -- the identity memo (decide_for) ---------------------------------------------------------------


def identity(sub: str = "u", roles: tuple[str, ...] = ("a",), **claims: Any) -> Identity:
    # the key names the subject only, so callers that differ in claims share it: the memo must still tell them apart
    return Identity(sub, roles, {"sub": sub, "roles": list(roles), **claims}, "jwt", cache_key=f"test:{sub}")


def test_the_same_identity_object_reuses_its_decision(tmp_path: Path) -> None:
    metrics = Metrics()
    e = enforcer(tmp_path, {"rules": [allow("a1", ["a"], when="subject.clearance >= 3")]}, metrics=metrics)
    built = []
    caller = identity(clearance=5)
    for _ in range(3):
        assert e.decide_for(caller, "digits", None, "infer", lambda: built.append(1) or {}).allowed
    assert built == [1]  # request attributes built once, for the one evaluation
    assert metrics.registry.get_sample_value("maas_policy_cache_total", {"result": "hit"}) == 2
    # an equal identity built afresh (mTLS builds one per request) finds it too: no request attributes built
    assert e.decide_for(identity(clearance=5), "digits", None, "infer", lambda: built.append(1) or {}).allowed
    assert built == [1]
    # another object with the same subject (and cache key) but a different claim is decided on its own claims
    assert not e.decide_for(identity(clearance=1), "digits", None, "infer", dict).allowed
    assert e.decide_for(caller, "digits", None, "read", dict).allowed  # action is part of the key


def test_a_decision_that_read_the_request_is_never_memoised(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("a1", ["a"]), deny("plain", ["*"], when="not request.mtls")]})
    caller = identity()
    assert e.decide_for(caller, "digits", None, "infer", lambda: {"mtls": True}).allowed
    assert not e.decide_for(caller, "digits", None, "infer", lambda: {"mtls": False}).allowed
    assert e.decide_for(caller, "digits", None, "infer", lambda: {"mtls": True}).allowed


def test_a_reloaded_policy_does_not_see_the_old_memo(tmp_path: Path) -> None:
    caller = identity()
    old = enforcer(tmp_path, {"rules": [allow("a1", ["a"])]})
    assert old.decide_for(caller, "digits", None, "infer", dict).allowed
    new = enforcer(tmp_path, {"rules": [deny("d1", ["a"])]})
    assert new.decide_for(caller, "digits", None, "infer", dict) == Decision(False, "d1", ("a",))


def test_the_memo_is_bounded_and_off_with_the_cache(tmp_path: Path) -> None:
    e = enforcer(tmp_path, {"rules": [allow("a1", ["a"])]}, cache_size=3)
    callers = [identity(f"u{i}") for i in range(10)]
    for caller in callers:
        assert e.decide_for(caller, "digits", None, "infer", dict).allowed
    assert len(e._by_identity) <= 3
    off = enforcer(tmp_path, {"rules": [allow("a1", ["a"])]}, cache_size=0)
    assert off.decide_for(callers[0], "digits", None, "infer", dict).allowed
    assert len(off._by_identity) == 0
