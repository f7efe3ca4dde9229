"""Editing the API keys file: ``maas-gateway keys create`` and ``keys revoke``.

Kept apart from ``api_keys`` (which reads the file and checks keys on the hot
path) because writing is a different concern: a file a person also edits by
hand must keep its comments and layout, must never be left half-written, and
two ``keys`` commands at once must not lose each other's change. So an edit
locks the directory, changes only the lines it must (checked by parsing the
result back, else the whole list is re-written), and replaces the file
atomically with its mode kept.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from ..errors import CliError, ConfigError
from ..typedyaml import Source, build, load, loads
from .api_keys import ApiKeyRecord, generate_key, hash_key, parse_records

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
    records = parse_records(data, source)
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
