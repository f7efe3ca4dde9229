"""Security findings for ``maas-gateway check``: what a reviewer would flag in a config.

``high`` findings fail the check (exit 1): each is a way the deployment is
open to attack as written. ``medium``/``low`` are printed and fail only under
``--strict``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Literal

from .config import GatewayConfig
from .redact import redact_text

Severity = Literal["high", "medium", "low"]
MIN_HS256_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    where: str
    message: str

    def line(self) -> str:
        """The printed form; a URL quoted in a message (a store, a witness) never shows its credentials."""
        return redact_text(f"{self.severity.upper():6} {self.where}: {self.message}")


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def collect(config: GatewayConfig) -> list[Finding]:
    """All findings for a loaded config (the policy file is compiled too: its errors raise ConfigError)."""
    out: list[Finding] = []
    server = config.server
    if server.tls is None and not is_loopback(server.host):
        out.append(Finding("high", "server", f"plain HTTP on non-loopback address {server.host}: tokens travel in clear"))
    if config.admin is not None and not is_loopback(config.admin.host):
        out.append(Finding("high", "admin", f"admin port on non-loopback address {config.admin.host}: metrics and health are public"))
    jwt = config.auth.jwt
    if jwt is not None:
        if jwt.hs256_secret_env:
            secret = os.environ.get(jwt.hs256_secret_env, "")
            if len(secret.encode()) < MIN_HS256_SECRET_BYTES:
                out.append(Finding("high", "auth.jwt.hs256_secret_env",
                                   f"HS256 secret is {len(secret.encode())} bytes; use at least {MIN_HS256_SECRET_BYTES} random bytes"))
        if jwt.jwks_url and jwt.jwks_url.startswith("http://"):
            out.append(Finding("high", "auth.jwt.jwks_url", "JWKS fetched over plain HTTP: keys can be swapped in transit"))
        if not jwt.issuer:
            out.append(Finding("medium", "auth.jwt.issuer", "issuer not checked"))
        if not jwt.audience:
            out.append(Finding("medium", "auth.jwt.audience", "audience not checked: tokens minted for other services are accepted"))
        if jwt.leeway_s > 300:
            out.append(Finding("low", "auth.jwt.leeway_s", f"leeway of {jwt.leeway_s}s keeps expired tokens alive"))
    if config.auth.api_keys is not None:
        try:
            mode = config.auth.api_keys.file.stat().st_mode & 0o077
            if mode:
                out.append(Finding("medium", "auth.api_keys.file", "API key file is readable by group/others"))
        except FileNotFoundError:
            out.append(Finding("medium", "auth.api_keys.file", "API key file does not exist yet: no key is accepted"))
    if config.policy is None:
        out.append(Finding("medium", "policy", "no policy file: every request is denied"))
    else:
        out.extend(_policy_findings(config))
        if not config.policy.watch:
            out.append(Finding("low", "policy.watch", "policy changes apply only on SIGHUP"))
    if config.audit is None or not config.audit.enabled or config.audit.file is None:
        out.append(Finding("medium", "audit", "audit is off: decisions leave no tamper-evident trail"))
    if config.quota is None:
        out.append(Finding("low", "quota", "no quotas: a single caller can use all capacity"))
    else:
        if config.quota.on_store_error == "allow":
            out.append(Finding("medium", "quota.on_store_error", "quota store failures let requests through unmetered"))
        if config.quota.store == "memory" and server.workers > 1:
            out.append(Finding("medium", "quota.store", "memory store with several workers: each worker keeps its own limits"))
    for name, typed in config.backend_configs.items():
        out.extend(_model_findings(name, typed))
    from .preflight import check_requirements

    for problem in check_requirements(config):
        out.append(Finding("high", "models", problem))
    return out


def _policy_findings(config: GatewayConfig) -> list[Finding]:
    """Compile the policy (bad `when` expressions fail with rule id and line), then lint it."""
    from .policy.compile import compile_policy
    from .policy.document import load_document
    from .policy.testing import lint

    assert config.policy is not None
    document = load_document(str(config.policy.file))
    compile_policy(document, config.policy.model_file)
    out = lint(document)
    if document.quotas and config.quota is None:
        out.append(Finding("high", "quota", "the policy defines quotas but the config has no quota section: none is enforced"))
    return out


def _model_findings(name: str, typed: object) -> list[Finding]:
    out: list[Finding] = []
    path = getattr(typed, "path", None)
    if path is None or getattr(typed, "type", None) != "torch":
        return out
    sig = path.with_name(path.name + ".sig")
    verify = getattr(typed, "verify_key_file", None)
    if verify is not None and not sig.is_file():
        out.append(Finding("high", f"models.{name}", f"unsigned model artifact: {sig.name} missing (it will not load)"))
    elif verify is None and sig.is_file():
        out.append(Finding("high", f"models.{name}.backend", "model is signed but verify_key_file is not set: tampering goes unnoticed"))
    elif verify is None:
        out.append(Finding("medium", f"models.{name}.backend", "model signature not verified (no verify_key_file)"))
    if not (getattr(typed, "key_env", None) or getattr(typed, "key_file", None)):
        out.append(Finding("low", f"models.{name}.backend", "model weights are not encrypted at rest"))
    return out
