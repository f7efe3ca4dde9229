"""The most specific entry of a policy list that applies to a caller and a model.

Two sections of the policy file pick one entry per request by the same rule:
``quotas:`` (which limits govern) and ``outputs:`` (how much of an answer a
caller gets). Both entries select by ``models``, ``roles`` and ``subjects``,
and the rule lives here once so the two cannot drift apart.

An entry *matches* when

* the model matches one of its ``models`` (exact names or shell-style globs:
  ``*``, ``?``, ``[...]``), and
* it applies to the caller: ``subjects`` lists the caller's subject, or
  ``roles`` shares a role with the caller's effective roles, or it names
  everyone (``roles: ["*"]``, ``subjects: ["*"]``, or neither list names
  anybody).

"Most specific" is decided by three keys, in this order:

1. **who**: naming the caller's subject beats matching through a named role,
   which beats applying to everyone;
2. **model**: an exact model name beats a glob, which beats ``"*"``;
3. **file order**: among entries still equal, the first in the file wins.

This module is a leaf (it imports nothing of the gateway), so any package may
use it without an import cycle.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

# specificity tiers (higher wins)
WHO_EVERYONE, WHO_ROLE, WHO_SUBJECT = 0, 1, 2
MODEL_ANY, MODEL_GLOB, MODEL_EXACT = 0, 1, 2

_GLOB_CHARS = re.compile(r"[*?\[]")


class Selecting(Protocol):
    """What an entry must carry to be selected: the policy file's selector fields."""

    @property
    def models(self) -> list[str]: ...

    @property
    def roles(self) -> list[str] | None: ...

    @property
    def subjects(self) -> list[str] | None: ...


def model_matcher(pattern: str) -> tuple[int, Callable[[str], bool]]:
    """(model tier, predicate) for one ``models`` pattern, compiled once."""
    if pattern == "*":
        return MODEL_ANY, lambda model: True
    if _GLOB_CHARS.search(pattern):
        rx = re.compile(fnmatch.translate(pattern))
        return MODEL_GLOB, lambda model: rx.match(model) is not None
    return MODEL_EXACT, pattern.__eq__


@functools.lru_cache(maxsize=4096)
def model_matches(model: str, pattern: str) -> bool:
    """Whether ``model`` matches one ``models`` pattern: the same rule for policy rules (Casbin's ``globMatch``
    is this function), quotas, outputs and monitors, so one pattern never means two things in one file."""
    return model_matcher(pattern)[1](model)


@dataclass(frozen=True, slots=True)
class Selector:
    """One entry's selectors, compiled so a request costs set lookups, not parsing."""

    subjects: frozenset[str]
    roles: frozenset[str]
    everyone: bool
    models: tuple[tuple[int, Callable[[str], bool]], ...]  # (model tier, matcher), best tier first

    @classmethod
    def of(cls, entry: Selecting) -> Selector:
        subjects = frozenset(entry.subjects or ())
        roles = frozenset(entry.roles or ())
        everyone = (not entry.subjects and not entry.roles) or "*" in roles or "*" in subjects
        models = tuple(sorted((model_matcher(p) for p in entry.models), key=lambda m: -m[0]))
        return cls(subjects - {"*"}, roles - {"*"}, everyone, models)

    def rank(self, subject: str | None, roles: frozenset[str], model: str) -> tuple[int, int] | None:
        """(who tier, model tier) when this entry matches, else None."""
        if subject is not None and subject in self.subjects:
            who = WHO_SUBJECT
        elif self.roles and not roles.isdisjoint(self.roles):
            who = WHO_ROLE
        elif self.everyone:
            who = WHO_EVERYONE
        else:
            return None
        tier = next((t for t, matches in self.models if matches(model)), None)
        return None if tier is None else (who, tier)


class MostSpecific:
    """A compiled list of entries; answers the index of the one that governs a request."""

    __slots__ = ("_selectors",)

    def __init__(self, entries: Sequence[Selecting]) -> None:
        self._selectors = tuple(Selector.of(entry) for entry in entries)

    def ranked(self, subject: str | None, roles: Sequence[str], model: str) -> list[int]:
        """Positions of every matching entry, most specific first (for entries that may still not apply)."""
        role_set = frozenset(roles)
        found = []
        for i, selector in enumerate(self._selectors):
            rank = selector.rank(subject, role_set, model)
            if rank is not None:
                found.append((rank[0], rank[1], -i))
        return [-r[2] for r in sorted(found, reverse=True)]

    def index(self, subject: str | None, roles: Sequence[str], model: str) -> int | None:
        """The position of the most specific matching entry, or None when none matches."""
        best: tuple[int, int, int] | None = None
        winner: int | None = None
        role_set = frozenset(roles)
        for i, selector in enumerate(self._selectors):
            found = selector.rank(subject, role_set, model)
            if found is None:
                continue
            rank = (found[0], found[1], -i)
            if best is None or rank > best:
                best, winner = rank, i
        return winner
