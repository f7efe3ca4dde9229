"""Credentials out of URLs before they are printed: logs, ``/readyz`` reasons, ``check``, errors.

A Redis URL (the quota store, the audit witness) may carry a secret in many
places: ``redis://user:pass@host``, ``redis://:pass@host``, a Sentinel list
``redis+sentinel://user:pass@h1:26379,h2:26379/mymaster``, ``rediss://``,
``unix://user:pass@/run/redis.sock`` and query parameters (``?password=``,
``&username=``), which redis-py reads as well. Every printed form goes through
:func:`redact_url` (one URL) or :func:`redact_text` (a message that may quote
URLs, such as a client library's exception text), so a reason shown to anyone
who can reach the admin port never teaches them the password.

The rules err on the side of hiding: the whole user-info part (the user name
is half of an ACL credential) and any query value whose key looks like a
credential. The scan does not trust ``urlsplit``: a password holding an
unescaped ``/``, ``?`` or ``#`` would otherwise leak its tail into the "path".
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["MASK", "redact_text", "redact_url"]

MASK = "***"

# query keys whose values are credentials (matched on the decoded, lower-cased key:
# redis-py decodes ``pass%77ord`` to ``password`` too)
_SECRET_KEY = re.compile(r"pass|user|auth|token|secret|cred|key", re.IGNORECASE)
_QUERY_PAIR = re.compile(r"(?P<sep>[?&;])(?P<key>[^=&;#?]*)=(?P<value>[^&;#]*)")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` with user-info and credential query values replaced by ``***``; other parts kept.

    The host list, database and non-secret options stay, so the line still says
    *which* store failed. Strings without ``://`` (``memory``, a file path) come
    back unchanged: they carry no credentials.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # everything up to the last "@" is user-info, whatever it contains (an unescaped "/" or "@" included)
    userinfo, at, tail = rest.rpartition("@")
    if at:
        rest = f"{MASK}@{tail}"
    return f"{scheme}://{_QUERY_PAIR.sub(_mask_pair, rest)}"


def redact_text(text: str) -> str:
    """Every URL inside a free-form message (an exception's text, a log reason) passed through :func:`redact_url`."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: _redact_quoted(m.group(0)), text)


def _redact_quoted(url: str) -> str:
    # a value shortened for a message ("redis://user:longpass...") may have lost its "@": hide all of it
    if url.endswith("...") and "@" not in url:
        return f"{url.partition('://')[0]}://{MASK}..."
    return redact_url(url)


def _mask_pair(match: re.Match[str]) -> str:
    key = match.group("key")
    if _SECRET_KEY.search(unquote(key.replace("+", " "))):
        return f"{match.group('sep')}{key}={MASK}"
    return match.group(0)
