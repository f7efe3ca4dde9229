"""Helpers for the audit tests: write lines through the real writer, run the real CLI, tamper like an attacker."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from gateway.audit import GENESIS, AuditLog, rfc3339_now


def new_key_file(directory: Path) -> tuple[bytes, Path]:
    """A 32-byte key written as base64url text (the `model keygen` format)."""
    key = os.urandom(32)
    path = directory / "audit.key"
    path.write_text(base64.urlsafe_b64encode(key).decode().rstrip("=") + "\n")
    return key, path


async def write_lines(path: Path, n: int, *, key: bytes | None = None, witness: str | None = None,
                      start: int = 0) -> None:
    """Open the log with the real writer, append ``n`` request-like lines, close it (flush + witness)."""
    log = AuditLog(path, key=key, witness=witness)
    await log.start()
    for i in range(start, start + n):
        log.write({"ts": rfc3339_now(), "request_id": f"r{i}-{os.urandom(4).hex()}", "decision": "allow",
                   "status": 200})
    await log.close()


def verify_cli(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``maas-gateway audit verify`` as a real process."""
    return subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", str(path), *extra],
                          capture_output=True, text=True, timeout=60)


def entries(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def rechain(lines: list[dict[str, Any]]) -> bytes:
    """What an attacker without the key writes: the edited entries with every ``prev`` recomputed.

    Keys keep their order, each line keeps whatever ``mac`` it had (the attacker cannot compute a new one),
    and ``seq`` is renumbered so only the key or the witness can tell."""
    out = []
    prev = GENESIS
    for number, entry in enumerate(lines, start=1):
        entry = dict(entry)
        entry["seq"] = number
        entry["prev"] = prev
        if "mac" in entry:
            entry["mac"] = entry.pop("mac")  # still the last member
        line = orjson.dumps(entry)
        prev = hashlib.sha256(line).hexdigest()
        out.append(line)
    return b"\n".join(out) + b"\n"
