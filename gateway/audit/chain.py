"""What makes one audit line part of the chain: ``seq``, ``prev`` and the optional keyed ``mac``.

A line is the compact JSON object orjson writes (keys in insertion order, no
spaces), then a newline. Three members tie it to the log:

- ``seq``: 1, 2, 3, ... equal to the line's 1-based number in the file, continuous
  across restarts, so a line removed or added anywhere shifts every later number.
- ``prev``: the hex SHA-256 of the previous line's bytes without its newline
  (``GENESIS``, 64 zeros, for line 1). Editing, removing or reordering a line breaks
  the next line's ``prev``; but anyone can recompute every ``prev`` after an edit.
- ``mac`` (only with ``audit.key_env``/``key_file``): the hex HMAC-SHA256, under that
  key, of the line's bytes *without* the mac member, i.e. the object as it was
  serialised before ``,"mac":"..."`` was appended as its last member. So the
  unsigned bytes are recovered from a signed line by cutting a fixed-size suffix,
  never by re-serialising parsed JSON (which could reorder keys or reformat a
  float). Without the key a rewritten line cannot carry a valid ``mac``.

``prev`` hashes the whole line, ``mac`` included, so the MAC of every earlier line
is also covered by the chain.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from pathlib import Path

from .. import key_text

GENESIS = "0" * 64
MIN_KEY_BYTES = 32
_MAC_OPEN = b',"mac":"'
_MAC_SUFFIX = len(_MAC_OPEN) + 64 + 2  # ,"mac":"<64 hex>"}
_HEX = frozenset(b"0123456789abcdef")


class KeyProblem(ValueError):
    """The MAC key is missing or malformed; the message names where it came from, never its value."""


def line_hash(line: bytes) -> str:
    """What the next line's ``prev`` holds: the hex SHA-256 of ``line`` (no newline)."""
    return hashlib.sha256(line).hexdigest()


class Sealer:
    """Appends the ``mac`` member to serialised lines (a no-op without a key).

    The keyed HMAC state is built once and copied per line: about a microsecond,
    the only per-request cost a key adds.
    """

    __slots__ = ("_base",)

    def __init__(self, key: bytes | None) -> None:
        self._base = hmac.new(key, digestmod=hashlib.sha256) if key else None

    @property
    def keyed(self) -> bool:
        return self._base is not None

    def mac(self, unsigned: bytes) -> str:
        assert self._base is not None
        h = self._base.copy()
        h.update(unsigned)
        return h.hexdigest()

    def seal(self, unsigned: bytes) -> bytes:
        """``{...}`` -> ``{...,"mac":"<hex>"}``; ``unsigned`` must be a non-empty JSON object."""
        if self._base is None:
            return unsigned
        return b"%s%s%s\"}" % (unsigned[:-1], _MAC_OPEN, self.mac(unsigned).encode())

    def check(self, line: bytes) -> str | None:
        """Why ``line``'s mac is wrong, or None when it is right."""
        parts = split_mac(line)
        if parts is None:
            return "no mac (or mac not the last member)"
        unsigned, mac = parts
        if not hmac.compare_digest(self.mac(unsigned), mac):
            return "mac does not match (line rewritten, or another key)"
        return None


def split_mac(line: bytes) -> tuple[bytes, str] | None:
    """(the line as it was before its mac was appended, the mac) when it ends with a mac member."""
    if len(line) < _MAC_SUFFIX + 2 or not line.endswith(b'"}') or line[-_MAC_SUFFIX:-66] != _MAC_OPEN:
        return None
    mac = line[-66:-2]
    if not _HEX.issuperset(mac):
        return None
    return line[:-_MAC_SUFFIX] + b"}", mac.decode()


def decode_key(text: str, *, where: str) -> bytes:
    """A key written as base64url (or standard base64) text holding at least 32 bytes.

    The same text format as ``maas-gateway model keygen`` writes, so that command
    makes an audit key too; a shorter secret is refused rather than silently weak.
    """
    cleaned = "".join(text.split())
    if not cleaned:
        raise KeyProblem(f"{where} is empty")
    try:
        padded = cleaned.rstrip("=").replace("+", "-").replace("/", "_")
        key = base64.b64decode(padded + "=" * (-len(padded) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise KeyProblem(f"{where} is not base64url text") from None
    if len(key) < MIN_KEY_BYTES:
        raise KeyProblem(f"{where} holds {len(key)} bytes; an audit key needs at least {MIN_KEY_BYTES} "
                         "(make one with `maas-gateway model keygen --out FILE`)")
    return key


def load_key(*, key_env: str | None = None, key_file: Path | str | None = None) -> bytes | None:
    """The MAC key from an environment variable or a file; None when neither is given."""
    if key_env:
        return decode_key(key_text.from_env(key_env, KeyProblem), where=f"environment variable {key_env}")
    if key_file is not None:
        return decode_key(key_text.from_file(key_file, KeyProblem), where=f"key file {key_file}")
    return None
