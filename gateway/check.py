"""``maas-gateway check``: every finding for one config, gathered from the modules that own them.

The producers of findings do not know each other: the config's own sections
(``gateway.findings``), the policy file (compiled, then linted by
``gateway.policy.lint``), each model's backend (its ``config_findings`` hook,
so the core never names a backend) and the start-up requirements
(``gateway.preflight``). This module sits above all of them and only collects,
in the order ``check`` prints them.
"""

from __future__ import annotations

import os
from dataclasses import replace

from .config import GatewayConfig
from .findings import UNSIGNED_ARTIFACT, Finding, config_findings
from .plugins import PluggedModel, plug
from .preflight import check_requirements


def collect(config: GatewayConfig, plugged: dict[str, PluggedModel] | None = None) -> list[Finding]:
    """All findings for a loaded config; a bad policy file or backend section raises ``ConfigError``."""
    if plugged is None:
        plugged = plug(config)
    out = config_findings(config, policy_findings(config) if config.policy is not None else ())
    signers = [name for name, p in plugged.items() if p.backend_class.verifies_signatures(p.backend_config)]
    for name, p in plugged.items():
        for finding in p.backend_class.config_findings(name, p.backend_config):
            if finding.tag == UNSIGNED_ARTIFACT and signers and finding.severity != "high":
                # the deployment has signing keys, yet this artifact is taken unchecked (spec: "check")
                finding = replace(finding, severity="high", message=f"unsigned model artifact while signing keys "
                                  f"exist (models {', '.join(signers)} verify signatures): {finding.message}")
            out.append(finding)
    for problem in check_requirements(config, plugged=plugged):
        out.append(Finding("high", "models", problem))
    return out


def policy_findings(config: GatewayConfig) -> list[Finding]:
    """Compile the policy (bad `when` expressions fail with rule id and line), then lint it."""
    from .policy.compile import compile_policy
    from .policy.document import load_document
    from .policy.lint import lint

    assert config.policy is not None
    document = load_document(str(config.policy.file))
    compile_policy(document, config.policy.model_file)
    out = lint(document)
    if any(o.noise_epsilon is not None for o in document.outputs):
        env = config.hardening.noise_key_env
        value = os.environ.get(env, "") if env else ""
        if not value:
            where = f"environment variable {env} is not set" if env else "hardening.noise_key_env is not set"
            out.append(Finding("medium", "hardening.noise_key_env",
                               f"{where}: output noise uses a per-process key, so replicas and restarts draw "
                               "different noise and repeated queries across them average it away"))
        elif len(value.encode()) < 16:
            out.append(Finding("medium", "hardening.noise_key_env", "noise key is under 16 bytes: use a random secret"))
    if document.quotas and config.quota is None:
        out.append(Finding("high", "quota", "the policy defines quotas but the config has no quota section: none is enforced"))
    return out
