"""X-Request-ID: keep the client's when it is safe to echo and log, else mint one.

A client-chosen id is accepted only when it is 1-128 characters of
``[A-Za-z0-9._-]``: anything else could inject into logs or headers downstream.
Minted ids are 96 bits from the OS CSPRNG, drawn in batches (one syscall per
256 ids instead of one per request); a forked worker drops the batch it
inherited so two processes never hand out the same ids.
"""

from __future__ import annotations

import os
import re

_VALID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_BATCH = 256  # ids minted per os.urandom call
_minted: list[str] = []
os.register_at_fork(after_in_child=_minted.clear)


def choose(client_value: str | None) -> str:
    if client_value is not None and _VALID.fullmatch(client_value):
        return client_value
    if not _minted:  # one getrandom syscall per _BATCH requests, not per request
        raw = os.urandom(12 * _BATCH).hex()
        _minted.extend([raw[i : i + 24] for i in range(0, len(raw), 24)])
    return _minted.pop()
