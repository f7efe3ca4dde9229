"""``maas-gateway audit verify FILE [--key-file K] [--witness W]``: one line per finding, exit 1 on the first break.

Every failure to even start (missing file, unreadable key, unreachable witness)
is one line on stderr through ``CliError``, never a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import CliError
from .chain import KeyProblem, load_key
from .verify import Report, verify_log
from .witness import WitnessError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file")
    parser.add_argument("--key-file", help="the audit MAC key (base64url): check every line's mac")
    parser.add_argument("--witness", help="the audit.witness (file path or redis:// URL): check nothing was cut")


def run_verify(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CliError(f"{path}: file not found")
    try:
        key = load_key(key_file=args.key_file) if args.key_file else None
    except KeyProblem as exc:
        raise CliError(str(exc)) from None
    try:
        report = verify_log(path, key=key, witness=args.witness)
    except WitnessError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"{path}: {exc.strerror or exc}") from None
    for number, entry in report.recoveries:
        print(_recovery_line(path, number, entry))
    if report.problem is not None:
        print(f"{path}: {report.problem}")
        return 1
    if report.bad_line is not None:
        print(f"{path}:{report.bad_line}: chain broken: {report.reason}")
        return 1
    print(_summary(path, report))
    return 0


def _recovery_line(path: Path, number: int, entry: dict[str, object]) -> str:
    saved = entry.get("saved_to")
    where = f", copied to {saved}" if saved else ""
    return (f"{path}:{number}: recovery: {entry.get('cut_bytes')} byte(s) of a torn line cut after line "
            f"{entry.get('after_seq')} on start (sha256 {entry.get('cut_sha256')}{where})")


def _summary(path: Path, report: Report) -> str:
    parts = [f"{path}: {report.lines} line(s), chain intact"]
    if report.keyed:
        parts.append("every mac valid")
    if report.witness is not None:
        later = report.lines - report.witness.seq
        tail = f"; {later} line(s) written after its last update" if later > 0 else ""
        parts.append(f"matches the witness (seq {report.witness.seq}{tail})")
    return ", ".join(parts)
