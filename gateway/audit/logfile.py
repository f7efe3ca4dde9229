"""Opening an audit file for appending: one writer per file, and a torn last line cut away with evidence.

Two processes appending to one file would interleave two chains, so the writer
holds an exclusive ``flock`` on the file itself for its whole life (no sidecar
lock file to go stale: the kernel drops the lock when the process dies, however
it dies). A second writer -- another process, or a second ``AuditLog`` in the same
process -- is refused with one line naming the file.

A crash in the middle of a write can leave the file ending in part of a line.
Left there, the next line would be glued to it and the chain would stay broken
for good. So on start the bytes after the last newline are cut off, but only
after they have been copied next to the log (``FILE.torn-<seq>``) and measured;
the writer then records the cut in a ``recovery`` line (see ``writer.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson

from ..errors import ConfigError
from .chain import GENESIS, line_hash

log = logging.getLogger("maas.audit")

BLOCK = 65_536


@dataclass(frozen=True, slots=True)
class TornTail:
    """The partial line found at the end of the file on start, and where its bytes went."""

    cut_bytes: int
    sha256: str
    saved_to: str | None  # the copy's file name (beside the log), None when it could not be written


@dataclass(frozen=True, slots=True)
class OpenedLog:
    """A locked, append-only descriptor and where the chain stands in the file."""

    fd: int
    last_seq: int  # seq of the last whole line (0 for an empty log)
    last_hash: str  # its hash: the next line's prev (GENESIS for an empty log)
    first_hash: str | None  # hash of line 1: the log's identity in a witness record
    torn: TornTail | None


def open_locked(path: Path) -> OpenedLog:
    """Open ``path`` for appending under an exclusive lock, cutting a torn last line (copied aside first)."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"audit log {path} is already being written by another process "
                                  "(one writer per file)") from None
            raise ConfigError(f"audit log {path} cannot be locked: {exc.strerror}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # /dev/full, a pipe: nothing to read back
            return OpenedLog(fd, 0, GENESIS, None, None)
        return _inspect(path, fd)
    except BaseException:
        os.close(fd)
        raise


def _inspect(path: Path, fd: int) -> OpenedLog:
    size = os.fstat(fd).st_size
    whole_end = rfind_newline(fd, size) + 1  # bytes [0, whole_end) are whole lines
    last = first = None
    if whole_end > 0:
        start = rfind_newline(fd, whole_end - 1) + 1
        last = os.pread(fd, whole_end - 1 - start, start)
        first = os.pread(fd, _find_newline(fd, 0, whole_end), 0)
    last_seq = _last_seq(fd, whole_end, last)
    torn = _cut_tail(path, fd, whole_end, size, last_seq + 1) if whole_end < size else None
    if last is None or first is None:
        return OpenedLog(fd, 0, GENESIS, None, torn)
    return OpenedLog(fd, last_seq, line_hash(last), line_hash(first), torn)


def _last_seq(fd: int, whole_end: int, last: bytes | None) -> int:
    """``seq`` of the last whole line; a log written before ``seq`` existed is counted instead."""
    if last is None:
        return 0
    try:
        entry = orjson.loads(last)
    except orjson.JSONDecodeError:
        entry = None
    seq = entry.get("seq") if isinstance(entry, dict) else None
    if isinstance(seq, int) and not isinstance(seq, bool) and seq > 0:
        return seq
    count, pos = 0, 0
    while pos < whole_end:  # once, on the first start after an upgrade
        block = os.pread(fd, min(BLOCK * 16, whole_end - pos), pos)
        count += block.count(b"\n")
        pos += len(block)
    return count


def _cut_tail(path: Path, fd: int, start: int, end: int, seq: int) -> TornTail:
    """Copy bytes [start, end) to ``FILE.torn-<seq>``, hash them, then truncate the log to ``start``."""
    digest = hashlib.sha256()
    saved, out = _new_copy(path, seq)
    pos = start
    try:
        while pos < end:
            block = os.pread(fd, min(BLOCK, end - pos), pos)
            if not block:
                break
            digest.update(block)
            if out is not None:
                try:
                    out.write(block)
                except OSError as exc:
                    log.error("audit: cannot save the torn tail of %s: %s", path, exc.strerror)
                    with contextlib.suppress(OSError):
                        out.close()
                    out, saved = None, None
            pos += len(block)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            with contextlib.suppress(OSError):
                out.close()
    os.ftruncate(fd, start)
    os.fsync(fd)
    log.warning("audit: %s ended in a torn line: cut %d byte(s) (copied to %s)", path, end - start, saved)
    return TornTail(end - start, digest.hexdigest(), saved.name if saved is not None else None)


def _new_copy(path: Path, seq: int) -> tuple[Path | None, BinaryIO | None]:
    """A fresh ``FILE.torn-<seq>`` (``.1``, ``.2``, ... if a crash loop already left one): never overwrite evidence."""
    for attempt in range(100):
        saved = path.with_name(f"{path.name}.torn-{seq}" + (f".{attempt}" if attempt else ""))
        try:
            return saved, os.fdopen(os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "wb")
        except FileExistsError:
            continue
        except OSError as exc:
            log.error("audit: cannot save the torn tail of %s to %s: %s", path, saved, exc.strerror)
            return None, None
    return None, None


def rfind_newline(fd: int, end: int) -> int:
    """Offset of the last ``\\n`` before ``end``, or -1: read backwards a block at a time."""
    pos = end
    while pos > 0:
        step = min(BLOCK, pos)
        pos -= step
        found = os.pread(fd, step, pos).rfind(b"\n")
        if found >= 0:
            return pos + found
    return -1


def _find_newline(fd: int, pos: int, end: int) -> int:
    """Offset of the first ``\\n`` in [pos, end) (there is one: ``end`` follows a whole line)."""
    while pos < end:
        block = os.pread(fd, min(BLOCK, end - pos), pos)
        found = block.find(b"\n")
        if found >= 0:
            return pos + found
        pos += len(block)
    return end - 1
