"""X-Request-ID: keep the client's when it is safe to echo and log, else mint one.

A client-chosen id is accepted only when it is 1-128 characters of
``[A-Za-z0-9._-]``: anything else could inject into logs or headers downstream.
"""

from __future__ import annotations

import os
import re

_VALID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def choose(client_value: str | None) -> str:
    if client_value is not None and _VALID.fullmatch(client_value):
        return client_value
    return os.urandom(12).hex()
