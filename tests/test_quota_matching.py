"""Which quota entry governs a request: the most specific one (README: "most specific")."""

from __future__ import annotations

from gateway.policy.document import PolicyDocument, QuotaRule
from gateway.quota.matching import MatcherCache, QuotaMatcher


def rule(**kw) -> QuotaRule:
    kw.setdefault("rate_per_s", 1.0)
    kw.setdefault("burst", 1)
    return QuotaRule(**kw)


def test_subject_beats_role_beats_everyone_regardless_of_order():
    m = QuotaMatcher([
        rule(id="everyone", models=["*"]),
        rule(id="analysts", roles=["analyst"], models=["*"]),
        rule(id="alice", subjects=["alice"], models=["*"]),
    ])
    assert m.match("alice", ("analyst",), "digits").id == "alice"
    assert m.match("bob", ("analyst",), "digits").id == "analysts"
    assert m.match("carol", ("viewer",), "digits").id == "everyone"


def test_star_role_is_everyone_tier():
    m = QuotaMatcher([rule(id="star", roles=["*"]), rule(id="named", roles=["viewer"])])
    assert m.match("x", ("viewer",), "m").id == "named"
    assert m.match("x", ("other",), "m").id == "star"
    assert m.match("x", (), "m").id == "star"


def test_exact_model_beats_glob_beats_star_within_a_tier():
    m = QuotaMatcher([
        rule(id="any", roles=["analyst"], models=["*"]),
        rule(id="glob", roles=["analyst"], models=["sentiment-*"]),
        rule(id="exact", roles=["analyst"], models=["sentiment-en"]),
    ])
    assert m.match("a", ("analyst",), "sentiment-en").id == "exact"
    assert m.match("a", ("analyst",), "sentiment-de").id == "glob"
    assert m.match("a", ("analyst",), "digits").id == "any"


def test_who_outranks_model_specificity():
    m = QuotaMatcher([
        rule(id="role-exact", roles=["analyst"], models=["digits"]),
        rule(id="subject-any", subjects=["alice"], models=["*"]),
    ])
    assert m.match("alice", ("analyst",), "digits").id == "subject-any"


def test_file_order_breaks_ties():
    m = QuotaMatcher([rule(id="first", roles=["analyst"]), rule(id="second", roles=["analyst"])])
    assert m.match("a", ("analyst",), "m").id == "first"


def test_entries_that_do_not_apply_are_ignored():
    m = QuotaMatcher([
        rule(id="svc", subjects=["svc-batch"], models=["digits"]),
        rule(id="ds", roles=["data-scientist"], models=["*"]),
    ])
    assert m.match("alice", ("analyst",), "digits") is None
    assert m.match("svc-batch", (), "chat") is None
    assert m.match("svc-batch", (), "digits").id == "svc"


def test_spec_example():
    m = QuotaMatcher([
        rule(roles=["analyst"], models=["*"], rate_per_s=5, burst=10),
        rule(subjects=["svc-batch"], models=["digits"], rate_per_s=200, burst=400, max_concurrent=16),
    ])
    svc = m.match("svc-batch", ("analyst",), "digits")
    assert svc.limits.burst == 400 and svc.limits.max_concurrent == 16
    assert m.match("svc-batch", ("analyst",), "chat").limits.burst == 10


def test_ids_are_stable_and_distinct():
    a = QuotaMatcher([rule(roles=["analyst"]), rule(roles=["analyst"]), rule(subjects=["x"])])
    b = QuotaMatcher([rule(roles=["analyst"], burst=99), rule(roles=["analyst"]), rule(subjects=["x"])])
    ids_a = [e.id for e in a.entries]
    assert len(set(ids_a)) == 3
    assert ids_a == [e.id for e in b.entries]  # changing a limit keeps the bucket
    assert QuotaMatcher([rule(id="named")]).entries[0].id == "named"


def test_compiled_once_per_document():
    cache = MatcherCache()
    doc = PolicyDocument(quotas=[rule(id="a")])
    assert cache.get(doc) is cache.get(doc)
    reloaded = PolicyDocument(quotas=[rule(id="b")])
    assert cache.get(reloaded).match("x", (), "m").id == "b"
