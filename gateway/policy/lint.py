"""``policy lint``: rules that cannot do what their author meant.

Lint reads the policy document alone (roles, rules, bindings), never a
decision, so it is kept apart from the test runner and explanations in
``testing``; ``check`` and the ``policy`` CLI both call it.
"""

from __future__ import annotations


from ..findings import Finding, Severity
from ..specificity import model_matches
from .document import PolicyDocument, Rule

MAX_RULE_ROWS = 1000  # Casbin rows one rule may expand to before lint calls it slow


def _closure(document: PolicyDocument, role: str) -> set[str]:
    seen, todo = {role}, [role]
    while todo:
        for parent in document.roles.get(todo.pop(), []):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


def _covers(document: PolicyDocument, deny: Rule, allow: Rule) -> bool:
    """Whether ``deny`` (unconditional) matches every request ``allow`` could match."""
    if "*" not in deny.roles:
        if "*" in allow.roles:
            return False
        if not all(_closure(document, r) & set(deny.roles) for r in allow.roles):
            return False
    if "*" not in deny.models and not all(any(model_matches(a, d) for d in deny.models) for a in allow.models):
        return False
    if "*" not in deny.actions and ("*" in allow.actions or not set(allow.actions) <= set(deny.actions)):
        return False
    return True


def lint(document: PolicyDocument) -> list[Finding]:
    """Findings for a (valid) policy: ``high`` fails ``policy lint``; the rest warn."""
    file = document.source.file if document.source else "policy"
    out: list[Finding] = []

    def where(rule: Rule) -> str:
        return f"{file}:{rule.line} rule {rule.id}" if rule.line else f"{file} rule {rule.id}"

    enforced = [r for r in document.rules if r.mode == "enforce"]
    for rule in document.rules:
        everything = rule.roles == ["*"] and rule.models == ["*"] and rule.actions == ["*"]
        if rule.effect == "allow" and everything and rule.mode == "enforce":
            severity: Severity = "medium" if rule.when else "high"
            out.append(Finding(severity, where(rule), "allows every role, model and action"
                               + (" (only its condition limits it)" if rule.when else "")))
        if rule.effect == "deny" and everything and not rule.when and rule.mode == "enforce":
            out.append(Finding("medium", where(rule), "denies every request: no allow rule can ever apply"))
        rows = len(rule.roles) * len(rule.models) * len(rule.actions)
        if rows > MAX_RULE_ROWS:
            out.append(Finding("low", where(rule), f"expands to {rows} Casbin rows; uncached decisions get slow"))
    for allow in (r for r in enforced if r.effect == "allow"):
        for deny in (r for r in enforced if r.effect == "deny" and not r.when):
            if not (deny.roles == ["*"] and deny.models == ["*"] and deny.actions == ["*"]) \
                    and _covers(document, deny, allow):
                out.append(Finding("medium", where(allow),
                                   f"can never allow: unconditional deny rule {deny.id!r} (line {deny.line}) "
                                   "covers all of its roles, models and actions"))
                break
    defined = set(document.roles)
    for rule in document.rules:
        for role in rule.roles:
            if role != "*" and role not in defined:
                out.append(Finding("medium", where(rule), f"role {role!r} is not defined under roles:"))
    for subject, roles in document.subjects.items():
        for role in roles:
            if role not in defined:
                line = document.source.line(f"subjects.{subject}") if document.source else None
                at = f"{file}:{line} subject {subject}" if line else f"{file} subject {subject}"
                out.append(Finding("medium", at, f"role {role!r} is not defined under roles:"))
    for role, parents in document.roles.items():
        for parent in parents:
            if parent not in defined:
                line = document.source.line(f"roles.{role}") if document.source else None
                out.append(Finding("low", f"{file}:{line} role {role}" if line else f"{file} role {role}",
                                   f"inherits {parent!r}, which is not defined under roles:"))
    return out

