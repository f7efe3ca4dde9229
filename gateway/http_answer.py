"""An answer's bytes on the wire: the status line and headers, chunk framing, the Date header.

Kept apart from the connection (``gateway.http_connection``), which decides
*when* bytes go out, and from the door (``gateway.http_door``), which decides
*what* the answer is. Every header line passes one check: a value or name
holding CR or LF (which would split the answer and let a backend's header
forge another) is refused, as ``backends.http.client`` does for requests.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Iterable

LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

NO_BODY = frozenset({204, 304})  # answers that never have a body, nor its framing
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_date = ["", 0]  # the Date header's value and the second it was made for: formatted once a second, not per answer


class HeaderInjection(ValueError):
    """A header name or value would split the answer (CR or LF in it)."""


def http_date() -> str:
    now = int(time.time())
    if _date[1] != now:
        _date[0], _date[1] = formatdate(now, usegmt=True), now
    return _date[0]  # type: ignore[return-value]


def head(status: int, headers: Iterable[tuple[str, str]], *, length: int | None, close: bool,
         keep_alive_1_0: bool = False) -> bytes:
    """The status line and headers of an answer.

    ``length`` None frames the body as chunks (``Transfer-Encoding: chunked``);
    an HTTP/1.0 client gets no chunks (the caller passes ``close`` and writes the
    body raw). ``keep_alive_1_0``: an HTTP/1.0 client asked to keep the connection.
    """
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    count = len(lines)
    text = "".join(lines)
    if text.count("\n") != count or text.count("\r") != count:
        raise HeaderInjection("a header of the answer holds CR or LF")
    if status in NO_BODY:
        framing = ""
    elif length is not None:
        framing = f"Content-Length: {length}\r\n"
    elif close:
        framing = ""
    else:
        framing = "Transfer-Encoding: chunked\r\n"
    if close:
        framing += "Connection: close\r\n"
    elif keep_alive_1_0:
        framing += "Connection: keep-alive\r\n"
    reason = _REASONS.get(status, "Unknown")
    return (f"HTTP/1.1 {status} {reason}\r\nDate: {http_date()}\r\n{text}{framing}\r\n"
            .encode("utf-8", "surrogateescape"))


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: an empty chunk ends the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)
