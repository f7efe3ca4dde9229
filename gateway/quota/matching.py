"""Which quota entry governs a request: the most specific one that matches.

An entry of the policy file's ``quotas:`` list *matches* a request when

* the request's model matches one of the entry's ``models`` (exact names or
  shell-style globs: ``*``, ``?``, ``[...]``, as in the rules), and
* the entry applies to the caller: its ``subjects`` lists the caller's subject,
  or its ``roles`` shares a role with the caller's effective roles (token or
  API-key roles, static bindings and inherited roles, as the authorise stage
  resolved them), or it names everyone (``roles: ["*"]``, ``subjects: ["*"]``,
  or neither ``roles`` nor ``subjects``).

"Most specific" is decided by three keys, in this order:

1. **who**: an entry that names the caller's subject beats one that matches
   through a named role, which beats one that applies to everyone;
2. **model**: among those, an entry whose matching pattern is the exact model
   name beats one that matches through a glob, which beats ``"*"``;
3. **file order**: among entries still equal, the first in the file wins.

Only the single winning entry applies; its limits are not combined with any
other entry's. A request that no entry matches is not rate-limited
(``quota: none`` in the audit line).

Matching is precomputed per policy document and its answers are cached per
(subject, roles, model), so the hot path costs one dictionary lookup.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from .store import Limits

if TYPE_CHECKING:
    from ..policy.document import PolicyDocument, QuotaRule

# specificity tiers (higher wins)
WHO_EVERYONE, WHO_ROLE, WHO_SUBJECT = 0, 1, 2
MODEL_ANY, MODEL_GLOB, MODEL_EXACT = 0, 1, 2

CACHE_SIZE = 10_000  # (subject, roles, model) answers kept per document; cleared when full

_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class QuotaEntry:
    """One compiled quota entry: its stable id, position and limits."""

    id: str  # the rule's ``id``, else a hash of its selectors (stable across edits of its limits)
    index: int  # position in the file
    line: int
    limits: Limits
    rule: QuotaRule


@dataclass(frozen=True, slots=True)
class _Compiled:
    entry: QuotaEntry
    subjects: frozenset[str]
    roles: frozenset[str]
    everyone: bool
    models: tuple[tuple[int, Callable[[str], bool]], ...]  # (model tier, matcher), best tier first


def entry_id(rule: QuotaRule, occurrence: int) -> str:
    """A stable id for an entry without one: the hash of who and what it selects.

    Not of its limits, so raising ``burst`` on reload keeps everyone's bucket;
    ``occurrence`` separates entries that select exactly the same requests.
    """
    if rule.id:
        return rule.id
    basis = repr((sorted(rule.models), sorted(rule.roles or []), sorted(rule.subjects or []), occurrence))
    return "q-" + hashlib.sha256(basis.encode()).hexdigest()[:12]


def _model_matcher(pattern: str) -> tuple[int, Callable[[str], bool]]:
    if pattern == "*":
        return MODEL_ANY, lambda model: True
    if _GLOB_CHARS.search(pattern):
        rx = re.compile(fnmatch.translate(pattern))
        return MODEL_GLOB, lambda model: rx.match(model) is not None
    return MODEL_EXACT, pattern.__eq__


def _limits(rule: QuotaRule) -> Limits:
    return Limits(
        rate_per_s=float(rule.rate_per_s or 0.0),
        burst=int(rule.burst or 0),
        max_concurrent=int(rule.max_concurrent or 0),
        tokens_per_minute=int(rule.tokens_per_minute or 0),
    )


class QuotaMatcher:
    """The compiled ``quotas:`` section of one policy document."""

    def __init__(self, rules: Sequence[QuotaRule]) -> None:
        compiled: list[_Compiled] = []
        seen: dict[str, int] = {}
        for index, rule in enumerate(rules):
            basis = repr((sorted(rule.models), sorted(rule.roles or []), sorted(rule.subjects or [])))
            occurrence = seen[basis] = seen.get(basis, -1) + 1
            entry = QuotaEntry(entry_id(rule, occurrence), index, rule.line, _limits(rule), rule)
            subjects = frozenset(rule.subjects or ())
            roles = frozenset(rule.roles or ())
            everyone = (not rule.subjects and not rule.roles) or "*" in roles or "*" in subjects
            models = tuple(sorted((_model_matcher(p) for p in rule.models), key=lambda m: -m[0]))
            compiled.append(_Compiled(entry, subjects - {"*"}, roles - {"*"}, everyone, models))
        self._entries = tuple(compiled)
        self._cache: dict[tuple[str, tuple[str, ...], str], QuotaEntry | None] = {}

    @property
    def entries(self) -> tuple[QuotaEntry, ...]:
        return tuple(c.entry for c in self._entries)

    def match(self, subject: str, roles: tuple[str, ...], model: str) -> QuotaEntry | None:
        """The most specific entry for this caller and model, or None."""
        key = (subject, roles, model)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = self._select(subject, roles, model)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = found
        return found

    def _select(self, subject: str, roles: tuple[str, ...], model: str) -> QuotaEntry | None:
        best: tuple[int, int, int] | None = None
        winner: QuotaEntry | None = None
        role_set = frozenset(roles)
        for c in self._entries:
            if subject in c.subjects:
                who = WHO_SUBJECT
            elif c.roles and not role_set.isdisjoint(c.roles):
                who = WHO_ROLE
            elif c.everyone:
                who = WHO_EVERYONE
            else:
                continue
            tier = next((t for t, matches in c.models if matches(model)), None)
            if tier is None:
                continue
            rank = (who, tier, -c.entry.index)
            if best is None or rank > best:
                best, winner = rank, c.entry
        return winner


class MatcherCache:
    """Keeps the matcher of the policy document in force; recompiles when a reload swaps it."""

    def __init__(self) -> None:
        self._document: PolicyDocument | None = None
        self._matcher: QuotaMatcher | None = None

    def get(self, document: PolicyDocument) -> QuotaMatcher:
        if document is not self._document or self._matcher is None:
            self._matcher = QuotaMatcher(document.quotas)
            self._document = document
        return self._matcher
