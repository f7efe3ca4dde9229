"""The audit writer: one sealed line per request, appended in batches, never silently lost.

``record`` is on every request's path, so it only builds the line in memory
(serialise, hash, optional HMAC: a few microseconds, no system call). Every
``FLUSH_INTERVAL_S`` the flush loop appends what is pending with ``os.write``.

A flush that fails (full disk, EIO, a file that stopped being writable) keeps
every unwritten byte in memory and tries again on the next tick; bytes that
did reach the file are never written twice, so a line split by a failure is
completed, not duplicated. While it fails, under ``audit.required`` (the
default) the gateway is not ready and answers 503 (``refusing``); without it,
it serves on and counts. ``maas_audit_lines_total`` counts a line only once it
is in the file. The memory kept is bounded (``audit.max_pending_bytes``): past
it new lines are dropped *before* they get a ``seq``, so the chain stays
whole, and each is counted in ``maas_audit_dropped_lines_total``.

After a flush, the chain head goes to the witness (if any): the log is
fdatasync'ed first, in a thread, so a witness never gets ahead of what a power
cut would leave in the file. A witness that fails is logged and counted
(``maas_audit_witness_errors_total``) but does not stop traffic: lines are still
being written, and the next flush records the newer head.

On start the witness is read back: if it saw more of *this* log (same line 1)
than the file now holds, lines were cut while the gateway was down; the writer
says so in the chain with a ``witness_gap`` line, which ``audit verify`` always
reports as a failure, before the new head overwrites the evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import ConfigError
from .chain import KeyProblem, Sealer, line_hash, load_key
from .logfile import OpenedLog, open_locked
from .witness import Head, WitnessError, decode, encode, locate

if TYPE_CHECKING:
    from ..config import AuditConfig
    from ..metrics import Metrics
    from ..pipeline import RequestContext

log = logging.getLogger("maas.audit")

FLUSH_INTERVAL_S = 0.2
MAX_PENDING_BYTES = 16 * 1024 * 1024
KEYS = ("ts", "request_id", "subject", "roles", "model", "action", "decision", "rule", "quota", "status",
        "latency_ms", "client", "bytes_in", "bytes_out", "monitors", "seq", "prev")

_second: list[Any] = [None, ""]  # [whole second, its formatted "YYYY-MM-DDTHH:MM:SS"]
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # the ".mmmZ" tails, formatted once
_write = os.write  # module-level so a test can make the disk fail without root


def rfc3339_now() -> str:
    """UTC now as RFC 3339 with milliseconds (``2026-11-22T03:26:39.123Z``), cheaper than datetime.isoformat."""
    now = time.time()
    second = int(now)
    if second != _second[0]:  # strftime once per second, not once per request
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second[0] = second
    return _second[1] + _MILLIS[int(now % 1 * 1000)]  # now % 1 < 1, so the index is 0..999


class AuditLog:
    """The one writer of one audit file (see the module docstring for what it guarantees)."""

    def __init__(self, path: Path, metrics: Metrics | None = None, *, key: bytes | None = None,
                 witness: str | None = None, required: bool = True,
                 max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        self.path = path
        self.metrics = metrics
        self.required = required
        self.refusing = False  # required and failing: the gateway answers 503 (read on every request)
        self._failure: str | None = None  # why the last flush failed; None while writing works
        self._sealer = Sealer(key)
        self._max_pending = max_pending_bytes
        self._witness = locate(witness, path) if witness else None
        path.parent.mkdir(parents=True, exist_ok=True)
        opened: OpenedLog = open_locked(path)
        self._fd = opened.fd
        self._closer = weakref.finalize(self, os.close, opened.fd)  # a log dropped unclosed still releases its lock
        self._seq, self._prev, self._first = opened.last_seq, opened.last_hash, opened.first_hash
        self._start_head = Head(opened.last_seq, opened.last_hash, opened.first_hash)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._backlog = b""  # bytes a failed flush could not write, written first next time
        self._written = self._start_head  # the head of what is in the file
        self._witnessed_seq = -1
        self._witness_failing = False
        self._task: asyncio.Task[None] | None = None
        self._witness_task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None
        if metrics:
            self._lines: Any = metrics.audit_lines
            self._errors: Any = metrics.audit_errors
            self._dropped: Any = metrics.audit_dropped
            self._witness_errors: Any = metrics.audit_witness_errors
        else:
            self._lines = self._errors = self._dropped = self._witness_errors = None
        if opened.torn is not None:
            torn = opened.torn
            self.write({"ts": rfc3339_now(), "event": "recovery", "reason": "torn last line cut on start",
                        "after_seq": opened.last_seq, "cut_bytes": torn.cut_bytes, "cut_sha256": torn.sha256,
                        "saved_to": torn.saved_to})
            self.flush()

    @classmethod
    def from_config(cls, config: AuditConfig, metrics: Metrics | None = None) -> AuditLog:
        """Open ``config.file`` with its key, witness and ``required`` setting; ConfigError in one line."""
        assert config.file is not None
        try:
            key = load_key(key_env=config.key_env, key_file=config.key_file)
        except KeyProblem as exc:
            raise ConfigError(str(exc), key="audit.key_env" if config.key_env else "audit.key_file") from None
        return cls(config.file, metrics, key=key, witness=config.witness, required=config.required,
                   max_pending_bytes=config.max_pending_bytes)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self._witness is not None:
            await self._check_witness()
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._flush_forever(self._stopping), name="audit-flush")

    async def close(self) -> None:
        """Flush everything (and the witness) and release the file; a graceful stop loses nothing."""
        if self._task is not None and self._stopping is not None:
            self._stopping.set()  # let the loop finish its turn rather than cancel it mid-write
            await self._task
            self._task = None
        if self._witness_task is not None:
            with contextlib.suppress(Exception):  # its failures are already logged and counted
                await self._witness_task  # bounded: every witness call has a timeout
            self._witness_task = None
        if not self._closer.alive:
            return
        if not self.flush():
            log.error("audit: %d byte(s) of audit lines could not be written to %s before exit",
                      len(self._backlog), self.path)
        with contextlib.suppress(OSError):
            os.fsync(self._fd)
        if self._witness is not None:
            await self._update_witness(sync=False)
            await self._witness.close()
        self._closer()

    def not_ready(self) -> str | None:
        """The readiness reason while lines cannot be written under ``required``."""
        return self._failure if self.refusing else None

    # -- the hot path ----------------------------------------------------------------

    def record(self, ctx: RequestContext, now: float) -> None:
        identity, decision = ctx.identity, ctx.decision
        self.write({
            "ts": rfc3339_now(),
            "request_id": ctx.request_id,
            "subject": identity.subject if identity else None,
            "roles": list(ctx.roles),
            "model": ctx.model_name,
            "action": ctx.action,
            "decision": ("allow" if decision.allowed else "deny") if decision else "deny",
            "rule": decision.rule if decision else None,
            "quota": ctx.quota,
            "status": ctx.status,
            "latency_ms": round((now - ctx.started) * 1000, 3),
            "client": ctx.request.peer,
            "bytes_in": ctx.bytes_in,
            "bytes_out": ctx.bytes_out,
            "monitors": list(ctx.monitors),  # the monitors in alarm for this caller and model (issue 14)
        })

    def write(self, entry: dict[str, Any]) -> None:
        """Chain ``entry`` (adds ``seq``, ``prev`` and, with a key, ``mac``) and queue it for the next flush."""
        if self._failure is not None and self._pending_bytes + len(self._backlog) > self._max_pending:
            if self._dropped is not None:
                self._dropped.inc()
            return  # dropped before it got a seq: the chain stays whole
        seq = self._seq + 1
        entry["seq"] = seq
        entry["prev"] = self._prev
        line = self._sealer.seal(orjson.dumps(entry))
        self._seq, self._prev = seq, line_hash(line)
        if seq == 1:
            self._first = self._prev
        self._pending.append(line + b"\n")
        self._pending_bytes += len(line) + 1

    # -- flushing --------------------------------------------------------------------

    def flush(self) -> bool:
        """Append everything pending; True when nothing is left unwritten. Never raises on a disk error."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            blob = self._backlog + data if self._backlog else data
        else:
            blob = self._backlog
        if not blob:
            return True
        done = 0
        try:
            with memoryview(blob) as view:
                while done < len(blob):
                    n = _write(self._fd, view[done:])
                    if n <= 0:
                        raise OSError(28, "no progress writing the audit log")
                    done += n
        except OSError as exc:
            self._backlog = blob[done:]
            self._count(blob.count(b"\n", 0, done))  # whole lines that did reach the file
            self._failed(exc)
            return False
        self._backlog = b""
        self._count(blob.count(b"\n"))
        self._written = Head(self._seq, self._prev, self._first)
        if self._failure is not None:
            log.warning("audit: %s is writable again; %d byte(s) held in memory were written", self.path, len(blob))
            self._failure = None
            self.refusing = False
        return True

    def _count(self, lines: int) -> None:
        if lines and self._lines is not None:
            self._lines.inc(lines)

    def _failed(self, exc: OSError) -> None:
        if self._errors is not None:
            self._errors.inc()
        if self._failure is None:
            reason = exc.strerror or str(exc)
            self._failure = f"audit log {self.path} not writable: {reason}"
            log.error("audit: cannot write %s: %s (%s)", self.path, reason,
                      "answering 503 until it works again" if self.required else "serving on: audit.required is false")
        self.refusing = self.required

    async def _flush_forever(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), FLUSH_INTERVAL_S)
            try:
                self.flush()
                if (self._witness is not None and self._written.seq != self._witnessed_seq
                        and (self._witness_task is None or self._witness_task.done())):
                    # its own task: a slow or dead witness never delays the next flush
                    self._witness_task = asyncio.create_task(self._update_witness(sync=True), name="audit-witness")
            except Exception:  # the loop must outlive any surprise, or lines would stop reaching the file
                log.exception("audit: flush loop error")

    # -- the witness -----------------------------------------------------------------

    async def _update_witness(self, *, sync: bool) -> None:
        """Record the head of what is in the file; ``sync``: fdatasync it first, in a thread."""
        assert self._witness is not None
        head = self._written
        if head.seq == 0 or head.seq == self._witnessed_seq:
            return
        try:
            if sync:
                await asyncio.to_thread(_datasync, self._fd)
            await self._witness.write(encode(head, self.path.name, rfc3339_now(), self._sealer))
        except WitnessError as exc:
            if self._witness_errors is not None:
                self._witness_errors.inc()
            if not self._witness_failing:
                log.error("audit: %s (the log is still written; retrying after each flush)", exc)
                self._witness_failing = True
            return
        if self._witness_failing:
            log.warning("audit: witness %s is recording again", self._witness.where)
            self._witness_failing = False
        self._witnessed_seq = head.seq

    async def _check_witness(self) -> None:
        """On start: record in the chain any lines the witness saw that the file no longer has."""
        assert self._witness is not None
        try:
            raw = await self._witness.read()
            seen = decode(raw, self._sealer) if raw is not None else None
        except WitnessError as exc:
            if self._witness_errors is not None:
                self._witness_errors.inc()
            log.error("audit: cannot read the witness on start: %s", exc)
            return
        if seen is None:
            return
        start = self._start_head
        if seen.first != start.first:
            if start.first is not None or seen.seq > 0:
                log.warning("audit: witness %s records another log (line 1 differs from %s's): file replaced, or "
                            "a witness shared with another log", self._witness.where, self.path)
            return
        if seen.seq > start.seq or (seen.seq == start.seq and seen.hash != start.hash):
            reason = (f"lines {start.seq + 1}-{seen.seq} were cut while the gateway was down" if seen.seq > start.seq
                      else f"line {seen.seq} was rewritten while the gateway was down")
            log.error("audit: %s: %s (the witness recorded seq %d, the file ends at %d)", self.path, reason,
                      seen.seq, start.seq)
            self.write({"ts": rfc3339_now(), "event": "witness_gap", "reason": reason, "file_seq": start.seq,
                        "witness_seq": seen.seq, "witness_hash": seen.hash})
            self.flush()


def _datasync(fd: int) -> None:
    with contextlib.suppress(OSError):  # /dev/full or a pipe cannot be synced; that is not a witness failure
        os.fdatasync(fd)
