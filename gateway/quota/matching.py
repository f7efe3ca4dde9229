"""Which quota entry governs a request: the most specific one that matches.

An entry of the policy file's ``quotas:`` list governs a request when it is
the most specific entry that matches the caller (subject, effective roles as
the authorise stage resolved them) and the model; the rule is the one in
:mod:`gateway.specificity`, shared with output hardening.

Only the single winning entry applies; its limits are not combined with any
other entry's. A request that no entry matches is not rate-limited
(``quota: none`` in the audit line).

Matching is precomputed per policy document and its answers are cached per
(subject, roles, model), so the hot path costs one dictionary lookup.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..cache import ClearWhenFull
from ..specificity import MostSpecific
from .store import Limits

if TYPE_CHECKING:
    from ..policy.document import PolicyDocument, QuotaRule

CACHE_SIZE = 10_000  # (subject, roles, model) answers kept per document; cleared when full


@dataclass(frozen=True, slots=True)
class QuotaEntry:
    """One compiled quota entry: its stable id, position and limits."""

    id: str  # the rule's ``id``, else a hash of its selectors (stable across edits of its limits)
    index: int  # position in the file
    line: int
    limits: Limits
    rule: QuotaRule


def entry_id(rule: QuotaRule, occurrence: int) -> str:
    """A stable id for an entry without one: the hash of who and what it selects.

    Not of its limits, so raising ``burst`` on reload keeps everyone's bucket;
    ``occurrence`` separates entries that select exactly the same requests.
    """
    if rule.id:
        return rule.id
    basis = repr((sorted(rule.models), sorted(rule.roles or []), sorted(rule.subjects or []), occurrence))
    return "q-" + hashlib.sha256(basis.encode()).hexdigest()[:12]


def _limits(rule: QuotaRule) -> Limits:
    return Limits(
        rate_per_s=float(rule.rate_per_s or 0.0),
        burst=int(rule.burst or 0),
        max_concurrent=int(rule.max_concurrent or 0),
        tokens_per_minute=int(rule.tokens_per_minute or 0),
        per_day=int(rule.per_day or 0),
        per_month=int(rule.per_month or 0),
        rows=rule.cost == "rows",
    )


class QuotaMatcher:
    """The compiled ``quotas:`` section of one policy document."""

    def __init__(self, rules: Sequence[QuotaRule]) -> None:
        entries: list[QuotaEntry] = []
        seen: dict[str, int] = {}
        for index, rule in enumerate(rules):
            basis = repr((sorted(rule.models), sorted(rule.roles or []), sorted(rule.subjects or [])))
            occurrence = seen[basis] = seen.get(basis, -1) + 1
            entries.append(QuotaEntry(entry_id(rule, occurrence), index, rule.line, _limits(rule), rule))
        self._entries = tuple(entries)
        self._most_specific = MostSpecific(rules)
        # None ("no entry applies") is an answer too: read with [] and KeyError, not get
        self._cache: ClearWhenFull[tuple[str, tuple[str, ...], str], QuotaEntry | None] = ClearWhenFull(CACHE_SIZE)

    @property
    def entries(self) -> tuple[QuotaEntry, ...]:
        return self._entries

    def match(self, subject: str, roles: tuple[str, ...], model: str) -> QuotaEntry | None:
        """The most specific entry for this caller and model, or None."""
        key = (subject, roles, model)
        try:
            return self._cache[key]
        except KeyError:
            pass
        return self._cache.put(key, self._select(subject, roles, model))

    def _select(self, subject: str, roles: tuple[str, ...], model: str) -> QuotaEntry | None:
        index = self._most_specific.index(subject, roles, model)
        return None if index is None else self._entries[index]


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
