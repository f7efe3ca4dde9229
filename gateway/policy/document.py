"""The policy file's schema, as frozen dataclasses.

One file carries four things a security team owns together: roles, rules
(authorisation), quotas and output hardening. The authorise, quota and harden
stages each read their own section of the same loaded document, so a reload
changes all three at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    cost: Literal["request", "rows"] = "request"  # rows: a v2 request costs its batch size
    per_day: int | None = None  # total per UTC calendar day, in the units of ``cost``
    per_month: int | None = None  # total per UTC calendar month
    id: str | None = None
    line: int = field(default=0, metadata={"yaml": "__internal_line"})

    def validate(self) -> tuple[str, str] | None:
        if (self.rate_per_s is None and self.max_concurrent is None and self.tokens_per_minute is None
                and self.per_day is None and self.per_month is None):
            return "", "a quota needs rate_per_s/burst, max_concurrent, tokens_per_minute, per_day or per_month"
        for name in ("per_day", "per_month"):
            value = getattr(self, name)
            if value is not None and value < 1:
                return name, "must be at least 1"
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
    keep: list[str] = field(default_factory=list)  # other outputs passed on; every unlisted one is dropped
    when: str | None = None  # applies only while this holds; preferred to entries without `when`
    id: str | None = None
    line: int = field(default=0, metadata={"yaml": "__internal_line"})

    def validate(self) -> tuple[str, str] | None:
        if any(not isinstance(k, str) or not k for k in self.keep):
            return "keep", "lists output names"
        if self.top_k is not None and self.top_k < 1:
            return "top_k", "must be at least 1"
        if self.round_decimals is not None and not 0 <= self.round_decimals <= 8:
            return "round_decimals", "must be between 0 and 8"
        if self.noise_epsilon is not None and self.noise_epsilon <= 0:
            return "noise_epsilon", "must be positive"
        return None


@dataclass(frozen=True, slots=True)
class MonitorRule:
    """A per-caller query-stream monitor (model-extraction detection); see ``gateway.monitors``."""

    id: str
    signal: Literal["low_confidence", "out_of_distribution"]
    models: list[str] = field(default_factory=lambda: ["*"])
    roles: list[str] | None = None
    subjects: list[str] | None = None
    threshold: float = 0.9  # low_confidence: a row whose top-1 score is below this is suspicious
    reference: Path | None = None  # out_of_distribution: .npy of in-distribution rows [n, features]
    distance: float | None = None  # out_of_distribution: farther than this from every reference row is suspicious
    window: int = 50  # the last N rows of each (subject, model)
    alarm_rate: float = 0.3  # alarm when more than this share of a full window is suspicious
    alarm_for_s: float = 86400.0  # an alarm lasts this long after the last suspicious window
    line: int = field(default=0, metadata={"yaml": "__internal_line"})
    # out_of_distribution: the reference rows (float32 [n, features]), read by load_document
    reference_rows: Any = field(default=None, init=False, compare=False, repr=False)

    def validate(self) -> tuple[str, str] | None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", self.id):
            return "id", "a monitor id is letters, digits and '_' (starting with a letter, at most 64)"
        if self.signal == "out_of_distribution" and (self.reference is None or self.distance is None):
            return "reference" if self.reference is None else "distance", \
                "out_of_distribution needs reference (a .npy file) and distance"
        if self.distance is not None and not self.distance > 0:
            return "distance", "must be positive"
        if not 0 < self.threshold <= 1 and self.signal == "low_confidence":
            return "threshold", "must be in (0, 1]"
        if not 1 <= self.window <= 10_000:
            return "window", "must be between 1 and 10000"
        if not 0 <= self.alarm_rate < 1:
            return "alarm_rate", "must be in [0, 1)"
        if not self.alarm_for_s > 0:
            return "alarm_for_s", "must be positive"
        return None


@dataclass(frozen=True, slots=True)
class PolicyDocument:
    roles: dict[str, list[str]] = field(default_factory=dict)
    subjects: dict[str, list[str]] = field(default_factory=dict)
    rules: list[Rule] = field(default_factory=list)
    quotas: list[QuotaRule] = field(default_factory=list)
    outputs: list[OutputRule] = field(default_factory=list)
    monitors: list[MonitorRule] = field(default_factory=list)
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
    for section in ("rules", "quotas", "outputs", "monitors"):
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
    ids: dict[str, int] = {}
    for i, monitor in enumerate(doc.monitors):
        if monitor.id in ids:
            raise ConfigError(f"duplicate monitor id {monitor.id!r}", file=source.file, line=monitor.line,
                              key=f"monitors[{i}].id")
        ids[monitor.id] = i
        if monitor.reference is not None:
            object.__setattr__(monitor, "reference_rows", _reference(monitor, source, i))
    import dataclasses

    return dataclasses.replace(doc, source=source)


def _reference(monitor: MonitorRule, source: Source, index: int) -> Any:
    """The reference rows of an out_of_distribution monitor: a 2-D numeric .npy, read without pickle."""
    import numpy as np

    def fail(message: str) -> ConfigError:
        return ConfigError(message, file=source.file, line=monitor.line or None, key=f"monitors[{index}].reference")

    try:
        rows = np.load(str(monitor.reference), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise fail(f"cannot read {monitor.reference}: {exc}") from None
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] < 1 or rows.dtype.kind not in "iuf":
        raise fail(f"{monitor.reference}: expected a 2-D numeric array [rows, features], got "
                   f"{rows.dtype} {list(rows.shape)}")
    if rows.shape[0] > 100_000:
        raise fail(f"{monitor.reference}: {rows.shape[0]} rows; at most 100000 (keep the per-row cost bounded)")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if not np.isfinite(rows).all():
        raise fail(f"{monitor.reference}: holds NaN or infinity")
    return rows
