"""Security findings for ``maas-gateway check``: what a reviewer would flag in a config.

``high`` findings fail the check (exit 1): each is a way the deployment is
open to attack as written. ``medium``/``low`` are printed and fail only under
``--strict``.

This module holds the ``Finding`` shape and the findings of the config's own
sections; it imports no producer of findings. ``gateway.check`` gathers these
with the policy's lint, each backend's own and the start-up requirements.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Literal, Sequence

from .config import GatewayConfig
from .redact import redact_text

Severity = Literal["high", "medium", "low"]
MIN_HS256_SECRET_BYTES = 32
# The tag of a backend's "this model artifact is not signature-checked" finding: ``check`` raises it to
# high when signing keys exist in the deployment (another model's artifact is verified).
UNSIGNED_ARTIFACT = "unsigned-artifact"


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    where: str
    message: str
    tag: str | None = None  # what kind of finding, for a rule that spans models (UNSIGNED_ARTIFACT)

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


def config_findings(config: GatewayConfig, policy: Sequence[Finding] = ()) -> list[Finding]:
    """The findings of the config's own sections (server, admin, auth, policy, audit, quota).

    ``policy`` holds the policy file's own findings, printed where the policy section is reviewed.
    """
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
        out.extend(policy)
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
    return out
