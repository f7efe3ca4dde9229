"""Policy document -> Casbin model and policy, checked whole before anything uses it.

The security team's YAML is translated, not interpreted:

* ``roles:`` become Casbin grouping links (``g, data-scientist, analyst``); Casbin's
  role manager computes each subject's effective roles from them.
* every enforced rule becomes one Casbin policy row per (role, model pattern,
  action): ``p, analyst, sentiment-*, infer, allow, analysts-use-public-models``.
  The rule id rides along as a policy column, so Casbin's explain output names
  the deny that decided. Deny rows come first (in file order): Casbin stops at
  the first matching deny, and that is the deciding rule.
* ``mode: shadow`` rules go into a *second* enforcer that never decides anything
  (see ``enforcer.py``).
* each ``when`` is compiled by ``when.py``; the matcher calls ``cond(p.id, r.env)``,
  which delegates to the per-request evaluation object passed as ``r.env``.

Compiling is all-or-nothing: any error raises ``ConfigError`` naming the file,
line and rule, and the caller keeps whatever policy it had.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import casbin
from casbin.util.expression import SimpleEval
from casbin.util.log import disabled_logging

from ..cache import ClearWhenFull
from ..errors import ConfigError
from ..specificity import model_matches
from .document import PolicyDocument, Rule
from .when import Condition, WhenError, compile_when

BUNDLED_MODEL = Path(__file__).with_name("model.conf")
ACTIONS = frozenset({"infer", "read"})
DEFAULT_DENY = "default-deny"
RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
REQUEST_TOKENS = ["r_sub", "r_obj", "r_act", "r_env"]
POLICY_TOKENS = ["p_sub", "p_obj", "p_act", "p_eft", "p_id"]
ID_COLUMN = POLICY_TOKENS.index("p_id")
DENY_OVERRIDE = "some(where (p_eft == allow)) && !some(where (p_eft == deny))"
MAX_ROLE_MEMO = 4096  # distinct (binding, token roles) sets whose closure is remembered


class _Enforcer(casbin.Enforcer):
    """``casbin.Enforcer`` that parses its matcher once per thread instead of on every call.

    Stock pycasbin re-parses the matcher text with ``ast.parse`` on each
    ``enforce`` (about half of its cost). The parsed evaluator keeps per-call
    state, so it is cached per thread, never shared between threads.
    """

    def _get_expression(self, expr: str, functions: Any = None) -> SimpleEval:  # type: ignore[override]
        local = self.__dict__.setdefault("_expr_local", threading.local())
        cache: dict[str, SimpleEval] | None = getattr(local, "cache", None)
        if cache is None:
            cache = local.cache = {}
        found = cache.get(expr)
        if found is None or found.functions is not functions:
            found = cache[expr] = casbin.Enforcer._get_expression(expr, functions)
        return found


@dataclass(frozen=True, slots=True)
class CompiledRule:
    rule: Rule
    condition: Condition | None
    index: int  # position in the file's rules list

    @property
    def id(self) -> str:
        return self.rule.id

    @property
    def allow(self) -> bool:
        return self.rule.effect == "allow"


@dataclass(frozen=True)
class CompiledPolicy:
    """A loaded policy, immutable once built: swap the whole object to change policy."""

    document: PolicyDocument
    enforcer: casbin.Enforcer  # enforced rules; decides
    shadow_enforcer: casbin.Enforcer | None  # shadow rules; observes, never decides
    rules: Mapping[str, CompiledRule]
    model_file: Path
    outputs_when: tuple[Condition | None, ...] = ()  # per ``outputs`` entry, its compiled ``when``
    reads_monitors: bool = False  # some rule's condition reads monitor.*
    # cheap to recompute and few in steady state: emptied when full
    _role_memo: ClearWhenFull[tuple[str | None, frozenset[str]], tuple[str, ...]] = field(
        default_factory=lambda: ClearWhenFull(MAX_ROLE_MEMO), repr=False)

    def effective_roles(self, subject: str, token_roles: Any) -> tuple[str, ...]:
        """Token roles + static bindings, closed under inheritance, sorted.

        A roles claim that is not a list of strings counts as no roles (never an error).
        """
        direct = frozenset(r for r in token_roles if isinstance(r, str) and r) \
            if isinstance(token_roles, (list, tuple, frozenset, set)) else frozenset()
        bound = subject if subject in self.document.subjects else None
        key = (bound, direct)
        found = self._role_memo.get(key)
        if found is not None:
            return found
        names = set(direct)
        if bound is not None:
            names.update(self.document.subjects[bound])
        closed = set(names)
        for name in names:
            closed.update(self.enforcer.get_implicit_roles_for_user(name))
        closed.discard("*")
        return self._role_memo.put(key, tuple(sorted(closed)))


def read_model(model_file: Path | None) -> tuple[Path, str]:
    path = model_file or BUNDLED_MODEL
    try:
        return path, path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(exc.strerror or str(exc), file=str(path)) from None


def compile_policy(document: PolicyDocument, model_file: Path | None = None) -> CompiledPolicy:
    """Check and compile a policy document, or raise ``ConfigError`` (one line, with file:line)."""
    path, model_text = read_model(model_file)
    _check_roles(document)
    compiled_rules: dict[str, CompiledRule] = {}
    for index, rule in enumerate(document.rules):
        compiled_rules[rule.id] = CompiledRule(rule, _check_rule(document, rule, index), index)
    enforced = [c for c in compiled_rules.values() if c.rule.mode == "enforce"]
    shadow = [c for c in compiled_rules.values() if c.rule.mode == "shadow"]
    ordered = [c for c in enforced if not c.allow] + [c for c in enforced if c.allow]
    links = [[child, parent] for child, parents in document.roles.items() for parent in parents]
    enforcer = _new_enforcer(path, model_text, _rows(ordered), links)
    shadow_enforcer = _new_enforcer(path, model_text, _rows(shadow), links) if shadow else None
    outputs_when = compile_outputs(document)
    monitor_ids = {m.id for m in document.monitors}
    for c in compiled_rules.values():
        _check_monitors(document, c.condition, monitor_ids, f"rules[{c.index}].when", c.rule.line)
    for index, condition in enumerate(outputs_when):
        _check_monitors(document, condition, monitor_ids, f"outputs[{index}].when", document.outputs[index].line)
    reads_monitors = any(c.condition is not None and any(p[0] == "monitor" for p in c.condition.paths)
                         for c in compiled_rules.values())
    return CompiledPolicy(document, enforcer, shadow_enforcer, MappingProxyType(compiled_rules), path,
                          outputs_when, reads_monitors)


def compile_outputs(document: PolicyDocument) -> tuple[Condition | None, ...]:
    """Each ``outputs`` entry's ``when``, compiled (``ConfigError`` with file:line on a bad one)."""
    out: list[Condition | None] = []
    for index, entry in enumerate(document.outputs):
        if entry.when is None:
            out.append(None)
            continue
        try:
            out.append(compile_when(entry.when))
        except WhenError as exc:
            raise _error(document, f"outputs[{index}].when", f"when: {exc}", entry.line or None) from None
    return tuple(out)


