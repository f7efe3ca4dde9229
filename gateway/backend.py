"""The Backend contract: everything the core asks of a model backend, and where backends are found.

A backend is what answers a request once every check has passed. The core
(routing, validation, ``maas-gateway check``, the CLI) talks to backends only
through this class, so it never names one: every backend, the built-in ``http``
and local-runner ones included, registers through the ``maas_gateway.backends``
entry point group (``name = "package.module:Class"``) and is found here by the
``type:`` its model's ``backend:`` section names. A team ships its own backend
without forking the gateway.

It imports nothing of the gateway at run time (the config, findings, metrics
and pipeline types are named for the type checker only), so backends, the
plugin step and the CLI can all stand on it without a loop.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from .config import ModelConfig, ServerConfig, TensorSpec
    from .findings import Finding
    from .metrics import Metrics
    from .pipeline import BackendResponse, RequestContext

ENTRY_POINT_GROUP = "maas_gateway.backends"


@dataclass(frozen=True, slots=True)
class BackendEnv:
    """What the gateway lends every backend: server-wide settings and the metrics."""

    server: ServerConfig
    metrics: Metrics | None = None


class Backend(ABC):
    """One model's backend. Created at start-up, ``start``ed once, ``close``d on shutdown.

    ``config_class`` is the dataclass of the model's ``backend:`` section (it must
    accept the ``type`` key); the plugin step (``gateway.plugins``) builds it so
    mistakes are caught by ``maas-gateway check`` with file and line. Creating a
    backend must be cheap and touch nothing outside the process (the OpenAPI
    document asks a freshly made one for its routes); ``start`` does the work.

    The class-level hooks (``config_findings``, ``data_path``, ``add_commands``)
    are asked without an instance: ``check`` and the CLI never start a backend.
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

    def declared_inputs(self) -> list[TensorSpec] | None:
        """The inputs this model takes, when the backend knows them (after ``start``); None otherwise.

        The validate stage checks a v2 body against them when the config declares none.
        """
        return None

    @abstractmethod
    async def handle(self, ctx: RequestContext) -> BackendResponse:
        """Answer ``ctx`` (route kind, normalised path, validated body, identity)."""

    # -- asked of the class, without an instance --------------------------------------

    @classmethod
    def config_findings(cls, name: str, config: Any) -> list[Finding]:
        """What ``maas-gateway check`` should flag in this model's ``backend:`` section (``config`` is typed)."""
        return []

    @classmethod
    def verifies_signatures(cls, config: Any) -> bool:
        """Whether this model's artifact is checked against a signing key or certificate.

        ``check`` asks every model: when one does, signing keys exist in the deployment,
        and another model's ``UNSIGNED_ARTIFACT`` finding becomes ``high``.
        """
        return False

    @classmethod
    def data_path(cls, config: Any) -> Path | None:
        """The file this model is read from, if local: its free-disk requirement is measured there.

        The default keeps the older convention of a ``path`` key in the section.
        """
        path = getattr(config, "path", None)
        return Path(path) if path is not None else None

    @classmethod
    def add_commands(cls, subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
        """Add this backend's own ``maas-gateway`` subcommands (each sets ``func``); none by default."""


def backend_class(kind: object) -> type[Backend]:
    """The Backend class registered as ``kind`` in the entry point group; ``KeyError`` if none."""
    if not isinstance(kind, str):
        raise KeyError(kind)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == kind:
            cls = ep.load()
            if isinstance(cls, type) and issubclass(cls, Backend):
                return cls
            break
    raise KeyError(kind)


def registered() -> dict[str, type[Backend]]:
    """Every installed backend class by name; one that fails to import is left out (its commands too)."""
    found: dict[str, type[Backend]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except ImportError:
            continue  # a backend whose optional dependencies are missing offers no commands
        if isinstance(cls, type) and issubclass(cls, Backend):
            found.setdefault(ep.name, cls)
    return found
