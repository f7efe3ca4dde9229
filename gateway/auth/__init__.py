"""Proving who a caller is: JWTs (``jwt``, keys from ``jwks``), API keys (``api_keys``).

Every verifier raises ``AuthFailure`` with a *fixed* reason code (a metric label,
so an attacker cannot mint label values) and a message that is safe to show the
client: it says what was wrong with the credential, never what the key is.
The authenticate stage turns it into a 401.
"""

from __future__ import annotations

import re

# Control characters would let a credential's subject or roles inject into the
# X-Maas-* headers and the audit log; a signed token is still refused for them.
UNSAFE_TEXT = re.compile(r"[\x00-\x1f\x7f]")


class AuthFailure(Exception):
    """A credential was refused. ``reason`` is a fixed label; ``message`` is safe for the client."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def clean_roles(value: object) -> tuple[str, ...]:
    """Roles from a claim or key entry: a list of plain strings, anything else means no roles.

    A roles claim that is a string, a mapping or a list holding anything but
    strings is not guessed at (splitting "admin,user" would hand out roles
    the issuer never meant): the caller simply gets no roles.
    """
    if not isinstance(value, list):
        return ()
    for role in value:
        if not isinstance(role, str) or not role or UNSAFE_TEXT.search(role) or "," in role:
            return ()
    return tuple(dict.fromkeys(value))
