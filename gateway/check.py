"""``maas-gateway check``: every finding for one config, gathered from the modules that own them.

The producers of findings do not know each other: the config's own sections
(``gateway.findings``), the policy file (compiled, then linted by
``gateway.policy.lint``), each model's backend (its ``config_findings`` hook,
so the core never names a backend) and the start-up requirements
(``gateway.preflight``). This module sits above all of them and only collects,
in the order ``check`` prints them.
"""

from __future__ import annotations

from .config import GatewayConfig
from .findings import Finding, config_findings
from .plugins import PluggedModel, plug
from .preflight import check_requirements


def collect(config: GatewayConfig, plugged: dict[str, PluggedModel] | None = None) -> list[Finding]:
    """All findings for a loaded config; a bad policy file or backend section raises ``ConfigError``."""
    if plugged is None:
        plugged = plug(config)
    out = config_findings(config, policy_findings(config) if config.policy is not None else ())
    for name, p in plugged.items():
        out.extend(p.backend_class.config_findings(name, p.backend_config))
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
    if document.quotas and config.quota is None:
        out.append(Finding("high", "quota", "the policy defines quotas but the config has no quota section: none is enforced"))
    return out
