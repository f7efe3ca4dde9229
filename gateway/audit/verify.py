"""``audit verify``: walk the log once and name the first line whose check fails.

Per line, in order: whole (ends in a newline), a JSON object, has ``prev``;
with a key its ``mac`` is right; ``prev`` is the previous line's hash;
``seq`` equals the line number (a log written before ``seq`` existed may start
with lines that have none). A ``recovery`` line (a torn tail cut on start) is
reported and the walk goes on; a ``witness_gap`` line (the gateway found on
start that lines had been cut) always fails. With a witness: line 1 must be the
one it recorded, the line at its ``seq`` must have its hash, and the file must
reach that ``seq`` -- lines cut from the end are named by the first missing
number. The file may go on past the witness's ``seq``: lines written after the
last witness update (a crash between the two) are not a cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .chain import GENESIS, Sealer, line_hash
from .witness import Head, decode, locate


@dataclass(slots=True)
class Report:
    """What ``verify_log`` found. ``bad_line`` is 1-based; ``problem`` is a failure not tied to one line."""

    lines: int = 0
    bad_line: int | None = None
    reason: str = "ok"
    problem: str | None = None
    recoveries: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    keyed: bool = False
    witness: Head | None = None
    witness_where: str | None = None

    @property
    def ok(self) -> bool:
        return self.bad_line is None and self.problem is None


def verify(path: Path) -> tuple[int, int | None, str]:
    """The chain alone: (lines checked, first bad 1-based line or None, reason)."""
    report = verify_log(path)
    return report.lines, report.bad_line, report.reason


def verify_log(path: Path, *, key: bytes | None = None, witness: str | None = None) -> Report:
    """Check ``path``; raises ``WitnessError`` when a witness is given but cannot be read."""
    report = Report(keyed=key is not None)
    sealer = Sealer(key) if key is not None else None
    head: Head | None = None
    if witness is not None:
        place = locate(witness, path)
        report.witness_where = place.where
        raw = place.read_sync()
        if raw is None:
            report.problem = f"the witness has no record of this log ({place.where})"
            return report
        head = report.witness = decode(raw, sealer)
    _walk(path, report, sealer, head)
    if report.ok and head is not None and report.lines < head.seq:
        first_missing = report.lines + 1
        report.bad_line = first_missing
        report.reason = (f"lines {first_missing}-{head.seq} missing from the end "
                         f"(the witness recorded seq {head.seq})")
    return report


def _walk(path: Path, report: Report, sealer: Sealer | None, head: Head | None) -> None:
    prev = GENESIS
    seen_seq = False
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            report.lines = number
            reason = _check(number, raw, prev, sealer, seen_seq)
            if isinstance(reason, str):
                report.bad_line, report.reason = number, reason
                return
            entry, line = reason
            digest = line_hash(line)
            if head is not None:
                if number == 1 and head.first is not None and digest != head.first:
                    report.bad_line, report.reason = 1, "line 1 is not the one the witness recorded (file replaced?)"
                    return
                if number == head.seq and digest != head.hash:
                    report.bad_line = number
                    report.reason = "line does not match the witness's hash of it (rewritten)"
                    return
            event = entry.get("event")
            if event == "recovery":
                report.recoveries.append((number, entry))
            elif event == "witness_gap":
                report.bad_line = number
                report.reason = f"the gateway found on start that {entry.get('reason', 'lines were cut')}"
                return
            seen_seq = seen_seq or "seq" in entry
            prev = digest


def _check(number: int, raw: bytes, prev: str, sealer: Sealer | None,
           seen_seq: bool) -> str | tuple[dict[str, Any], bytes]:
    """Why line ``number`` fails, or (its entry, its bytes) when it passes."""
    if not raw.endswith(b"\n"):
        return "incomplete last line (a torn write: the gateway cuts it on its next start)"
    line = raw[:-1]
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "not valid JSON"
    if not isinstance(entry, dict) or "prev" not in entry:
        return "missing 'prev'"
    if sealer is not None:
        problem = sealer.check(line)
        if problem:
            return problem
    if entry["prev"] != prev:
        if number == 1:
            return "first line's prev is not the genesis hash (lines removed from the start?)"
        return "prev does not match the previous line (edited, removed or reordered)"
    seq = entry.get("seq")
    if seq is None:
        if seen_seq:
            return "missing 'seq'"
    elif seq != number or isinstance(seq, bool):
        return f"seq is {seq!r} but this is line {number} (lines removed or added)"
    return entry, line
