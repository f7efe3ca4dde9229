"""``maas-gateway policy test | explain | lint``: the security team's tools.

Each command compiles the policy exactly as ``serve`` does (same schema checks,
same Casbin model, same condition compiler), so a file that passes here loads
in the gateway, and a decision shown here is the decision the gateway makes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import CliError
from .store import LoadedPolicy, load_policy
from .lint import lint
from .testing import check_request, describe_output, explain, format_explanation, load_cases, outputs_entry, run_cases


def register(subparsers: Any) -> None:
    policy = subparsers.add_parser("policy", help="test, explain and lint policy files")
    commands = policy.add_subparsers(dest="policy_command", metavar="{test,explain,lint}")
    commands.required = True

    p = commands.add_parser("test", help="run policy test cases (YAML); exit 1 on any failing case")
    p.add_argument("policy", help="policy file (YAML)")
    p.add_argument("cases", help="test cases file (YAML)")
    p.add_argument("--model-file", help="Casbin model (default: the bundled one)")
    p.add_argument("-v", "--verbose", action="store_true", help="print passing cases too")
    p.set_defaults(func=cmd_test)

    p = commands.add_parser("explain", help="show the decision for one request and the rule that made it")
    p.add_argument("policy", help="policy file (YAML)")
    p.add_argument("--subject", required=True,
                   help='token claims as JSON, e.g. \'{"sub": "alice", "roles": ["analyst"]}\'')
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--action", required=True, choices=["infer", "read"])
    p.add_argument("--request", default="{}", help='request attributes as JSON: ip, mtls, hour (UTC), method, path, '
                   'params ({"logprobs": true, "batch": 64}), monitors (ids in alarm)')
    p.add_argument("--labels", default="{}", help="the model's labels as JSON, as in the gateway config")
    p.add_argument("--model-file", help="Casbin model (default: the bundled one)")
    p.set_defaults(func=cmd_explain)

    p = commands.add_parser("lint", help="flag rules that cannot do what they seem to; exit 1 on a high finding")
    p.add_argument("policy", help="policy file (YAML)")
    p.add_argument("--strict", action="store_true", help="exit 1 on medium findings too")
    p.add_argument("--model-file", help="Casbin model (default: the bundled one)")
    p.set_defaults(func=cmd_lint)


def _load(args: argparse.Namespace) -> LoadedPolicy:
    model_file = Path(args.model_file) if getattr(args, "model_file", None) else None
    return load_policy(Path(args.policy), model_file, cache_size=0)


def _json_object(text: str, option: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{option}: not valid JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(value, dict):
        raise CliError(f"{option}: expected a JSON object, got {type(value).__name__}")
    return value


def cmd_test(args: argparse.Namespace) -> int:
    loaded = _load(args)
    cases = load_cases(args.cases)
    results = run_cases(loaded.enforcer, cases)
    failed = [r for r in results if not r.passed]
    for result in results:
        if not result.passed:
            print(result.failure())
        elif args.verbose:
            print(f"ok   {result.label}: {result.case.expect} (rule {result.decision.rule})")
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_explain(args: argparse.Namespace) -> int:
    loaded = _load(args)
    subject = _json_object(args.subject, "--subject")
    request = _json_object(args.request, "--request")
    labels = _json_object(args.labels, "--labels")
    problem = check_request(request)
    if problem:
        where, message = problem
        name = where.split(".", 1)[1] if "." in where else where
        if message.startswith("unknown request attribute"):
            raise CliError(f"--request: unknown attribute {name!r} {message[len('unknown request attribute '):]}")
        raise CliError(f"--request: {name}: {message}")
    for line in format_explanation(explain(loaded.enforcer, subject, args.model, args.action, request, labels)):
        print(line)
    chosen = outputs_entry(loaded.enforcer, subject, args.model, request, labels)
    if loaded.document.outputs:
        print(f"outputs: {describe_output(*chosen) if chosen is not None else '(none: the full answer)'}")
    return 0


def cmd_lint(args: argparse.Namespace) -> int:
    loaded = _load(args)
    findings = lint(loaded.document)
    for finding in findings:
        print(finding.line())
    high = sum(1 for f in findings if f.severity == "high")
    print(f"{high} high, {len(findings) - high} other finding(s)" if findings else "policy OK, no findings")
    if high or (args.strict and findings):
        return 1
    return 0
