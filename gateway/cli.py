"""``maas-gateway``: serve | check | audit | policy | keys | openapi, and each backend's own commands.

Every command fails with one human-readable line and a non-zero status on bad
input — never a traceback. Command groups owned by other modules register
themselves through ``register(subparsers)``; each installed backend adds its
own (the local runner's ``model ...`` and ``demo``) through ``Backend.add_commands``,
so this module names no backend.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from .errors import CliError, ConfigError
from .redact import redact_text

# modules of the core that add their own command groups (backends add theirs through the Backend interface)
COMMAND_MODULES = ("gateway.policy.cli", "gateway.auth.cli", "gateway.openapi")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{self.prog}: {message}", code=2)


def _serve(args: argparse.Namespace) -> int:
    from .launch import serve

    return serve(args.config, workers=args.workers)


def _check(args: argparse.Namespace) -> int:
    from .check import collect
    from .config import load_config

    try:
        config = load_config(args.config)
        findings = collect(config)
    except ConfigError as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    for f in findings:
        print(f.line())
    high = [f for f in findings if f.severity == "high"]
    other = [f for f in findings if f.severity != "high"]
    print(f"{len(high)} high, {len(other)} other finding(s)" if findings else "config OK, no findings")
    if high or (args.strict and other):
        return 1
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from .audit.cli import run_verify

    return run_verify(args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maas-gateway", description="Security gateway for models served as a service.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="run the gateway until SIGTERM/SIGINT (SIGHUP reloads policy and keys)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--workers", type=int, default=None, help="processes sharing the port (default: server.workers)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("check", help="validate config and policy, print security findings")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--strict", action="store_true", help="exit 1 on medium/low findings too")
    p.set_defaults(func=_check)

    audit = sub.add_parser("audit", help="audit log tools").add_subparsers(dest="audit_command", required=True,
                                                                          parser_class=_Parser)
    p = audit.add_parser("verify", help="check the audit log's hash chain (and macs, and the witness)")
    from .audit.cli import add_arguments as audit_verify_arguments

    audit_verify_arguments(p)
    p.set_defaults(func=_audit_verify)

    for module_name in COMMAND_MODULES:
        register: Callable[[argparse._SubParsersAction], None] | None
        try:
            register = getattr(importlib.import_module(module_name), "register", None)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # that command group is not installed
            raise
        if register is not None:
            register(sub)
    from .backend import registered

    for backend in registered().values():
        backend.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return exc.code
    except ConfigError as exc:  # a message may quote a config value: a store URL shows no password
        print(f"error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
