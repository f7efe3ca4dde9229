"""The Backend contract and the registry that finds backends by name.

A backend is what answers a request once every check has passed. Built-in
backends register here by name; third-party ones register through the
``maas_gateway.backends`` entry point group (``name = "package.module:Class"``),
so a team can ship its own backend without forking the gateway.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from gateway.config import ModelConfig, ServerConfig
    from gateway.metrics import Metrics
    from gateway.pipeline import BackendResponse, RequestContext

ENTRY_POINT_GROUP = "maas_gateway.backends"
BUILTIN = {
    "http": "backends.http:HttpBackend",
    "torch": "backends.torch:TorchBackend",
}


@dataclass(frozen=True, slots=True)
class BackendEnv:
    """What the gateway lends every backend: server-wide settings and the metrics."""

    server: ServerConfig
    metrics: Metrics | None = None


class Backend(ABC):
    """One model's backend. Created at start-up, ``start``ed once, ``close``d on shutdown.

    ``config_class`` is the dataclass of the model's ``backend:`` section (it must
    accept the ``type`` key); the config loader builds it so mistakes are caught
    by ``maas-gateway check`` with file and line.
    """

    config_class: ClassVar[type]

    def __init__(self, name: str, model: ModelConfig, config: Any, env: BackendEnv) -> None:
        self.name = name
        self.model = model
        self.config = config
        self.env = env

    async def start(self) -> None:
        """Open pools, load weights, warm up. Raise ``ConfigError`` to refuse to serve."""

    async def close(self) -> None:
        """Release everything ``start`` took; wait for in-flight work up to the drain timeout."""

    def ready(self) -> bool:
        """Whether this model can answer now (healthy upstream, weights loaded)."""
        return True

    def raw_paths(self) -> list[str]:
        """Paths forwarded as is to this backend (``raw`` protocol); routed with action ``infer``."""
        return []

    def raw_methods(self) -> list[str]:
        """The methods ``raw_paths`` take; any other is answered 405 by the gateway."""
        return ["POST"]

    def protocol(self) -> str:
        """``v2``, ``openai`` or ``raw``: which public routes reach this model."""
        return "v2"

    @abstractmethod
    async def handle(self, ctx: RequestContext) -> BackendResponse:
        """Answer ``ctx`` (route kind, normalised path, validated body, identity)."""


def backend_class(kind: Any) -> type[Backend]:
    """The Backend class registered as ``kind``; ``KeyError`` if none."""
    if not isinstance(kind, str):
        raise KeyError(kind)
    target = BUILTIN.get(kind)
    if target is None:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == kind:
                target = ep.value
                break
    if target is None:
        raise KeyError(kind)
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise KeyError(kind)
    return cls
