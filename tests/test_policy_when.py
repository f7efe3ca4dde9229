"""The `when` language's semantics: three-valued logic, comparisons, `in`, `has`, and what a decision reads."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.policy.truth import UNKNOWN, Facts, value_token
from gateway.policy.when import compile_when


def run(text: str, subject: dict | None = None, model: dict | None = None, request: dict | None = None):
    return compile_when(text).evaluate(Facts(subject or {}, model or {"name": "m", "labels": {}}, request or {}))


@pytest.mark.parametrize("text, expected", [
    ("subject.missing == 1 and False", False),      # false and unknown = false
    ("False and subject.missing == 1", False),
    ("subject.missing == 1 or True", True),         # true or unknown = true
    ("True or subject.missing == 1", True),
    ("subject.missing == 1 and True", UNKNOWN),
    ("subject.missing == 1 or False", UNKNOWN),
    ("not subject.missing == 1", UNKNOWN),          # not unknown = unknown
    ("not (subject.missing == 1 or True)", False),
])
def test_kleene_logic(text: str, expected: object) -> None:
    assert run(text) is expected


def test_comparisons_with_a_missing_attribute_are_unknown() -> None:
    for op in ("==", "!=", "<", "<=", ">", ">="):
        assert run(f"subject.clearance {op} 3") is UNKNOWN


def test_incompatible_types_are_unknown_not_errors() -> None:
    assert run("subject.clearance < 3", {"clearance": "high"}) is UNKNOWN
    assert run("subject.clearance >= 3", {"clearance": True}) is UNKNOWN  # a bool is not a number
    assert run("subject.clearance >= 3", {"clearance": None}) is UNKNOWN
    assert run("subject.clearance >= 3", {"clearance": [5]}) is UNKNOWN
    assert run("subject.clearance >= 3", {"clearance": math.nan}) is UNKNOWN  # NaN could switch a deny off


def test_equality_across_kinds_is_plain_inequality() -> None:
    assert run("subject.clearance == 3", {"clearance": "3"}) is False
    assert run("subject.clearance != 3", {"clearance": "3"}) is True
    assert run("subject.flag == 1", {"flag": True}) is False
    assert run("subject.flag == True", {"flag": True}) is True
    assert run("subject.x == None", {"x": None}) is True


def test_ordering_and_chains() -> None:
    assert run("subject.clearance >= 3", {"clearance": 3}) is True
    assert run("subject.clearance >= 3", {"clearance": 2.5}) is False
    assert run("1 < subject.c < 5", {"c": 3}) is True
    assert run("1 < subject.c < 5", {"c": 7}) is False
    assert run("subject.name < 'm'", {"name": "alice"}) is True
    assert run("subject.level > -1", {"level": 0}) is True
    assert run("model.name == 'm'") is True


def test_in_and_not_in_on_literal_lists() -> None:
    assert run("subject.team in ['a', 'b']", {"team": "b"}) is True
    assert run("subject.team in ('a', 'b')", {"team": "c"}) is False
    assert run("subject.team not in ['a', 'b']", {"team": "c"}) is True
    assert run("subject.team in ['a']") is UNKNOWN
    assert run("subject.team not in ['a']") is UNKNOWN
    assert run("subject.level in [1, 2]", {"level": True}) is False  # True is not 1 here
    assert run("subject.team in ['a']", {"team": ["a"]}) is UNKNOWN  # structured claims are not compared


def test_has_is_never_unknown() -> None:
    assert run("subject has clearance") is False
    assert run("subject has clearance", {"clearance": None}) is True
    assert run("not subject has clearance") is True
    assert run("subject has address.city", {"address": {"city": "x"}}) is True
    assert run("subject has address.city", {"address": "flat"}) is False
    assert run("model.labels has sensitivity", model={"name": "m", "labels": {"sensitivity": "x"}}) is True
    assert run("subject.has == 1", {"has": 1}) is True  # a claim may be called `has`


def test_non_boolean_truth_values_are_unknown() -> None:
    assert run("request.mtls", request={"mtls": True}) is True
    assert run("request.mtls", request={"mtls": "yes"}) is UNKNOWN
    assert run("subject.clearance and True", {"clearance": 5}) is UNKNOWN


def test_conditions_may_span_lines_as_yaml_block_scalars_do() -> None:
    text = "subject has employment\n  and subject.employment == 'contractor'\n"
    assert run(text, {"employment": "contractor"}) is True


def test_reads_are_recorded_in_order_with_short_circuit() -> None:
    cond = compile_when("subject has employment and subject.employment == 'contractor' and request.hour >= 20")
    facts = Facts({"employment": "staff"}, {}, {"hour": 23})
    assert cond.evaluate(facts) is False
    assert list(facts.reads) == [("subject", "employment")]
    assert not facts.read_request  # short-circuit: the hour was never read, so this decision is cacheable
    facts = Facts({"employment": "contractor"}, {}, {"hour": 23})
    assert cond.evaluate(facts) is True
    assert facts.read_request
    assert cond.paths == frozenset({("subject", "employment"), ("request", "hour")})


EXPRESSIONS = [
    "subject.v == 3", "subject.v != 'a'", "subject.v >= 2", "subject.v < 'm'", "subject.v in [1, 'a', True, None]",
    "subject has v", "not subject.v", "subject.v == True or subject.v == None", "subject.v == subject.w",
]
values = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from(["a", "m", "z", "3"]), st.lists(st.integers(0, 2), max_size=2),
                   st.dictionaries(st.just("k"), st.integers(0, 1)), st.just(object()))


@settings(max_examples=300, deadline=None)
@given(a=values, b=values, w=values)
def test_equal_tokens_evaluate_identically(a: object, b: object, w: object) -> None:
    """The decision cache's soundness: equal value tokens must give equal outcomes."""
    if value_token(a) != value_token(b):
        return
    for text in EXPRESSIONS:
        cond = compile_when(text)
        assert cond.evaluate(Facts({"v": a, "w": w}, {}, {})) is cond.evaluate(Facts({"v": b, "w": w}, {}, {})), text
