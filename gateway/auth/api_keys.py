"""API keys: ``mk_`` + 32 random bytes, stored only as SHA-256 hashes in a YAML file.

File format (written by ``maas-gateway keys create``, editable by hand)::

    - {id: k1, hash: "sha256:<hex>", subject: svc-a, roles: [analyst], attrs: {team: x}, expires: 2027-01-01T00:00:00Z}

A key carries 256 bits of entropy, so an unsalted SHA-256 is the right hash: it
cannot be brute-forced, and a lookup by digest leaks nothing through timing
that would help guess a key (the digest of a guess is unrelated to the digest
of the real key). The file is read into a dict keyed by digest; identities are
built once at load time, so checking a key costs one hash and one lookup.

Editing the file (``keys create`` / ``keys revoke``) lives in ``key_file``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Sequence

from ..pipeline import Identity
from ..typedyaml import Source, build, load
from . import UNSAFE_TEXT, AuthFailure

KEY_PREFIX = "mk_"
KEY_BYTES = 32  # >= 256 bits of entropy
MAX_KEY_CHARS = 256  # longer is not a key we issued; refused before hashing
_HASH = re.compile(r"sha256:([0-9a-f]{64})")


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def hash_key(key: str) -> str:
    """The stored form of a key: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """One entry of the keys file, as a person writes it."""

    id: str
    hash: str
    subject: str
    roles: list[str] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)
    expires: datetime | date | str | None = None  # ISO 8601; no zone means UTC

    def validate(self) -> tuple[str, str] | None:
        if not self.id or UNSAFE_TEXT.search(self.id):
            return "id", "must be a non-empty string without control characters"
        if not _HASH.fullmatch(self.hash):
            return "hash", 'expected "sha256:" followed by 64 lowercase hex digits (store the hash, never the key)'
        if not self.subject or UNSAFE_TEXT.search(self.subject):
            return "subject", "must be a non-empty string without control characters"
        for i, role in enumerate(self.roles):
            if not role or UNSAFE_TEXT.search(role) or "," in role:
                return f"roles[{i}]", "a role must be a non-empty string without commas or control characters"
        for reserved in ("sub", "roles"):
            if reserved in self.attrs:
                return f"attrs.{reserved}", "is set from the entry's subject/roles; remove it from attrs"
        try:
            expires_at(self.expires)
        except ValueError:
            return "expires", "expected an ISO 8601 date-time such as 2027-01-01T00:00:00Z"
        return None


def expires_at(value: datetime | date | str | None) -> float | None:
    """Unix seconds of an ``expires`` value (None = never); a value without a zone is UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip())
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    digest: str  # hex SHA-256 of the key
    identity: Identity
    expires_at: float | None


class ApiKeyStore:
    """The keys of one file, by digest. Immutable: reload builds a new store and swaps it."""

    def __init__(self, keys: Sequence[ApiKey] = ()) -> None:
        self._by_digest = {k.digest: k for k in keys}

    def __len__(self) -> int:
        return len(self._by_digest)

    def ids(self) -> list[str]:
        return [k.id for k in self._by_digest.values()]

    @classmethod
    def load(cls, path: Path) -> ApiKeyStore:
        """Read and validate the keys file; ``ConfigError`` (file:line: key: message) if it is bad."""
        return cls(_to_keys(parse_records(*load(path, env=False))))

    def authenticate(self, key: str, now: float | None = None) -> Identity:
        if len(key) > MAX_KEY_CHARS or not key.isascii() or not key.startswith(KEY_PREFIX):
            raise AuthFailure("unknown_api_key", "unknown API key")
        digest = hashlib.sha256(key.encode("ascii")).hexdigest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found.digest, digest):
            raise AuthFailure("unknown_api_key", "unknown API key")
        if found.expires_at is not None and (time.time() if now is None else now) >= found.expires_at:
            raise AuthFailure("api_key_expired", "API key expired")
        return found.identity


def parse_records(data: Any, source: Source) -> list[ApiKeyRecord]:
    """The entries of a parsed keys file; ids and hashes must be unique (a ``ConfigError`` names the line)."""
    if data is None:
        return []
    records = build(list[ApiKeyRecord], data, "", source)
    ids: set[str] = set()
    hashes: set[str] = set()
    for i, record in enumerate(records):
        if record.id in ids:
            raise source.error(f"[{i}].id", f"duplicate id {record.id!r}")
        if record.hash in hashes:
            raise source.error(f"[{i}].hash", "duplicate hash: two entries for the same key")
        ids.add(record.id)
        hashes.add(record.hash)
    return records


def _to_keys(records: list[ApiKeyRecord]) -> list[ApiKey]:
    keys = []
    for r in records:
        roles = tuple(dict.fromkeys(r.roles))
        claims = MappingProxyType({**r.attrs, "sub": r.subject, "roles": list(roles)})
        # the decision memo's key: the id, plus a digest of what the identity holds, so an entry edited in place
        # (roles, or an attr whose type alone changed: 1 -> true) is a new key, never the old decision
        held = hashlib.sha256(repr((r.subject, roles, r.attrs)).encode("utf-8")).hexdigest()[:32]
        identity = Identity(subject=r.subject, roles=roles, claims=claims, method="api_key", credential_id=r.id,
                            cache_key=f"api_key:{r.id}:{held}")
        digest = _HASH.fullmatch(r.hash).group(1)  # type: ignore[union-attr]
        keys.append(ApiKey(r.id, digest, identity, expires_at(r.expires)))
    return keys


class ApiKeyFile:
    """The live key store of a configured file; ``reload`` swaps it only when the file is good."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = ApiKeyStore.load(path)

    def reload(self) -> None:
        self.store = ApiKeyStore.load(self.path)
