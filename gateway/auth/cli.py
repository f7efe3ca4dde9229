"""``maas-gateway keys create|revoke``: issue and withdraw API keys.

``create`` prints the new key exactly once, on stdout alone (so a script can
capture it), and stores only its hash; the file is created with mode 0600 and
always replaced atomically. ``revoke`` takes effect in a running gateway on its
next reload (SIGHUP).
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import CliError
from .key_file import create_key, revoke_key


def register(subparsers: Any) -> None:
    keys = subparsers.add_parser("keys", help="create and revoke API keys",
                                 description="Manage the API keys file (only hashes are stored).")
    sub = keys.add_subparsers(dest="keys_command", metavar="{create,revoke}", required=True)

    create = sub.add_parser("create", help="create a key; prints it once")
    create.add_argument("--subject", required=True, help="the subject the key authenticates as")
    create.add_argument("--roles", required=True, help="comma-separated roles, e.g. analyst,reader")
    create.add_argument("--file", required=True, type=Path, help="the API keys YAML file (created if missing)")
    create.add_argument("--id", dest="key_id", help="the key's id (default: generated)")
    create.add_argument("--expires", help="ISO 8601 expiry, e.g. 2027-01-01T00:00:00Z (no zone means UTC)")
    create.set_defaults(func=cmd_create)

    revoke = sub.add_parser("revoke", help="remove a key by id")
    revoke.add_argument("--id", dest="key_id", required=True, help="the id of the key to remove")
    revoke.add_argument("--file", required=True, type=Path, help="the API keys YAML file")
    revoke.set_defaults(func=cmd_revoke)


def cmd_create(args: argparse.Namespace) -> int:
    subject = args.subject.strip()
    if not subject:
        raise CliError("--subject must not be empty", 2)
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    expires = _parse_expires(args.expires) if args.expires else None
    key_id = args.key_id.strip() if args.key_id is not None else None
    if key_id == "":
        raise CliError("--id must not be empty", 2)
    key, key_id = create_key(args.file, subject=subject, roles=roles, key_id=key_id, expires=expires)
    print(key)
    print(f"created API key {key_id!r} for subject {subject!r} in {args.file}; "
          "this is the only time the key is shown", file=sys.stderr)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    revoke_key(args.file, args.key_id)
    print(f"revoked API key {args.key_id!r} in {args.file}; a running gateway drops it on its next reload",
          file=sys.stderr)
    return 0


def _parse_expires(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CliError(f"--expires: expected an ISO 8601 date-time such as 2027-01-01T00:00:00Z, got {text!r}", 2) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    if value <= datetime.now(timezone.utc):
        raise CliError(f"--expires: {text} is in the past", 2)
    return value
