"""Three-valued truth and the facts a condition reads: the evaluator's half of the ``when`` language.

``when.py`` turns text into closures; the closures compute with the values here. A condition
evaluates to ``True``, ``False`` or ``UNKNOWN`` (Kleene logic): reading an attribute the request does
not carry, comparing values of incompatible kinds, or using a non-boolean as a truth value gives
``UNKNOWN``, and ``UNKNOWN`` refuses ``bool()`` so no code can silently treat it as false.
``Facts.read`` records every path read with a *token* of its value; equal tokens make every
expression evaluate identically, which is what lets the decision cache key on exactly what a
decision read.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Callable

Path = tuple[str, ...]

class _Unknown:
    """The third truth value. It refuses ``bool()`` so no code can silently treat it as false."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "unknown"

    def __bool__(self) -> bool:
        raise TypeError("UNKNOWN has no boolean value; test it with `is UNKNOWN`")


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "missing"


UNKNOWN: Any = _Unknown()


class Alarms(Mapping[str, bool]):
    """``monitor.*``: True for each monitor id in alarm, False for any other id (never missing).

    Which ids exist is checked when the policy compiles; here every name reads
    as a boolean, so a monitor condition is never unknown.
    """

    __slots__ = ("_ids",)

    def __init__(self, ids: Any = ()) -> None:
        self._ids = frozenset(ids)

    def __getitem__(self, name: str) -> bool:
        return name in self._ids

    def get(self, name: str, default: Any = None) -> bool:  # type: ignore[override]
        return name in self._ids

    def __iter__(self) -> Any:
        return iter(sorted(self._ids))

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"Alarms({sorted(self._ids)!r})"


_NO_MONITORS: Mapping[str, bool] = Alarms()
MISSING: Any = _Missing()
Truth = Any  # True | False | UNKNOWN


# ---------------------------------------------------------------------------
# values, kinds and tokens


def kind_of(value: Any) -> str:
    """The comparison kind of a value; values of different kinds never order against each other."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "other"  # NaN compares false both ways: it could switch a deny off
        return "num"
    if isinstance(value, str):
        return "str"
    return "other"


def value_token(value: Any) -> tuple[Any, ...]:
    """A hashable stand-in for ``value``: equal tokens => every condition evaluates the same.

    Structured values (lists, objects, NaN) only ever yield UNKNOWN or "not equal to a
    scalar", so their content does not matter; their kind does.
    """
    cls = type(value)
    if cls is str:  # the common claim values first, exactly as kind would classify them
        return ("str", value)
    if cls is int:  # not bool: type(True) is bool
        return ("num", value)
    if value is MISSING:
        return ("missing",)
    if cls is list or cls is tuple:  # 'x' in LIST reads the members: lists of scalars are told apart by them
        items = tuple(value_token(v) for v in value)
        return ("list", items) if all(t[0] in ("str", "num", "bool", "none") for t in items) else ("other",)
    kind = kind_of(value)
    if kind == "other":
        return ("other",)
    return (kind, value)


def truth(value: Any) -> Truth:
    if value is True or value is False:
        return value
    return UNKNOWN


class Facts:
    """What a condition may read for one request: subject claims, model, request attributes.

    ``reads`` records every path read, with its value token, in the order read;
    ``read_request`` says whether any ``request.*`` attribute was read;
    ``read_monitor`` whether any ``monitor.*`` was (a monitor's alarm changes
    without the caller's identity changing: the enforcer's identity memo keys
    on the alarm state when the policy's rules read monitors).

    ``monitor`` maps every monitor id of the policy to True (in alarm for this
    caller and model) or False: a monitor is never unknown.
    """

    __slots__ = ("roots", "reads", "read_request", "read_monitor")

    def __init__(self, subject: Mapping[str, Any], model: Mapping[str, Any], request: Mapping[str, Any],
                 monitor: Mapping[str, bool] | None = None) -> None:
        self.roots: dict[str, Mapping[str, Any]] = {"subject": subject, "model": model, "request": request,
                                                    "monitor": monitor if monitor is not None else _NO_MONITORS}
        self.reads: dict[Path, tuple[Any, ...]] = {}
        self.read_request = False
        self.read_monitor = False

    def lookup(self, path: Path) -> Any:
        """The value at ``path`` or ``MISSING``; records nothing."""
        current: Any = self.roots.get(path[0], MISSING)
        for name in path[1:]:
            cls = type(current)  # exact-type checks first: the ABC isinstance is slow and claims are a proxy
            if cls is not dict and cls is not MappingProxyType and not isinstance(current, Mapping):
                return MISSING
            current = current.get(name, MISSING)
            if current is MISSING:
                return MISSING
        return current

    def read(self, path: Path) -> Any:
        value = self.lookup(path)
        if path not in self.reads:
            self.reads[path] = value_token(value)
            if path[0] == "request":
                self.read_request = True
            elif path[0] == "monitor":
                self.read_monitor = True
        return value

    def __repr__(self) -> str:  # never print claims (Casbin's request log calls str() on every argument)
        return "<facts>"


ORDER = {
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
}


def compare(op: ast.cmpop, left: Any, right: Any) -> Truth:
    if left is UNKNOWN or right is UNKNOWN:
        return UNKNOWN
    lk, rk = kind_of(left), kind_of(right)
    if lk == "other" or rk == "other":
        return UNKNOWN
    if isinstance(op, (ast.Eq, ast.NotEq)):
        equal = lk == rk and left == right
        return equal if isinstance(op, ast.Eq) else not equal
    if lk != rk or lk not in ("num", "str"):
        return UNKNOWN
    return ORDER[type(op)](left, right)


def present(value: Any) -> Any:
    return UNKNOWN if value is MISSING else value


def member(value: Any, members: tuple[tuple[str, Any], ...], negate: bool) -> Truth:
    if value is UNKNOWN:
        return UNKNOWN
    kind = kind_of(value)
    if kind == "other":
        return UNKNOWN
    found = any(k == kind and v == value for k, v in members)
    return not found if negate else found


def contains(listing: Any, needle: Any, negate: bool) -> Truth:
    """``'literal' in LIST_ATTRIBUTE``: unknown when the attribute is absent or not a list."""
    if listing is MISSING or not isinstance(listing, (list, tuple)):
        return UNKNOWN
    kind = kind_of(needle)
    found = any(kind_of(v) == kind and v == needle for v in listing)
    return not found if negate else found


def not_(value: Truth) -> Truth:
    return UNKNOWN if value is UNKNOWN else not value


def _kleene(parts: list[Callable[[Facts], Any]], decisive: bool) -> Callable[[Facts], Truth]:
    """Three-valued AND (``decisive`` False) or OR (True): one decisive part decides, even past an
    unknown one; else any unknown part makes the whole unknown."""
    def run(f: Facts) -> Truth:
        unknown = False
        for part in parts:
            t = truth(part(f))
            if t is decisive:
                return decisive
            if t is UNKNOWN:
                unknown = True
        return UNKNOWN if unknown else not decisive

    return run


def and_(parts: list[Callable[[Facts], Any]]) -> Callable[[Facts], Truth]:
    return _kleene(parts, False)


def or_(parts: list[Callable[[Facts], Any]]) -> Callable[[Facts], Truth]:
    return _kleene(parts, True)
