"""Policy as code: test cases and explanations for the security team's YAML.

A policy change should be tested like any other change before it ships:
``policy test`` runs YAML cases through the very enforcer the gateway uses
(Casbin, conditions, inheritance, no cache), ``policy explain`` shows why one
request is decided the way it is. ``policy lint`` (rules that cannot do what
their author meant) lives in ``lint``: it reads the document, not decisions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..pipeline import Decision
from ..typedyaml import build, load
from .compile import DEFAULT_DENY
from .enforcer import Explanation, PolicyEnforcer, truth_name
from .when import REQUEST_ATTRIBUTES


@dataclass(frozen=True, slots=True)
class Case:
    """One policy test case, as written in the cases file."""

    model: str
    action: str
    expect: Literal["allow", "deny"]
    subject: dict[str, Any] = field(default_factory=dict)
    request: dict[str, Any] = field(default_factory=dict)
    model_labels: dict[str, Any] | None = None
    rule: str | None = None  # optional: the deciding rule id the case expects
    name: str | None = None
    line: int = field(default=0, metadata={"yaml": "__internal_line"})

    def validate(self) -> tuple[str, str] | None:
        unknown = sorted(set(self.request) - REQUEST_ATTRIBUTES)
        if unknown:
            known = ", ".join(sorted(REQUEST_ATTRIBUTES))
            return f"request.{unknown[0]}", f"unknown request attribute (known: {known})"
        sub = self.subject.get("sub", "")
        if not isinstance(sub, str):
            return "subject.sub", "must be a string"
        return None


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    position: int  # 1-based
    decision: Decision

    @property
    def passed(self) -> bool:
        actual = "allow" if self.decision.allowed else "deny"
        return actual == self.case.expect and (self.case.rule is None or self.case.rule == self.decision.rule)

    @property
    def label(self) -> str:
        if self.case.name:
            return repr(self.case.name)
        return f"case #{self.position}" + (f" (line {self.case.line})" if self.case.line else "")

    def failure(self) -> str:
        actual = "allow" if self.decision.allowed else "deny"
        if actual != self.case.expect:
            return f"FAIL {self.label}: expected {self.case.expect}, got {actual} (rule {self.decision.rule})"
        return f"FAIL {self.label}: expected rule {self.case.rule}, got {self.decision.rule} ({actual})"


def load_cases(path: str | Path) -> list[Case]:
    """Parse a cases file (a YAML list) or raise ``ConfigError`` naming file:line."""
    data, source = load(path, env=False)
    if data is None:
        return []
    if not isinstance(data, list):
        raise source.error("", "expected a list of test cases")
    cases = []
    for i, item in enumerate(data):
        key = f"[{i}]"
        if isinstance(item, dict):
            if "__internal_line" in item:
                raise source.error(f"{key}.__internal_line", "unknown key")
            item["__internal_line"] = source.line(key) or 0
        cases.append(build(Case, item, key, source))
    return cases


def _decide(enforcer: PolicyEnforcer, subject: Mapping[str, Any], model: str, action: str,
            request: Mapping[str, Any], labels: Mapping[str, Any] | None) -> Explanation:
    sub = subject.get("sub", "")
    return enforcer.explain(subject=sub if isinstance(sub, str) else "", roles=subject.get("roles"),
                            claims=subject, model=model, labels=labels, action=action, request=request)


def run_cases(enforcer: PolicyEnforcer, cases: list[Case]) -> list[CaseResult]:
    return [CaseResult(case, i, _decide(enforcer, case.subject, case.model, case.action, case.request,
                                        case.model_labels).decision)
            for i, case in enumerate(cases, start=1)]


def explain(enforcer: PolicyEnforcer, subject: Mapping[str, Any], model: str, action: str,
            request: Mapping[str, Any] | None = None, labels: Mapping[str, Any] | None = None) -> Explanation:
    return _decide(enforcer, subject, model, action, request or {}, labels)


def format_explanation(explanation: Explanation) -> list[str]:
    d = explanation.decision
    lines = [f"decision: {'allow' if d.allowed else 'deny'}", f"rule: {d.rule}",
             f"roles: {', '.join(d.roles) if d.roles else '(none)'}"]
    if d.rule == DEFAULT_DENY:
        lines.append("why: no allow rule matched")
    for rule_id, outcome in explanation.outcomes.items():
        lines.append(f"condition {rule_id}: {truth_name(outcome)}")
    for rule_id, would_allow in d.shadow:
        lines.append(f"shadow {rule_id}: would {'allow' if would_allow else 'deny'}")
    if not d.shadow:
        lines.append("shadow: (none matched)")
    return lines
