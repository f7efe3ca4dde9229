"""API keys: ``mk_`` + 32 random bytes, stored only as SHA-256 hashes in a YAML file.

File format (written by ``maas-gateway keys create``, editable by hand)::

    - {id: k1, hash: "sha256:<hex>", subject: svc-a, roles: [analyst], attrs: {team: x}, expires: 2027-01-01T00:00:00Z}

A key carries 256 bits of entropy, so an unsalted SHA-256 is the right hash: it
cannot be brute-forced, and a lookup by digest leaks nothing through timing
that would help guess a key (the digest of a guess is unrelated to the digest
of the real key). The file is read into a dict keyed by digest; identities are
built once at load time, so checking a key costs one hash and one lookup.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Sequence

import yaml

from ..errors import CliError, ConfigError
from ..pipeline import Identity
from ..typedyaml import Source, build, load, loads
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
        return cls(_to_keys(_records(*load(path, env=False))))

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


def _records(data: Any, source: Source) -> list[ApiKeyRecord]:
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
        identity = Identity(subject=r.subject, roles=roles, claims=claims, method="api_key", credential_id=r.id)
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


# ---------------------------------------------------------------------------
# editing the file (keys create / revoke)


def create_key(path: Path, *, subject: str, roles: Sequence[str], key_id: str | None = None,
               expires: datetime | None = None) -> tuple[str, str]:
    """Add a new key to ``path`` (created 0600 if missing); returns ``(key, id)``. The key is never stored."""
    with _locked(path.parent):
        text, data, records = _read_for_edit(path)
        taken = {r.id for r in records}
        if key_id is None:
            key_id = "key-" + secrets.token_hex(4)
            while key_id in taken:
                key_id = "key-" + secrets.token_hex(4)
        elif key_id in taken:
            raise CliError(f"{path}: a key with id {key_id!r} already exists", 1)
        key = generate_key()
        entry: dict[str, Any] = {"id": key_id, "hash": hash_key(key), "subject": subject, "roles": list(roles), "attrs": {}}
        if expires is not None:
            entry["expires"] = expires
        try:  # a bad subject or role is refused before the file is touched
            build(ApiKeyRecord, entry, "", Source(file=str(path)))
        except ConfigError as exc:
            raise CliError(f"{exc.key or 'key'}: {exc.reason}", 2) from None
        new_data = [*data, entry]
        appended = text + ("" if not text or text.endswith("\n") else "\n") + _dump([entry])
        _write_atomic(path, appended if _parses_to(appended, new_data) else _dump(new_data))
        return key, key_id


def revoke_key(path: Path, key_id: str) -> None:
    """Remove the entry with ``key_id``; ``CliError`` (exit 1) when there is none."""
    if not path.exists():
        raise CliError(f"{path}: file not found", 1)
    with _locked(path.parent):
        text, data, records = _read_for_edit(path)
        index = next((i for i, r in enumerate(records) if r.id == key_id), None)
        if index is None:
            raise CliError(f"{path}: no key with id {key_id!r}", 1)
        new_data = data[:index] + data[index + 1:]
        _write_atomic(path, _without_entry(text, index, len(data), new_data))


def _read_for_edit(path: Path) -> tuple[str, list[Any], list[ApiKeyRecord]]:
    """The file's text, raw entries and validated records; a malformed file is never edited."""
    if not path.exists():
        return "", [], []
    data, source = load(path, env=False)
    records = _records(data, source)
    text = path.read_text(encoding="utf-8")
    return text, list(data or []), records


def _dump(data: list[Any]) -> str:
    return yaml.safe_dump(data, default_flow_style=None, sort_keys=False, width=4096, allow_unicode=True)


def _parses_to(text: str, expected: list[Any]) -> bool:
    try:
        data, _ = loads(text, env=False)
    except ConfigError:
        return False
    return (data or []) == expected


def _without_entry(text: str, index: int, count: int, new_data: list[Any]) -> str:
    """Cut one entry's lines out, keeping the rest of the file (and its comments) as written.

    Falls back to re-writing the whole list when the file's layout (a flow list,
    several entries on one line) makes a line cut unsafe: the result is checked
    by parsing it back.
    """
    _, source = loads(text, env=False)
    start = source.line(f"[{index}]")
    end = source.line(f"[{index + 1}]") if index + 1 < count else None
    if start is not None:
        lines = text.splitlines(keepends=True)
        cut = "".join(lines[: start - 1] + (lines[end - 1:] if end else []))
        if _parses_to(cut, new_data):
            return cut
    return _dump(new_data) if new_data else "[]\n"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise concurrent ``keys`` commands on one directory (flock; a no-op where unsupported)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    if not directory.is_dir():
        raise CliError(f"{directory}: directory not found", 1)
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same directory + rename: readers see the old or the new file, never half."""
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
