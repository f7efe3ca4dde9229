"""Path normalisation: one canonical path for routing, every check and the backend.

Path confusion is how authorisation is bypassed: ``/v2/models/%64igits/infer``,
``/v2//models/x/../digits/infer`` and ``/v2/models/digits/infer`` must all be
the same request, and anything we cannot normalise unambiguously (an encoded
slash or backslash, NUL, control characters) is refused, never guessed at.
The normalised path is what the backend receives, so what was checked is
exactly what is served.

``split_target`` reads an HTTP request target (the HTTP door uses it);
``normalise`` and the ``Path`` stage work on any door's path.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..errors import InvalidRequest

if TYPE_CHECKING:
    from ..pipeline import RequestContext

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# characters allowed literally in a path (RFC 3986 pchar + "/"), besides %XX
_ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/")
_PLAIN = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")  # the same set: a path with nothing to decode or refuse


class Path:
    """The stage: ``ctx.path`` is the request's path, normalised (or the request is refused)."""

    name = "path"

    async def __call__(self, ctx: RequestContext) -> None:
        ctx.path = normalise(ctx.request.path)


def split_target(target: str) -> tuple[str, str]:
    """The request target as (raw path, raw query). Absolute-form targets keep only their path:
    the authority a client names never chooses a route or a model."""
    if target.startswith(("http://", "https://", "HTTP://", "HTTPS://")):
        parts = urlsplit(target)
        return parts.path or "/", parts.query
    if not target.startswith("/"):
        raise InvalidRequest("request target must be an absolute path")
    path, _, query = target.partition("?")
    if "#" in path:
        raise InvalidRequest("fragment in request target")
    return path, query


def normalise(raw: str) -> str:
    """Percent-decode unreserved characters, refuse ambiguous ones, drop dot segments and repeated slashes."""
    out: list[str] = []
    i, n = 0, len(raw)
    if _PLAIN.fullmatch(raw):
        decoded = raw
    elif "%" not in raw:
        for ch in raw:
            if ch not in _ALLOWED:
                _refuse_char(ch)
        decoded = raw
    else:
        while i < n:
            ch = raw[i]
            if ch == "%":
                hexpair = raw[i + 1 : i + 3]
                if len(hexpair) != 2 or not all(c in _HEX for c in hexpair):
                    raise InvalidRequest("malformed percent-encoding in path")
                byte = int(hexpair, 16)
                if byte in _UNRESERVED:
                    out.append(chr(byte))
                elif byte == 0x2F:
                    raise InvalidRequest("encoded slash in path")
                elif byte == 0x5C:
                    raise InvalidRequest("backslash in path")
                elif byte < 0x20 or byte == 0x7F:
                    raise InvalidRequest("control character in path")
                else:
                    out.append("%" + hexpair.upper())
                i += 3
                continue
            if ch not in _ALLOWED:
                _refuse_char(ch)
            out.append(ch)
            i += 1
        decoded = "".join(out)
    return _remove_dot_segments(decoded)


def _refuse_char(ch: str) -> None:
    if ch == "\\":
        raise InvalidRequest("backslash in path")
    if ch == "\x00" or ord(ch) < 0x20 or ord(ch) == 0x7F:
        raise InvalidRequest("control character in path")
    raise InvalidRequest("invalid character in path")


def _remove_dot_segments(path: str) -> str:
    if "//" not in path and "/." not in path:
        return path or "/"
    segments: list[str] = []
    parts = path.split("/")
    for seg in parts[1:]:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if segments:
                segments.pop()
            continue
        segments.append(seg)
    result = "/" + "/".join(segments)
    if parts[-1] in ("", ".", "..") and segments:
        result += "/"
    return result
