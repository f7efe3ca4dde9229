"""Policy as code: test cases and explanations for the security team's YAML.

A policy change should be tested like any other change before it ships:
``policy test`` runs YAML cases through the very enforcer the gateway uses
(Casbin, conditions, inheritance, no cache), ``policy explain`` shows why one
request is decided the way it is. ``policy lint`` (rules that cannot do what
their author meant) lives in ``lint``: it reads the document, not decisions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import CliError
from ..pipeline import Decision
from ..request_params import PARAM_NAMES
from ..typedyaml import build, load
from .compile import DEFAULT_DENY
from .document import OutputRule
from .enforcer import Explanation, PolicyEnforcer, make_facts, truth_name
from .outputs import OutputsChoice
from .truth import Alarms
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
    # optional: the outputs entry that must apply, by its fields ({top_k: 1}, {id: x}); {} = none applies
    expect_outputs: dict[str, Any] | None = None
    name: str | None = None
    line: int = field(default=0, metadata={"yaml": "__internal_line"})

    def validate(self) -> tuple[str, str] | None:
        problem = check_request(self.request)
        if problem:
            return problem
        if self.expect_outputs is not None:
            unknown_fields = sorted(set(self.expect_outputs) - OUTPUT_FIELDS)
            if unknown_fields:
                return f"expect_outputs.{unknown_fields[0]}", f"not an outputs field (fields: {', '.join(sorted(OUTPUT_FIELDS))})"
        sub = self.subject.get("sub", "")
        if not isinstance(sub, str):
            return "subject.sub", "must be a string"
        return None


OUTPUT_FIELDS = frozenset(f.name for f in dataclasses.fields(OutputRule) if f.name != "line")
REQUEST_KEYS = REQUEST_ATTRIBUTES | {"params", "monitors"}


def check_request(request: Mapping[str, Any]) -> tuple[str, str] | None:
    """A case's (or ``explain --request``'s) request: known attributes, ``params`` by name, ``monitors`` a list."""
    unknown = sorted(set(request) - REQUEST_KEYS)
    if unknown:
        known = ", ".join(sorted(REQUEST_KEYS))
        return f"request.{unknown[0]}", f"unknown request attribute (known: {known})"
    params = request.get("params", {})
    if not isinstance(params, dict):
        return "request.params", "must be a mapping"
    bad = sorted(set(params) - PARAM_NAMES)
    if bad:
        return f"request.params.{bad[0]}", f"unknown parameter (known: {', '.join(sorted(PARAM_NAMES))})"
    monitors = request.get("monitors", [])
    if not isinstance(monitors, list) or not all(isinstance(m, str) for m in monitors):
        return "request.monitors", "must be a list of monitor ids (those in alarm)"
    return None


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: Case
    position: int  # 1-based
    decision: Decision
    outputs: tuple[int, OutputRule] | None = None  # the outputs entry that applies (when the case pins one)

    @property
    def outputs_ok(self) -> bool:
        expected = self.case.expect_outputs
        if expected is None:
            return True
        if not expected:
            return self.outputs is None
        return self.outputs is not None and all(getattr(self.outputs[1], k) == v for k, v in expected.items())

    @property
    def passed(self) -> bool:
        actual = "allow" if self.decision.allowed else "deny"
        return (actual == self.case.expect and (self.case.rule is None or self.case.rule == self.decision.rule)
                and self.outputs_ok)

    @property
    def label(self) -> str:
        if self.case.name:
            return repr(self.case.name)
        return f"case #{self.position}" + (f" (line {self.case.line})" if self.case.line else "")

    def failure(self) -> str:
        actual = "allow" if self.decision.allowed else "deny"
        if not self.outputs_ok:
            got = "none" if self.outputs is None else describe_output(*self.outputs)
            return f"FAIL {self.label}: expected outputs {self.case.expect_outputs}, got {got}"
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


def _split(request: Mapping[str, Any]) -> tuple[dict[str, Any], Alarms]:
    """(the request attributes, ``params`` included; the monitors the case says are in alarm)."""
    attributes = {k: v for k, v in request.items() if k != "monitors"}
    return attributes, Alarms(request.get("monitors") or ())


def _decide(enforcer: PolicyEnforcer, subject: Mapping[str, Any], model: str, action: str,
            request: Mapping[str, Any], labels: Mapping[str, Any] | None) -> Explanation:
    sub = subject.get("sub", "")
    attributes, alarms = _split(request)
    return enforcer.explain(subject=sub if isinstance(sub, str) else "", roles=subject.get("roles"),
                            claims=subject, model=model, labels=labels, action=action, request=attributes,
                            monitor=alarms)


def outputs_entry(enforcer: PolicyEnforcer, subject: Mapping[str, Any], model: str, request: Mapping[str, Any],
                  labels: Mapping[str, Any] | None) -> tuple[int, OutputRule] | None:
    """The ``outputs`` entry the gateway would apply to this caller, model and request."""
    compiled = enforcer.compiled
    document = compiled.document
    if not document.outputs:
        return None
    sub = subject.get("sub", "")
    sub = sub if isinstance(sub, str) else ""
    roles = compiled.effective_roles(sub, subject.get("roles"))
    attributes, alarms = _split(request)
    choice = OutputsChoice(document.outputs, compiled.outputs_when)
    return choice.select(sub, roles, model,
                         lambda: make_facts(sub, subject.get("roles"), subject, model, labels, attributes, alarms))


def describe_output(index: int, rule: OutputRule) -> str:
    knobs = {k: getattr(rule, k) for k in ("top_k", "label_only", "round_decimals", "noise_epsilon", "keep", "when")
             if getattr(rule, k) not in (None, False, [])}
    return f"{rule.id or f'outputs[{index}]'} {knobs}"


def run_cases(enforcer: PolicyEnforcer, cases: list[Case]) -> list[CaseResult]:
    _check_monitor_ids(enforcer, cases)
    return [CaseResult(case, i, _decide(enforcer, case.subject, case.model, case.action, case.request,
                                        case.model_labels).decision,
                       outputs_entry(enforcer, case.subject, case.model, case.request, case.model_labels)
                       if case.expect_outputs is not None else None)
            for i, case in enumerate(cases, start=1)]


def _check_monitor_ids(enforcer: PolicyEnforcer, cases: list[Case]) -> None:
    known = {m.id for m in enforcer.compiled.document.monitors}
    for i, case in enumerate(cases, start=1):
        for monitor in case.request.get("monitors") or ():
            if monitor not in known:
                where = repr(case.name) if case.name else f"case #{i}"
                raise CliError(f"{where}: unknown monitor {monitor!r} (monitors: {', '.join(sorted(known)) or 'none'})")


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
