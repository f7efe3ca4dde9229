"""Repeatable output noise: the same caller asking the same row of the same model gets the same draw.

WHY repeatable: fresh noise on every answer averages out. An attacker who asks
one input 4,096 times (or sends 4,096 copies of it in one batch) recovers the
clean scores for one token, while honest callers pay the full accuracy cost.
With noise derived from a keyed hash of (subject, model, row bytes), every
repetition returns the identical noisy answer, on every replica and after a
restart, so repetition buys nothing; another caller gets independent noise.

The key is ``hardening.noise_key_env`` (any secret string of at least 16
bytes; ``maas-gateway model keygen`` makes a good one). Without it a random
per-process key is used: still repeatable within one process, but not across
replicas or restarts, and ``check`` reports it.

Per row: ``HMAC-SHA256(key, subject NUL model NUL output NUL row bytes)``
seeds a SHAKE-256 stream that gives one uniform per class; the Laplace draw is
the inverse CDF of that uniform. Rows that are the same bytes are hashed once
per answer. A few microseconds per row.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

import numpy as np

MIN_KEY_BYTES = 16


class NoiseKey:
    """The secret behind repeatable noise. ``configured`` is False for a per-process key."""

    __slots__ = ("_key", "configured")

    def __init__(self, key: bytes, configured: bool) -> None:
        self._key = key
        self.configured = configured

    @classmethod
    def from_env(cls, name: str | None) -> NoiseKey:
        value = os.environ.get(name, "") if name else ""
        if value:
            return cls(value.encode("utf-8"), True)
        return cls(secrets.token_bytes(32), False)

    def laplace(self, subject: str, model: str, output: str, rows: list[bytes], classes: int,
                scale: float) -> np.ndarray:
        """Laplace(0, ``scale``) noise [len(rows), classes]: one repeatable draw per (caller, model, output, row)."""
        prefix = b"\0".join((subject.encode("utf-8", "surrogatepass"), model.encode("utf-8", "surrogatepass"),
                             output.encode("utf-8", "surrogatepass"), b""))
        width = 8 * classes
        seen: dict[bytes, bytes] = {}
        stream = bytearray()
        for row in rows:
            block = seen.get(row)
            if block is None:
                digest = hmac.new(self._key, prefix + row, hashlib.sha256).digest()
                block = seen[row] = hashlib.shake_256(digest).digest(width)
            stream += block
        words = np.frombuffer(bytes(stream), dtype="<u8").reshape(len(rows), classes)
        u = (words >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)  # [0, 1), 53 bits
        u = np.clip(u, 1e-16, 1 - 1e-16) - 0.5
        return -scale * np.sign(u) * np.log1p(-2.0 * np.abs(u))
