"""The policy file's schema, as frozen dataclasses.

One file carries four things a security team owns together: roles, rules
(authorisation), quotas and output hardening. The authorise, quota and harden
stages each read their own section of the same loaded document, so a reload
changes all three at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..typedyaml import Source, build, load
from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    effect: Literal["allow", "deny"]
    roles: list[str] = field(default_factory=lambda: ["*"])
    models: list[str] = field(default_factory=lambda: ["*"])
    actions: list[str] = field(default_factory=lambda: ["*"])
    when: str | None = None
    mode: Literal["enforce", "shadow"] = "enforce"
    description: str | None = None
    line: int = field(default=0, metadata={"yaml": "__internal_line"})


@dataclass(frozen=True, slots=True)
class QuotaRule:
    """A token bucket per (entry, subject, model). Most specific match wins: subjects > roles > "*"."""

    models: list[str] = field(default_factory=lambda: ["*"])
    roles: list[str] | None = None
    subjects: list[str] | None = None
    rate_per_s: float | None = None
    burst: int | None = None
    max_concurrent: int | None = None
    tokens_per_minute: int | None = None  # LLM token budget (openai backends)
    id: str | None = None
    line: int = field(default=0, metadata={"yaml": "__internal_line"})

    def validate(self) -> tuple[str, str] | None:
        if self.rate_per_s is None and self.max_concurrent is None and self.tokens_per_minute is None:
            return "", "a quota needs rate_per_s/burst, max_concurrent or tokens_per_minute"
        if (self.rate_per_s is None) != (self.burst is None):
            return "burst" if self.burst is None else "rate_per_s", "rate_per_s and burst go together"
        if self.rate_per_s is not None and self.rate_per_s <= 0:
            return "rate_per_s", "must be positive"
        if self.burst is not None and self.burst < 1:
            return "burst", "must be at least 1"
        if self.max_concurrent is not None and self.max_concurrent < 1:
            return "max_concurrent", "must be at least 1"
        if self.tokens_per_minute is not None and self.tokens_per_minute < 1:
            return "tokens_per_minute", "must be at least 1"
        return None


@dataclass(frozen=True, slots=True)
class OutputRule:
    """Output hardening against model extraction, per role/subject and model."""

    models: list[str] = field(default_factory=lambda: ["*"])
    roles: list[str] | None = None
    subjects: list[str] | None = None
    top_k: int | None = None
    label_only: bool = False
    round_decimals: int | None = None
    noise_epsilon: float | None = None  # Laplace noise on scores, scale 1/epsilon
    id: str | None = None
    line: int = field(default=0, metadata={"yaml": "__internal_line"})

    def validate(self) -> tuple[str, str] | None:
        if self.top_k is not None and self.top_k < 1:
            return "top_k", "must be at least 1"
        if self.round_decimals is not None and not 0 <= self.round_decimals <= 8:
            return "round_decimals", "must be between 0 and 8"
        if self.noise_epsilon is not None and self.noise_epsilon <= 0:
            return "noise_epsilon", "must be positive"
        return None


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    roles: dict[str, list[str]] = field(default_factory=dict)
    subjects: dict[str, list[str]] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    quotas: list[QuotaRule] = field(default_factory=list)
    outputs: list[OutputRule] = field(default_factory=list)
    source: Source | None = field(default=None, metadata={"yaml": "__internal_source"})


def load_document(path: str) -> PolicyDocument:
    """Parse a policy file into a ``PolicyDocument`` (schema only; rules are compiled elsewhere).

    Policy files are data a security team ships: ``${ENV}`` is *not* substituted.
    """
    data, source = load(path, env=False)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise source.error("", "expected a mapping at the top level")
    for section in ("rules", "quotas", "outputs"):
        items = data.get(section)
        if isinstance(items, list):
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    if "__internal_line" in item:
                        raise source.error(f"{section}[{i}].__internal_line", "unknown key")
                    item["__internal_line"] = source.line(f"{section}[{i}]") or 0
    for key in data:
        if isinstance(key, str) and key.startswith("__internal"):
            raise source.error(key, "unknown key")
    doc = build(PolicyDocument, data, "", source)
    seen: dict[str, int] = {}
    for i, rule in enumerate(doc.rules):
        if rule.id in seen:
            raise ConfigError(f"duplicate rule id {rule.id!r}", file=source.file, line=rule.line, key=f"rules[{i}].id")
        seen[rule.id] = i
    import dataclasses

    return dataclasses.replace(doc, source=source)
