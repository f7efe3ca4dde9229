"""Hardened JSON parsing for request bodies: strict, bounded, and fast on the hot path.

A gateway that validates a body and a backend that parses it again must agree on
what the body *means*, and a body must not be able to hurt the gateway while it
is being read. So ``parse`` refuses, with a 400 ``invalid_request``:

- an empty body, invalid UTF-8, a byte-order mark;
- lone UTF-16 surrogate escapes (``"\\ud800"``): they cannot be encoded as UTF-8,
  so a Python backend re-encoding the string crashes and other parsers replace
  them with U+FFFD instead: either way the backend would not see what we
  validated. Refused, not repaired;
- ``NaN``, ``Infinity``, ``-Infinity`` and number literals that overflow to
  infinity (``1e999``): not JSON, and the classic way to poison a tensor;
- duplicate keys in any object, at any depth: a validator that keeps the last
  value and a backend that keeps the first would read two different requests
  (the smuggling vector);
- nesting deeper than ``max_depth`` and more than ``max_elements`` values;
- anything after the document (trailing garbage).

How (measured in ``bench/bench_validation.py``): before any parser runs, a
byte-level scan in C-speed ``bytes`` operations keeps only the structural
characters outside strings (backslash escapes go first, then ``translate`` keeps
brackets, commas, colons and quotes, then the runs between quote pairs go) and
counts them. Depth and size limits are decided
there, so a 10,000-level nesting or a million-element array is refused without
building a single Python object and without recursion. The document is then
parsed by orjson (strict RFC 8259: it already refuses bad UTF-8, lone surrogates,
NaN/Infinity, overflowing numbers and trailing data), which is ~10x faster than
the standard library on a float tensor. orjson keeps the last of duplicate keys
silently, so duplicates are found by comparing the scan's colon count (one per
key written) with the number of keys in the parsed dicts (one per *distinct*
key): equal means no duplicates. The key count walks dicts and skips lists that
start with a scalar (tensor data), so it costs microseconds; when that shortcut
undercounts, an exact pass with the standard library's ``object_pairs_hook``
settles it and names the duplicate key.

Integers beyond 64 bits are read by orjson as floats; they are never accepted
where an integer is required (the v2 checks and JSON Schema ``integer`` both see
a float), so this costs legitimate requests nothing.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

import orjson

from .errors import InvalidRequest

DEFAULT_MAX_DEPTH = 64  # nested arrays/objects; real v2 and OpenAI bodies use < 10
# Values (array elements and object members) in one document. 1,000,000 admits a
# 3x512x512 image tensor (786,432 values) sent flat, yet bounds the parsed size to
# ~40 MB of Python objects even when max_body_bytes is raised well past its 1 MiB default.
DEFAULT_MAX_ELEMENTS = 1_000_000

_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{},:"')
_NOT_OPENS_OR_COLONS = bytes(b for b in range(256) if b not in b"[{:")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_NON_FINITE = re.compile(rb"NaN|Infinity")
_DEPTH_STEP = tuple(1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256))


class MalformedJson(InvalidRequest):
    """A body that is not acceptable JSON. ``reason`` is a short label for metrics."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse(body: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Any:
    """The JSON document in ``body``, or ``MalformedJson`` (a 400 ``invalid_request``)."""
    if not body or body.isspace():
        raise MalformedJson("empty body: expected a JSON document", "empty")
    # Raw byte counts bound the structural ones (each value needs a byte; a bracket inside a string
    # only adds to the raw count), so a body within both limits by raw counts skips the scan (~2 us).
    marks = body.translate(None, _NOT_OPENS_OR_COLONS)  # one C pass; the counts below run on what is left
    raw_colons = marks.count(b":")
    small = len(body) <= max_elements and len(marks) - raw_colons <= max_depth
    structure = b""
    if not small:
        structure = _structure(body)
        opens = structure.count(b"[") + structure.count(b"{")
        elements = structure.count(b",") + opens
        if elements > max_elements:
            raise MalformedJson(f"JSON document has more than {max_elements} values", "too_many_elements")
        if opens > max_depth:  # only then can the nesting be too deep; most bodies stop here
            depth = _max_depth(structure)
            if depth > max_depth:
                raise MalformedJson(f"JSON nesting deeper than {max_depth} levels", "too_deep")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if _NON_FINITE.search(_outside_strings(body)):
            raise MalformedJson("NaN and Infinity are not JSON numbers", "non_finite") from None
        raise MalformedJson(f"malformed JSON: {exc}", _decode_reason(str(exc))) from None
    if small:
        # distinct keys <= keys written (colons outside strings) <= all colons: equal ends means no duplicate
        if not raw_colons or _count_keys(document) == raw_colons:
            return document
        structure = _structure(body)  # colons inside strings (or undercounted keys): count exactly
    colons = structure.count(b":")
    if colons and _count_keys(document) != colons and _count_keys_exactly(document) != colons:
        _name_duplicate(body)
    return document


def _structure(body: bytes) -> bytes:
    """The structural characters of ``body`` outside strings: brackets, commas and colons.

    Escapes go first, so every remaining quote is a real delimiter; ``translate``
    then drops everything but structure and quotes in one C pass, and the string
    contents between quote pairs go with a split. Exact for valid JSON; for invalid
    JSON an approximation that the parser then refuses.
    """
    if b"\\" in body:
        body = _ESCAPE.sub(b"", body)
    marks = body.translate(None, _NOT_STRUCTURE)
    if b'"' in marks:
        marks = b"".join(marks.split(b'"')[::2])
    return marks


def _outside_strings(body: bytes) -> bytes:
    """``body`` without its string contents (error path only: finds NaN/Infinity literals)."""
    return b"".join(_ESCAPE.sub(b"", body).split(b'"')[::2])


def _max_depth(structure: bytes) -> int:
    brackets = structure.translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0)


def _count_keys(document: Any) -> int:
    """Keys in the dicts of ``document``; may undercount (lists of scalars are skipped), never overcounts."""
    count = 0
    stack = [document]
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        node = pop()
        if type(node) is dict:
            count += len(node)
            for value in node.values():
                if type(value) is dict or type(value) is list:
                    push(value)
        elif type(node) is list and node and (type(node[0]) is dict or type(node[0]) is list):
            extend(node)  # scalars among them are popped and skipped
    return count


def _count_keys_exactly(document: Any) -> int:
    count = 0
    stack = [document]
    while stack:
        node = stack.pop()
        if type(node) is dict:
            count += len(node)
            stack.extend(v for v in node.values() if type(v) is dict or type(v) is list)
        elif type(node) is list:
            stack.extend(v for v in node if type(v) is dict or type(v) is list)
    return count


def _name_duplicate(body: bytes) -> None:
    """Raise naming the first duplicate key (the key counts said there is one)."""

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                shown = key if len(key) <= 40 else key[:40] + "..."
                raise MalformedJson(f"duplicate key {shown!r} in a JSON object", "duplicate_key")
            seen[key] = value
        return seen

    # orjson accepted the body, so it is valid UTF-8 JSON that the standard library reads the same way.
    json.loads(body.decode("utf-8"), object_pairs_hook=refuse_duplicates)
    raise MalformedJson("duplicate key in a JSON object", "duplicate_key")  # unreachable in practice


def _decode_reason(message: str) -> str:
    if "UTF-8" in message or "surrogate" in message or "BOM" in message:
        return "encoding"
    if "infinity" in message.lower():
        return "non_finite"
    if "after document" in message:
        return "trailing_data"
    if "depth" in message or "recursion" in message:
        return "too_deep"
    return "syntax"
