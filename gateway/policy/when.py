"""The ``when`` condition language: a small, closed expression language for ABAC.

Security teams write conditions such as::

    subject.clearance >= 3 and request.mtls
    subject has employment and subject.employment == 'contractor'
    model.labels.sensitivity in ['public', 'internal']

WHY a hand-checked subset of Python rather than ``eval`` or simpleeval: a policy
file must never be a way to run code in the gateway, and a missing claim must
never open a door. So the text is parsed with ``ast`` in ``eval`` mode and only a
white-list of node types survives (boolean logic, comparisons, ``in`` on a
literal list or ``'literal' in LIST_ATTRIBUTE``, literals, attribute chains rooted
at ``subject``, ``model``, ``request`` (``request.params.NAME`` for the names of
``gateway.request_params``) or ``monitor`` (``monitor.ID``: true/false, never unknown;
which ids exist is checked by the compiler against the policy's ``monitors``)). Everything is compiled to closures once, when the policy loads;
the request path never parses anything.

Three-valued logic (Kleene): a condition evaluates to ``True``, ``False`` or
``UNKNOWN``. Reading an attribute the request does not carry gives ``UNKNOWN``;
so does comparing values of incompatible kinds (``'a' < 3``), using a non-boolean
as a truth value, or comparing structured claims (lists, objects). ``false and
unknown`` is false, ``true or unknown`` is true, ``not unknown`` is unknown. The
caller decides what unknown means for a rule (allow: does not apply; deny: applies).

``X has NAME`` tests presence and is never unknown. It is not Python syntax: the
tokens are rewritten to a call of ``__maas_has__`` before parsing. Any name the
author writes that starts with ``_`` is refused *before* the rewrite, so the only
``__maas_has__`` that can reach the evaluator is the one the rewrite put there.

Every attribute read goes through ``Facts.read``, which records the path and a
*token* of the value. Two values with equal tokens make every expression evaluate
identically (that is what ``value_token`` guarantees, and the evaluator keeps),
which is what lets the decision cache key on exactly what a decision read.
"""

from __future__ import annotations

import ast
import io
import keyword
import tokenize
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, cast

from ..request_params import PARAM_NAMES
from .truth import (MISSING, UNKNOWN, Facts, Path, Truth, and_, compare, contains, kind_of, member, not_, or_, present,
                    truth)

ROOTS = ("subject", "model", "request", "monitor")
REQUEST_ATTRIBUTES = frozenset({"ip", "mtls", "hour", "method", "path"})
MODEL_ATTRIBUTES = frozenset({"name", "labels"})
MAX_LENGTH = 1000  # characters in one condition
MAX_NODES = 200  # AST nodes in one condition
MAX_DEPTH = 32  # nesting of the AST
MAX_CHAIN = 8  # names in one attribute chain (subject.a.b.c ...)
_HAS = "__maas_has__"


class WhenError(ValueError):
    """A condition is not valid in the ``when`` language. The message says what to change."""


# ---------------------------------------------------------------------------
# compiled conditions


@dataclass(frozen=True, slots=True)
class Condition:
    """A checked, compiled condition. ``paths``: every attribute it can read (static)."""

    text: str
    paths: frozenset[Path]
    _fn: Callable[[Facts], Truth]

    @property
    def reads_request(self) -> bool:
        return any(p[0] == "request" for p in self.paths)

    def evaluate(self, facts: Facts) -> Truth:
        return truth(self._fn(facts))