def _check_monitors(document: PolicyDocument, condition: Condition | None, known: set[str], key: str,
                    line: int) -> None:
    """``monitor.ID`` must name a monitor of this policy (a typo would read as "never in alarm")."""
    if condition is None:
        return
    for p in sorted(condition.paths):
        if p[0] == "monitor" and p[1] not in known:
            names = ", ".join(sorted(known)) or "none defined"
            raise _error(document, key, f"unknown monitor {p[1]!r} (monitors: {names})", line or None)


def _rows(rules: Iterable[CompiledRule]) -> list[list[str]]:
    rows: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for c in rules:
        r = c.rule
        for role in r.roles:
            for model in r.models:
                for action in r.actions:
                    row = [role, model, action, r.effect, r.id]
                    if tuple(row) not in seen:
                        seen.add(tuple(row))
                        rows.append(row)
    return rows


def _cond(rule_id: str, env: Any) -> bool:
    """The matcher's ``cond(p.id, r.env)``: ``env`` is the request's evaluation (enforcer.py)."""
    check = getattr(env, "cond", None)
    return bool(check(rule_id)) if check is not None else False


def _new_enforcer(path: Path, model_text: str, rows: list[list[str]], links: list[list[str]]) -> casbin.Enforcer:
    disabled_logging()  # Casbin would log the model, and every request with its arguments
    try:
        model = casbin.Enforcer.new_model(text=model_text)
        enforcer = _Enforcer(model)
    except Exception as exc:  # pycasbin raises assorted types for a bad model file
        raise ConfigError(f"invalid Casbin model: {exc}", file=str(path)) from None
    _check_model(path, enforcer)
    enforcer.add_function("cond", _cond)
    # model patterns mean what they mean in quotas and outputs (shell-style, ``gateway.specificity``), not what the
    # installed Casbin's globMatch does (casbin 1.43's ignores the character after a last `*`: "a*c" matched
    # "abd"; pycasbin 2's expands braces); remembered, so an uncached decision does not re-match its patterns
    enforcer.add_function("globMatch", model_matches)
    if rows:
        enforcer.add_policies(rows)
    if links:
        enforcer.add_grouping_policies(links)
    return enforcer


