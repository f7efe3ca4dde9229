"""Which ``outputs`` entry hardens an answer, now that entries may carry ``when``.

The rule (PRODUCT.md, "Policy file"): an entry whose ``when`` holds is
preferred to every entry without one, and among those the most specific
applies (``gateway.specificity``); an entry whose ``when`` is false or
unknown does not apply (a missing claim never *weakens* hardening: it can only
keep a stricter conditional entry from applying, and the unconditional entry
then governs). Without a conditional match, the most specific entry without
``when`` applies.

WHY the conditional entries win outright rather than by specificity: they are
how a policy reacts to what it learns about a caller (``monitor.X``, a
``request.params`` lever). A wildcard "degrade anyone in alarm" entry must beat
the partner's everyday entry, or the alarm would change nothing for the very
callers it is about.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

from ..specificity import MostSpecific

if TYPE_CHECKING:
    from .document import OutputRule
    from .truth import Facts
    from .when import Condition


class OutputsChoice:
    """The ``outputs`` section of one document, compiled: answers the entry that governs a request."""

    __slots__ = ("rules", "_conditions", "_specific", "_conditional")

    def __init__(self, rules: Sequence[OutputRule], conditions: Sequence[Condition | None]) -> None:
        self.rules = list(rules)
        self._conditions = tuple(conditions) if conditions else (None,) * len(self.rules)
        self._specific = MostSpecific(self.rules)
        self._conditional = any(c is not None for c in self._conditions)

    @property
    def conditional(self) -> bool:
        """Some entry carries ``when`` (then selecting needs the request's facts)."""
        return self._conditional

    def select(self, subject: str | None, roles: Sequence[str], model: str,
               facts: Callable[[], Facts] | None = None) -> tuple[int, OutputRule] | None:
        """(index, entry) that applies, or None. ``facts`` builds what a ``when`` reads, only if one matches."""
        if not self._conditional:
            index = self._specific.index(subject, roles, model)
            return None if index is None else (index, self.rules[index])
        ranked = self._specific.ranked(subject, roles, model)
        built: Facts | None = None
        for index in ranked:
            condition = self._conditions[index]
            if condition is None:
                continue
            if built is None:
                if facts is None:
                    break  # nothing to evaluate with: a condition is unknown, so it does not apply
                built = facts()
            if condition.evaluate(built) is True:
                return index, self.rules[index]
        for index in ranked:
            if self._conditions[index] is None:
                return index, self.rules[index]
        return None