def compile_when(text: str) -> Condition:
    """Check and compile one condition, or raise ``WhenError`` saying what is wrong."""
    if not isinstance(text, str):
        raise WhenError("a condition must be a string")
    if len(text) > MAX_LENGTH:
        raise WhenError(f"condition is {len(text)} characters long; the limit is {MAX_LENGTH}")
    source = _rewrite_has(text)
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        raise WhenError(f"syntax error: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise WhenError("condition is too deeply nested") from None
    count = sum(1 for _ in ast.walk(tree))
    if count > MAX_NODES:
        raise WhenError(f"condition has {count} parts; the limit is {MAX_NODES}")
    compiler = _Compiler()
    fn = compiler.value(tree.body, 0)
    return Condition(text, frozenset(compiler.paths), fn)


# ---------------------------------------------------------------------------
# `X has NAME` -> __maas_has__(X.NAME)


def _rewrite_has(text: str) -> str:
    flat = " ".join(text.splitlines()).strip()  # YAML block scalars may span lines
    if not flat:
        raise WhenError("condition is empty")
    try:
        raw = list(tokenize.generate_tokens(io.StringIO(flat).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError) as exc:
        raise WhenError(f"syntax error: {exc.args[0] if exc.args else exc}") from None
    tokens: list[tuple[int, str]] = []
    for tok in raw:
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        if tok.type == tokenize.COMMENT:
            raise WhenError("comments (#) are not allowed in a condition")
        if tok.type == tokenize.NAME and unicodedata.normalize("NFKC", tok.string).startswith("_"):  # as Python reads it
            raise WhenError(f"names starting with '_' are not allowed: {tok.string!r}")
        tokens.append((tok.type, tok.string))
    out: list[tuple[int, str]] = []
    i = 0
    while i < len(tokens):
        kind, string = tokens[i]
        after_dot = bool(out) and out[-1] == (tokenize.OP, ".")
        if kind == tokenize.NAME and string == "has" and not after_dot:
            start = len(out) - 1  # walk back over NAME (. NAME)*
            if start < 0 or out[start][0] != tokenize.NAME or keyword.iskeyword(out[start][1]):
                raise WhenError("'has' must follow subject, model or request, as in: subject has clearance")
            while start >= 2 and out[start - 1] == (tokenize.OP, ".") and out[start - 2][0] == tokenize.NAME:
                start -= 2
            chain = out[start:]
            del out[start:]
            i += 1
            names: list[tuple[int, str]] = []
            while i < len(tokens) and tokens[i][0] == tokenize.NAME and not keyword.iskeyword(tokens[i][1]):
                names.append(tokens[i])
                if i + 2 < len(tokens) and tokens[i + 1] == (tokenize.OP, ".") and tokens[i + 2][0] == tokenize.NAME:
                    names.append(tokens[i + 1])
                    i += 2
                    continue
                i += 1
                break
            if not names:
                raise WhenError("'has' must be followed by an attribute name, as in: subject has clearance")
            out.extend([(tokenize.NAME, _HAS), (tokenize.OP, "("), *chain, (tokenize.OP, "."), *names,
                        (tokenize.OP, ")")])
            continue
        out.append((kind, string))
        i += 1
    return tokenize.untokenize(out).strip()


# ---------------------------------------------------------------------------
# the compiler: AST -> closures

_REFUSED = {
    ast.Call: "function calls are not allowed",
    ast.Subscript: "subscripts ([...]) are not allowed",
    ast.Lambda: "lambda is not allowed",
    ast.ListComp: "comprehensions are not allowed",
    ast.SetComp: "comprehensions are not allowed",
    ast.DictComp: "comprehensions are not allowed",
    ast.GeneratorExp: "comprehensions are not allowed",
    ast.IfExp: "conditional expressions (x if c else y) are not allowed",
    ast.BinOp: "arithmetic is not allowed",
    ast.NamedExpr: "assignment (:=) is not allowed",
    ast.Starred: "starred expressions are not allowed",
    ast.JoinedStr: "f-strings are not allowed",
    ast.Dict: "dict literals are not allowed",
    ast.Set: "set literals are not allowed; use a list: x in ['a', 'b']",
    ast.Await: "await is not allowed",
    ast.Slice: "slices are not allowed",
}

_ALLOWED = "use comparisons, and/or/not, `in` on a literal list, literals, and subject.*, model.*, request.*"


class _Compiler:
    def __init__(self) -> None:
        self.paths: set[Path] = set()

    def value(self, node: ast.AST, depth: int) -> Callable[[Facts], Any]:
        if depth > MAX_DEPTH:
            raise WhenError(f"condition is nested more than {MAX_DEPTH} levels deep")
        d = depth + 1
        if isinstance(node, ast.BoolOp):
            parts = [self.value(v, d) for v in node.values]
            return and_(parts) if isinstance(node.op, ast.And) else or_(parts)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                inner = self.value(node.operand, d)
                return lambda f: not_(truth(inner(f)))
            if isinstance(node.op, (ast.USub, ast.UAdd)):
                number = self.number(node)
                return lambda f: number
            raise WhenError("arithmetic is not allowed")
        if isinstance(node, ast.Compare):
            return self.compare(node, d)
        if isinstance(node, ast.Constant):
            const = self.constant(node)
            return lambda f: const
        if isinstance(node, ast.Attribute):
            path = self.path(node)
            return lambda f: present(f.read(path))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == _HAS:
            if len(node.args) != 1 or node.keywords or not isinstance(node.args[0], ast.Attribute):
                raise WhenError("'has' must be followed by an attribute name")
            path = self.path(node.args[0])
            return lambda f: f.read(path) is not MISSING
        if isinstance(node, ast.Name):
            if node.id in ROOTS:
                raise WhenError(f"{node.id!r} alone is not a value; name an attribute, as in {node.id}.<name>")
            hint = {"true": " (did you mean True?)", "false": " (did you mean False?)",
                    "null": " (did you mean None?)", "none": " (did you mean None?)"}.get(node.id.lower(), "")
            if node.id in ("True", "False", "None"):
                hint = ""
            raise WhenError(f"unknown name {node.id!r}{hint}: only subject.*, model.* and request.* can be read")
        if isinstance(node, (ast.List, ast.Tuple)):
            raise WhenError("a literal list is only allowed on the right of `in` / `not in`")
        for cls, message in _REFUSED.items():
            if isinstance(node, cls):
                raise WhenError(f"{message} ({_ALLOWED})")
        raise WhenError(f"{type(node).__name__} is not allowed ({_ALLOWED})")

    def constant(self, node: ast.Constant) -> Any:
        value = node.value
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float)) and kind_of(value) == "num":
            return value
        raise WhenError(f"literal {value!r} is not allowed (strings, numbers, True, False and None are)")

    def number(self, node: ast.AST) -> Any:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = node.operand
            if isinstance(inner, ast.Constant) and kind_of(inner.value) == "num":
                value = cast("int | float", inner.value)  # kind "num": a finite int or float, not a bool
                return -value if isinstance(node.op, ast.USub) else value
        raise WhenError("arithmetic is not allowed; a sign is only allowed on a number literal")

    def literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return self.constant(node)
        return self.number(node)

    def path(self, node: ast.Attribute) -> Path:
        names: list[str] = []
        current: ast.AST = node
        while isinstance(current, ast.Attribute):
            if current.attr.startswith("_"):
                raise WhenError(f"names starting with '_' are not allowed: {current.attr!r}")
            names.append(current.attr)
            current = current.value
        if isinstance(current, ast.Name) and current.id not in ROOTS:
            raise WhenError(f"unknown name {current.id!r}: only subject.*, model.*, request.* and monitor.* can be read")
        if not isinstance(current, ast.Name):
            raise WhenError("attribute access is only allowed on subject, model, request and monitor")
        path: Path = (current.id, *reversed(names))
        if len(path) > MAX_CHAIN:
            raise WhenError(f"attribute chain longer than {MAX_CHAIN} names")
        root, first = path[0], path[1]
        if root == "request" and first == "params":
            if len(path) != 3 or path[2] not in PARAM_NAMES:
                raise WhenError(f"unknown attribute request.{'.'.join(path[1:])} "
                                f"(request.params has: {', '.join(sorted(PARAM_NAMES))})")
        elif root == "request" and (first not in REQUEST_ATTRIBUTES or len(path) != 2):
            raise WhenError(f"unknown attribute request.{'.'.join(path[1:])} "
                            f"(request has: {', '.join(sorted(REQUEST_ATTRIBUTES))})")
        if root == "model" and (first not in MODEL_ATTRIBUTES or (first == "name" and len(path) != 2)
                                or (first == "labels" and len(path) > 3)):
            raise WhenError(f"unknown attribute model.{'.'.join(path[1:])} (model has: name, labels.<label>)")
        if root == "monitor" and len(path) != 2:
            raise WhenError("a monitor is read by its id alone, as in: monitor.digits_extraction")
        self.paths.add(path)
        return path

    def compare(self, node: ast.Compare, depth: int) -> Callable[[Facts], Any]:
        if any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            if len(node.ops) != 1:
                raise WhenError("`in` cannot be chained with other comparisons; use and")
            target = node.comparators[0]
            if isinstance(target, ast.Attribute) and isinstance(node.left, (ast.Constant, ast.UnaryOp)):
                # 'literal' in LIST_ATTRIBUTE: e.g. 'web_search' in request.params.tools, 'admin' in subject.roles
                needle = self.literal(node.left)
                listing = self.path(target)
                negate_list = isinstance(node.ops[0], ast.NotIn)
                return lambda f: contains(f.read(listing), needle, negate_list)
            if not isinstance(target, (ast.List, ast.Tuple)):
                raise WhenError("`in` needs a literal list on its right, as in: x in ['a', 'b'], "
                                "or a literal on its left, as in: 'admin' in subject.roles")
            if len(target.elts) > MAX_NODES:
                raise WhenError("literal list too long")
            members = tuple((kind_of(v), v) for v in (self.literal(e) for e in target.elts))
            left = self.value(node.left, depth)
            negate = isinstance(node.ops[0], ast.NotIn)
            return lambda f: member(left(f), members, negate)
        for op in node.ops:
            if isinstance(op, (ast.Is, ast.IsNot)):
                raise WhenError("`is` is not allowed; use == or `has`")
        operands = [self.value(node.left, depth)] + [self.value(c, depth) for c in node.comparators]
        ops = list(node.ops)

        def chain(f: Facts) -> Truth:
            unknown = False
            left = operands[0](f)
            for op, right_fn in zip(ops, operands[1:]):
                right = right_fn(f)
                result = compare(op, left, right)
                if result is False:
                    return False
                if result is UNKNOWN:
                    unknown = True
                left = right
            return UNKNOWN if unknown else True

        return chain

