"""Hostile `when` conditions: a policy file must never become a way to run code or read the process.

Each test writes what an attacker (or a careless copy-paste) would put in a
policy file and checks it is refused at load, with a message that says why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.policy.store import load_policy
from gateway.policy.when import MAX_LENGTH, WhenError, compile_when


def refused(text: str, match: str) -> None:
    with pytest.raises(WhenError, match=match):
        compile_when(text)


def test_function_call_refused() -> None:
    refused("subject.name.upper() == 'ALICE'", "function calls are not allowed")
    refused("len(subject.roles) > 2", "function calls are not allowed|unknown name")


def test_builtin_import_refused() -> None:
    refused("__import__('os').system('id') == 0", "names starting with '_'")


def test_dunder_attribute_refused() -> None:
    refused("subject.__class__ == 1", "names starting with '_'")
    refused("subject._private == 1", "names starting with '_'")


def test_class_escape_from_a_literal_refused() -> None:
    refused("().__class__.__bases__[0].__subclasses__()", "names starting with '_'")
    refused("'x'.join == 1", "attribute access is only allowed on subject, model, request and monitor")


def test_names_outside_the_four_roots_refused() -> None:
    refused("os.environ == 1", "unknown name 'os'")
    refused("secret == 'x'", "unknown name 'secret'")
    refused("subject == 1", "'subject' alone is not a value")
    refused("request.headers == 1", "unknown attribute request.headers")
    refused("model.backend == 1", "unknown attribute model.backend")


def test_subscript_refused() -> None:
    refused("subject['roles'] == 1", "subscripts")


def test_lambda_and_comprehensions_refused() -> None:
    refused("(lambda: True)", "lambda is not allowed")
    refused("[x for x in [1]] == 1", "comprehensions are not allowed")
    refused("(x := 1) == 1", "assignment")


def test_other_expressions_refused() -> None:
    refused("subject.a + 1 > 2", "arithmetic is not allowed")
    refused("f'{subject.a}' == 'x'", "f-strings are not allowed")
    refused("subject.a if True else False", "conditional expressions")
    refused("subject.a is None", "`is` is not allowed")
    refused("subject.a in subject.b", "`in` needs a literal list")
    refused("subject.a == b'x'", "literal")
    refused("subject.a == 1 # comment", "comments")


def test_overly_long_expression_refused() -> None:
    text = " or ".join(["subject.a == 1"] * 100)
    assert len(text) > MAX_LENGTH
    refused(text, "characters long")


def test_too_many_parts_refused() -> None:
    text = "subject.a in [" + ",".join(["1"] * 480) + "]"
    assert len(text) <= MAX_LENGTH
    refused(text, "parts|too long")


def test_deep_nesting_refused_without_crashing() -> None:
    text = "not " * 60 + "True"
    refused(text, "nested")
    compile_when("(" * 100 + "True" + ")" * 100)  # parentheses alone add no depth
    with pytest.raises(WhenError):  # past the parser's own limit: a clean refusal, not a crash
        compile_when("(" * 400 + "True" + ")" * 400)


def test_has_rewrite_cannot_be_abused() -> None:
    # the placeholder the rewrite uses cannot be written by hand
    refused("__maas_has__(subject.x)", "names starting with '_'")
    refused("subject has __class__", "names starting with '_'")
    refused("subject has x.__class__", "names starting with '_'")
    # breaking out of the rewritten call only yields a syntax error
    with pytest.raises(WhenError):
        compile_when("subject has x) or (True")
    # Python folds look-alike characters (NFKC) when it reads names: none may smuggle in a '_'
    for lookalike in ("\uff3f", "\ufe33", "\ufe4d"):
        refused(f"{lookalike * 2}maas_has{lookalike * 2}(subject.x)", "names starting with '_'|invalid character")
        refused(f"subject.{lookalike * 2}class{lookalike * 2} == 1", "names starting with '_'|invalid character")
    assert compile_when("\uff53ubject.a == 1").paths == {("subject", "a")}  # full-width s: still just `subject`
    refused("has x", "'has' must follow")
    refused("os has path", "unknown name 'os'")
    refused("subject has 'x'", "'has' must be followed by an attribute name")


def test_bad_condition_in_a_policy_file_names_rule_and_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "rules:\n"
        "  - id: fine\n"
        "    effect: allow\n"
        "    roles: [a]\n"
        "  - id: sneaky\n"
        "    effect: allow\n"
        "    roles: [a]\n"
        "    when: \"subject.__class__.__init__.__globals__ == 1\"\n")
    with pytest.raises(ConfigError) as info:
        load_policy(policy)
    message = str(info.value)
    assert message.startswith(f"{policy}:5: ")
    assert "'sneaky'" in message and "names starting with '_'" in message
    assert "\n" not in message
