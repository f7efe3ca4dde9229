"""``maas-gateway policy test | explain | lint`` as a security team runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "policies" / "policy.yaml"
CASES = ROOT / "policies" / "cases.yaml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_shipped_example_policy_passes_its_cases(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, err = run(capsys, "policy", "test", str(POLICY), str(CASES))
    assert code == 0, lines
    assert lines[-1].endswith(" passed, 0 failed") and int(lines[-1].split()[0]) >= 20


def test_shipped_example_policy_lints_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = run(capsys, "policy", "lint", str(POLICY), "--strict")
    assert code == 0 and lines == ["policy OK, no findings"]


def test_failing_cases_are_named_or_numbered(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "- {name: alice runs digits, subject: {sub: alice}, model: digits, action: infer, expect: allow}\n"
        "- {name: wrong expectation, subject: {sub: alice}, model: chat, action: infer, expect: allow}\n"
        "- {subject: {sub: nobody}, model: digits, action: infer, expect: allow}\n"
        "- {name: wrong rule, subject: {sub: alice}, model: digits, action: read, expect: allow, rule: nope}\n")
    code, lines, _ = run(capsys, "policy", "test", str(POLICY), str(cases))
    assert code == 1
    assert lines == [
        "FAIL 'wrong expectation': expected allow, got deny (rule default-deny)",
        "FAIL case #3 (line 3): expected allow, got deny (rule default-deny)",
        "FAIL 'wrong rule': expected rule nope, got viewers-read-catalogue (allow)",
        "1 passed, 3 failed",
    ]


def test_bad_case_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text("- {subject: {sub: a}, model: digits, action: infer, expect: maybe}\n")
    code, lines, err = run(capsys, "policy", "test", str(POLICY), str(cases))
    assert code != 0 and lines == []
    assert err.count("\n") == 1 and f"{cases}:1: [0].expect: expected one of 'allow', 'deny'" in err
    cases.write_text("- {subject: {sub: a}, model: digits, action: infer, expect: deny, request: {hours: 3}}\n")
    code, _, err = run(capsys, "policy", "test", str(POLICY), str(cases))
    assert code != 0 and "unknown request attribute" in err and err.count("\n") == 1
    code, _, err = run(capsys, "policy", "test", str(POLICY), str(tmp_path / "missing.yaml"))
    assert code != 0 and "file not found" in err


def test_bad_policy_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - {id: r, effect: allow, when: 'subject.__class__'}\n")
    code, lines, err = run(capsys, "policy", "test", str(policy), str(CASES))
    assert code != 0 and err.count("\n") == 1 and f"{policy}:2:" in err and "'r'" in err


def test_explain_shows_decision_rule_roles_and_shadow(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = run(capsys, "policy", "explain", str(POLICY), "--subject", json.dumps({"sub": "bob", "clearance": 3}),
                         "--model", "finance-forecast", "--action", "infer", "--request", '{"mtls": true, "hour": 10}')
    assert code == 0
    assert lines[:3] == ["decision: allow", "rule: finance-needs-clearance", "roles: analyst, finance-analyst, viewer"]
    assert "condition finance-needs-clearance: true" in lines
    assert "shadow try-stricter-finance-rule: would deny" in lines


def test_explain_a_deny_with_labels(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines, _ = run(capsys, "policy", "explain", str(POLICY), "--subject", '{"sub": "carol", "roles": ["ml-lead"]}',
                         "--model", "vault", "--action", "infer", "--labels", '{"sensitivity": "restricted"}')
    assert code == 0
    assert lines[:2] == ["decision: deny", "rule: restricted-needs-top-clearance"]


@pytest.mark.parametrize("option, value, message", [
    ("--subject", "{not json", "--subject: not valid JSON"),
    ("--subject", "[1]", "--subject: expected a JSON object"),
    ("--request", '{"hours": 1}', "--request: unknown attribute 'hours'"),
])
def test_explain_bad_input_is_one_line(capsys: pytest.CaptureFixture[str], option: str, value: str, message: str) -> None:
    argv = ["policy", "explain", str(POLICY), "--subject", '{"sub": "a"}', "--model", "m", "--action", "read",
            "--request", "{}"]
    argv[argv.index(option) + 1] = value
    code, _, err = run(capsys, *argv)
    assert code != 0 and message in err and err.count("\n") == 1


def test_lint_findings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "roles: {analyst: [], senior: [analyst]}\n"
        "subjects: {svc: [robot]}\n"
        "rules:\n"
        "  - {id: open-door, roles: ['*'], models: ['*'], actions: ['*'], effect: allow}\n"
        "  - {id: seniors-finance, roles: [senior], models: [finance-eu], actions: [infer], effect: allow}\n"
        "  - {id: no-finance, roles: [analyst], models: ['finance-*'], actions: ['*'], effect: deny}\n"
        "  - {id: typo-role, roles: [analsyt], models: [digits], actions: [read], effect: allow}\n")
    code, lines, _ = run(capsys, "policy", "lint", str(policy))
    assert code == 1
    text = "\n".join(lines)
    assert f"HIGH   {policy}:4 rule open-door: allows every role, model and action" in text
    assert f"{policy}:5 rule seniors-finance: can never allow: unconditional deny rule 'no-finance'" in text
    assert f"{policy}:7 rule typo-role: role 'analsyt' is not defined under roles:" in text
    assert "subject svc: role 'robot' is not defined" in text
    assert lines[-1] == "1 high, 3 other finding(s)"


def test_lint_medium_findings_fail_only_when_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("rules:\n  - {id: r, roles: [undefined], effect: allow}\n")
    assert run(capsys, "policy", "lint", str(policy))[0] == 0
    assert run(capsys, "policy", "lint", str(policy), "--strict")[0] == 1
