"""``multipart/form-data`` bodies (audio uploads): the text fields the gateway decides on, and nothing else.

An audio request names its model in the form field ``model``, so the gateway
must read that field to authorise, meter and route, but never parses the
upload itself: the file part is skipped by index, never copied, and the bytes
forwarded are exactly the bytes received. Only the text fields (no
``filename``) are decoded, each at most ``MAX_FIELD_BYTES``, so ``ctx.json``
holds ``{"model": ..., "language": ..., "stream": ..., "__files__": [...]}``
and the stages that read a JSON body (model, policy params, checks) read this
the same way.

``ModelSniffer`` finds the ``model`` field in the first bytes of a body while
it is still arriving (clients send their text fields before the file), so the
body stage can hold the upload to that model's ``max_body_bytes`` while
reading, not after.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import InvalidRequest, UnsupportedMediaType

MAX_FIELD_BYTES = 65_536  # a text field longer than this is refused (a prompt, a language code: all short)
MAX_PARTS = 64
SNIFF_BYTES = 262_144  # the model field is looked for in this many first bytes
_BOUNDARY = re.compile(r'boundary="?([0-9A-Za-z\'()+_,./:=? -]{1,70})"?', re.IGNORECASE)
_NAME = re.compile(rb'(?i)content-disposition:\s*form-data\s*;(.*)')
_PARAM = re.compile(rb'\s*([A-Za-z*]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))\s*;?')


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type; 415 for any other type, 400 without one."""
    main = (content_type or "").partition(";")[0].strip().lower()
    if main != "multipart/form-data":
        raise UnsupportedMediaType("Content-Type must be multipart/form-data")
    found = _BOUNDARY.search(content_type or "")
    if found is None:
        raise InvalidRequest("multipart/form-data without a boundary")
    return found.group(1).rstrip(" ").encode("ascii")


def _disposition(headers: bytes) -> tuple[str | None, bool]:
    """(field name, is a file) from a part's headers."""
    for line in headers.split(b"\r\n"):
        found = _NAME.match(line)
        if found is None:
            continue
        params: dict[bytes, bytes] = {}
        for match in _PARAM.finditer(found.group(1)):
            params[match.group(1).lower()] = match.group(2) if match.group(2) is not None else match.group(3)
        name = params.get(b"name")
        if name is None:
            return None, False
        return name.decode("utf-8", "replace"), b"filename" in params or b"filename*" in params
    return None, False


def _parts(body: bytes, boundary: bytes) -> list[tuple[str, bool, int, int]]:
    """(name, is a file, value start, value end) of every part; ``InvalidRequest`` for a malformed body."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter):
        raise InvalidRequest("multipart body does not start with its boundary")
    separator = b"\r\n" + delimiter
    out: list[tuple[str, bool, int, int]] = []
    at = len(delimiter)
    while True:
        if body.startswith(b"--", at):
            return out  # the closing delimiter
        if not body.startswith(b"\r\n", at):
            raise InvalidRequest("malformed multipart body")
        head_end = body.find(b"\r\n\r\n", at + 2)
        if head_end < 0 or head_end - at > 16_384:
            raise InvalidRequest("malformed multipart part headers")
        name, is_file = _disposition(body[at + 2:head_end])
        if name is None:
            raise InvalidRequest("a multipart part without a form-data name")
        start = head_end + 4
        end = _delimiter(body, separator, start)
        out.append((name, is_file, start, end))
        if len(out) > MAX_PARTS:
            raise InvalidRequest(f"more than {MAX_PARTS} multipart parts")
        at = end + len(separator)


def _delimiter(body: bytes, separator: bytes, start: int) -> int:
    """Where the next delimiter line begins: ``CRLF--boundary`` followed by CRLF or ``--`` (RFC 2046)."""
    end = body.find(separator, start)
    while end >= 0 and body[end + len(separator):end + len(separator) + 2] not in (b"\r\n", b"--"):
        end = body.find(separator, end + 1)
    if end < 0:
        raise InvalidRequest("multipart body is not closed by its boundary")
    return end


def form_fields(body: bytes, boundary: bytes) -> dict[str, Any]:
    """The text fields of a form plus ``__files__``: the file fields' names. A name sent twice is refused."""
    fields: dict[str, Any] = {}
    files: list[str] = []
    for name, is_file, start, end in _parts(body, boundary):
        if name in fields or name in files:
            # a server may take the last of two "model" fields while the gateway authorised the first
            raise InvalidRequest(f"form field {name[:40]!r} sent more than once")
        if is_file:
            files.append(name)
            continue
        if end - start > MAX_FIELD_BYTES:
            raise InvalidRequest(f"form field {name[:40]!r} is longer than {MAX_FIELD_BYTES} bytes")
        try:
            value = body[start:end].decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"form field {name[:40]!r} is not UTF-8 text") from None
        fields.setdefault(name, value)
    fields["__files__"] = files
    return fields


def replace_field(body: bytes, boundary: bytes, name: str, value: str) -> bytes:
    """``body`` with every text field ``name`` set to ``value`` (the model name an upstream knows)."""
    out = []
    at = 0
    for part_name, is_file, start, end in _parts(body, boundary):
        if part_name == name and not is_file:
            out.append(body[at:start])
            out.append(value.encode("utf-8"))
            at = end
    out.append(body[at:])
    return b"".join(out)


class ModelSniffer:
    """Finds the ``model`` text field among the first bytes of a body still arriving."""

    __slots__ = ("_pattern", "done", "model")

    def __init__(self, boundary: bytes) -> None:
        self._pattern = re.compile(
            rb'(?:^|\r\n)--' + re.escape(boundary) + rb'\r\n((?:[^\r\n]+\r\n){0,16})\r\n', re.IGNORECASE)
        self.done = False
        self.model: str | None = None

    def feed(self, head: bytes) -> str | None:
        """The model named in ``head`` (the body so far), once its value is complete; None until then."""
        if self.done:
            return self.model
        window = head[:SNIFF_BYTES]
        for match in self._pattern.finditer(window):
            name, is_file = _disposition(match.group(1).rstrip(b"\r\n"))
            if name != "model" or is_file:
                continue
            end = window.find(b"\r\n--", match.end())
            if end < 0:
                return None  # its value has not arrived whole yet
            if end - match.end() <= 256:
                self.model = window[match.end():end].decode("utf-8", "replace")
            self.done = True
            return self.model
        if len(head) >= SNIFF_BYTES:
            self.done = True  # not among the first bytes: the largest limit holds
        return None
