"""What the gateway lends each stage when it builds it: config, metrics and the policy in force."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .config import GatewayConfig
    from .metrics import Metrics
    from .policy.document import PolicyDocument


class PolicySource(Protocol):
    """The live policy. ``document`` is swapped atomically on reload; read it once per request."""

    @property
    def document(self) -> PolicyDocument | None: ...


@dataclass(frozen=True, slots=True)
class Services:
    config: GatewayConfig
    metrics: Metrics
    policy: PolicySource | None  # None when the config names no policy file (then everything is denied)
