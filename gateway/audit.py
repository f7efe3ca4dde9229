"""The tamper-evident audit log: one JSON line per request, hash-chained.

Each line carries ``prev``, the SHA-256 of the previous line's bytes, so
deleting, reordering or editing any line breaks the chain at that point and
``maas-gateway audit verify`` names it. Lines never contain a token, a key or a
payload: only who, what, which rule decided, and how it ended.

Writes go to a buffered file and are flushed every ``FLUSH_INTERVAL_S`` and on
shutdown, so the hot path never waits on the disk and a graceful stop loses
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from .metrics import Metrics
    from .pipeline import RequestContext

log = logging.getLogger("maas.audit")

GENESIS = "0" * 64
FLUSH_INTERVAL_S = 0.2
KEYS = ("ts", "request_id", "subject", "roles", "model", "action", "decision", "rule", "quota", "status",
        "latency_ms", "client", "bytes_in", "bytes_out", "prev")


_second: list[Any] = [None, ""]  # [whole second, its formatted "YYYY-MM-DDTHH:MM:SS"]
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))  # the ".mmmZ" tails, formatted once


def rfc3339_now() -> str:
    """UTC now as RFC 3339 with milliseconds (``2026-11-22T03:26:39.123Z``), cheaper than datetime.isoformat."""
    now = time.time()
    second = int(now)
    if second != _second[0]:  # strftime once per second, not once per request
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second[0] = second
    return _second[1] + _MILLIS[int(now % 1 * 1000)]  # now % 1 < 1, so the index is 0..999


def _last_line_hash(path: Path) -> str:
    """Continue an existing log's chain: hash of its last complete line, or genesis."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return GENESIS
    if size == 0:
        return GENESIS
    with path.open("rb") as f:
        block = 65_536
        pos = size
        tail = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            stripped = tail.rstrip(b"\n")
            cut = stripped.rfind(b"\n")
            if cut >= 0 or pos == 0:
                return hashlib.sha256(stripped[cut + 1 :]).hexdigest()
    return GENESIS


class AuditLog:
    def __init__(self, path: Path, metrics: Metrics | None = None) -> None:
        self.path = path
        self.metrics = metrics
        path.parent.mkdir(parents=True, exist_ok=True)
        self._prev = _last_line_hash(path)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=1 << 16)
        self._task: asyncio.Task[None] | None = None
        self._lines = metrics.tally(metrics.audit_lines) if metrics else None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="audit-flush")

    def write(self, entry: dict[str, Any]) -> None:
        entry["prev"] = self._prev
        line = orjson.dumps(entry)
        try:
            self._file.write(line + b"\n")
        except OSError as exc:  # a full disk must not take the gateway down, but it must be visible
            if self.metrics:
                self.metrics.audit_errors.inc()
            log.error("audit write failed: %s", exc)
            return
        self._prev = hashlib.sha256(line).hexdigest()
        if self._lines is not None:
            self._lines.inc()

    def record(self, ctx: RequestContext, now: float) -> None:
        identity, decision = ctx.identity, ctx.decision
        self.write({
            "ts": rfc3339_now(),
            "request_id": ctx.request_id,
            "subject": identity.subject if identity else None,
            "roles": list(decision.roles if decision and decision.roles else identity.roles if identity else ()),
            "model": ctx.model_name,
            "action": ctx.action,
            "decision": ("allow" if decision.allowed else "deny") if decision else "deny",
            "rule": decision.rule if decision else None,
            "quota": ctx.quota,
            "status": ctx.status,
            "latency_ms": round((now - ctx.started) * 1000, 3),
            "client": ctx.client_ip,
            "bytes_in": ctx.bytes_in,
            "bytes_out": ctx.bytes_out,
        })

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as exc:
            if self.metrics:
                self.metrics.audit_errors.inc()
            log.error("audit flush failed: %s", exc)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            self.flush()

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.flush()
        with contextlib.suppress(OSError):
            os.fsync(self._file.fileno())
        self._file.close()


def verify(path: Path) -> tuple[int, int | None, str]:
    """Check the hash chain. Returns (lines checked, first bad 1-based line or None, reason)."""
    prev = GENESIS
    count = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            count = number
            if not raw.endswith(b"\n"):
                return count, number, "incomplete last line"
            line = raw[:-1]
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                return count, number, "not valid JSON"
            if not isinstance(entry, dict) or "prev" not in entry:
                return count, number, "missing 'prev'"
            if entry["prev"] != prev:
                if number == 1:
                    return count, number, "first line's prev is not the genesis hash (lines removed from the start?)"
                return count, number, "prev does not match the previous line (edited, removed or reordered)"
            prev = hashlib.sha256(line).hexdigest()
    return count, None, "ok"