def _check_model(path: Path, enforcer: casbin.Enforcer) -> None:
    model = enforcer.get_model().model

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message, file=str(path))

    need("r" in model and "r" in model["r"] and model["r"]["r"].tokens == REQUEST_TOKENS,
         "the request definition must be: r = sub, obj, act, env")
    need("p" in model and "p" in model["p"] and model["p"]["p"].tokens == POLICY_TOKENS,
         "the policy definition must be: p = sub, obj, act, eft, id")
    need("g" in model and "g" in model["g"], "the model needs a role definition: g = _, _")
    need(model["e"]["e"].value.replace(" ", "") == DENY_OVERRIDE.replace(" ", ""),
         "the policy effect must be deny-override: some(where (p.eft == allow)) && !some(where (p.eft == deny))")
    need("cond(p_id,r_env)" in model["m"]["m"].value.replace(" ", ""),
         "the matcher must call cond(p.id, r.env), or `when` conditions would be ignored")


def _error(document: PolicyDocument, key: str, message: str, line: int | None = None) -> ConfigError:
    source = document.source
    if source is None:
        return ConfigError(message, key=key)
    return ConfigError(message, file=source.file, line=line or source.line(key), key=key)


def _check_roles(document: PolicyDocument) -> None:
    for role, parents in document.roles.items():
        if not role or role == "*" or role != role.strip():
            raise _error(document, f"roles.{role}", "a role name must be non-empty, not '*', without spaces around it")
        for parent in parents:
            if not isinstance(parent, str) or not parent or parent == "*":
                raise _error(document, f"roles.{role}", "inherited roles must be non-empty role names, not '*'")
    for subject, roles in document.subjects.items():
        for role in roles:
            if not isinstance(role, str) or not role or role == "*":
                raise _error(document, f"subjects.{subject}", "a subject binding lists role names, not '*'")
    # inheritance must be a hierarchy: a cycle is almost always a typo and makes every role in it equal
    state: dict[str, int] = {}

    def visit(role: str, trail: list[str]) -> None:
        state[role] = 1
        for parent in document.roles.get(role, []):
            if state.get(parent) == 1:
                cycle = " -> ".join(trail[trail.index(parent):] + [parent]) if parent in trail else parent
                raise _error(document, f"roles.{role}", f"role inheritance has a cycle: {cycle}")
            if state.get(parent) is None:
                visit(parent, trail + [parent])
        state[role] = 2

    for role in document.roles:
        if role not in state:
            visit(role, [role])


def _check_rule(document: PolicyDocument, rule: Rule, index: int) -> Condition | None:
    key = f"rules[{index}]"

    def fail(field_name: str, message: str) -> ConfigError:
        return _error(document, f"{key}.{field_name}", f"rule {rule.id!r}: {message}", rule.line or None)

    if not RULE_ID.match(rule.id) or rule.id == DEFAULT_DENY:
        raise fail("id", "a rule id is 1-128 characters of letters, digits and ._:- (and not 'default-deny')")
    for name in ("roles", "models", "actions"):
        values = getattr(rule, name)
        if not values:
            raise fail(name, f"{name} must list at least one entry (use \"*\" for any)")
        for value in values:
            if not isinstance(value, str) or not value.strip() or value != value.strip():
                raise fail(name, f"{name} entries must be non-empty names without surrounding spaces")
    for model in rule.models:
        if "/" in model:
            raise fail("models", f"model pattern {model!r} contains '/', which no model name can")
    for action in rule.actions:
        if action != "*" and action not in ACTIONS:
            raise fail("actions", f"unknown action {action!r} (actions are: infer, read, \"*\")")
    if rule.when is None:
        return None
    try:
        return compile_when(rule.when)
    except WhenError as exc:
        raise fail("when", f"when: {exc}") from None
