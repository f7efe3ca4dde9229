"""Compiling policy files: every mistake is one line naming file, line and rule; the Casbin model is checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.policy.compile import BUNDLED_MODEL, compile_policy
from gateway.policy.document import load_document
from gateway.policy.store import load_policy

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(path: Path, model_file: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_policy(path, model_file)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


RULE = "rules:\n  - id: ok\n    roles: [a]\n    effect: allow\n"


def test_unknown_action_names_file_line_and_rule(tmp_path: Path) -> None:
    path = write(tmp_path, RULE + "  - id: typo\n    roles: [a]\n    actions: [infre]\n    effect: deny\n")
    message = error(path)
    assert message.startswith(f"{path}:5: rules[1].actions: rule 'typo': unknown action 'infre'")


def test_syntax_error_in_when_names_the_rule(tmp_path: Path) -> None:
    path = write(tmp_path, RULE + "  - id: broken\n    roles: [a]\n    effect: allow\n    when: \"subject.a ==\"\n")
    message = error(path)
    assert message.startswith(f"{path}:5: rules[1].when: rule 'broken': when: syntax error")


def test_unknown_name_in_when(tmp_path: Path) -> None:
    path = write(tmp_path, RULE + "  - id: n\n    roles: [a]\n    effect: allow\n    when: \"user.clearance > 1\"\n")
    assert "unknown name 'user'" in error(path)


@pytest.mark.parametrize("rule_id", ["default-deny", "has space", "", "x" * 200])
def test_bad_rule_ids(tmp_path: Path, rule_id: str) -> None:
    path = write(tmp_path, f"rules:\n  - id: '{rule_id}'\n    roles: [a]\n    effect: allow\n")
    assert "rule id" in error(path)


def test_duplicate_rule_id(tmp_path: Path) -> None:
    path = write(tmp_path, RULE + RULE.replace("rules:\n", ""))
    assert error(path) == f"{path}:5: rules[1].id: duplicate rule id 'ok'"


def test_empty_lists_and_slashes(tmp_path: Path) -> None:
    assert "roles must list at least one entry" in error(write(tmp_path, "rules:\n  - {id: e, roles: [], effect: allow}\n"))
    assert "contains '/'" in error(write(tmp_path, "rules:\n  - {id: e, models: [a/b], effect: allow}\n"))


def test_role_cycle_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "roles:\n  a: [b]\n  b: [c]\n  c: [a]\n")
    message = error(path)
    assert "cycle" in message and "a -> b -> c -> a" in message and f"{path}:" in message


def test_unknown_key_and_bad_effect(tmp_path: Path) -> None:
    assert "unknown key" in error(write(tmp_path, "rules:\n  - {id: e, effect: allow, model: [x]}\n"))
    assert "one of 'allow', 'deny'" in error(write(tmp_path, "rules:\n  - {id: e, effect: permit}\n"))


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    path = write(tmp_path, "rules:\n  - id: x\n    roles: [a\n")
    assert error(path).startswith(f"{path}:")


def test_bundled_model_is_shipped_in_policies() -> None:
    assert (ROOT / "policies" / "model.conf").read_text() == BUNDLED_MODEL.read_text()


def test_custom_model_file_may_change_the_matcher(tmp_path: Path) -> None:
    text = BUNDLED_MODEL.read_text().replace("globMatch(r.obj, p.obj)", "keyMatch(r.obj, p.obj)")
    model = write(tmp_path, text, "model.conf")
    policy = write(tmp_path, "rules:\n  - {id: a, roles: [x], models: ['fin*'], effect: allow}\n")
    e = load_policy(policy, model).enforcer
    assert e.decide(subject="s", roles=["x"], claims={}, model="finance", labels={}, action="infer", request={}).allowed


@pytest.mark.parametrize("change, expected", [
    (("cond(p.id, r.env)", "true"), "must call cond"),
    (("r = sub, obj, act, env", "r = sub, obj, act"), "request definition"),
    (("p = sub, obj, act, eft, id", "p = sub, obj, act, eft"), "policy definition"),
    (("&& !some(where (p.eft == deny))", ""), "deny-override"),
    (("[matchers]", "[nonsense"), "invalid Casbin model"),
])
def test_custom_model_file_must_keep_the_contract(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    model = write(tmp_path, BUNDLED_MODEL.read_text().replace(*change), "model.conf")
    message = error(write(tmp_path, RULE), model)
    assert expected in message and str(model) in message


def test_missing_model_file(tmp_path: Path) -> None:
    assert "No such file" in error(write(tmp_path, RULE), tmp_path / "nope.conf")


def test_compile_policy_is_what_check_uses() -> None:
    compiled = compile_policy(load_document(str(ROOT / "policies" / "policy.yaml")))
    assert "finance-needs-clearance" in compiled.rules
    assert compiled.shadow_enforcer is not None
