"""The plugin step: each model's backend class found once, and its ``backend:`` section typed by it.

Config loading (``gateway.config``) stays pure data: it knows a model has a
``backend:`` section with a ``type``, nothing more. This step sits above both
config and the backend interface and does what needs the plugins: it looks up
each model's backend class by its ``type`` (``gateway.backend.backend_class``)
and builds the backend's own config class from the section, with the same
file:line errors ``maas-gateway check`` prints for the rest of the file. The
gateway, ``check`` and the OpenAPI document all start from its answer, so a
class is resolved once per model and a section is typed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backend import Backend, BackendEnv, backend_class
from .config import GatewayConfig, ModelConfig
from .errors import ConfigError


@dataclass(frozen=True, slots=True)
class PluggedModel:
    """One model with its backend class and that backend's typed config."""

    model: ModelConfig
    backend_class: type[Backend]
    backend_config: Any  # an instance of backend_class.config_class

    @property
    def name(self) -> str:
        return self.model.name

    def data_path(self) -> Path | None:
        """Where the model's file lives, if local (the free-disk requirement is measured there)."""
        return self.backend_class.data_path(self.backend_config)

    def create(self, env: BackendEnv) -> Backend:
        """A new, not yet started backend for this model."""
        return self.backend_class(self.model.name, self.model, self.backend_config, env)


def plug(config: GatewayConfig) -> dict[str, PluggedModel]:
    """Every model of ``config`` with its backend class and typed section; ``ConfigError`` (file:line) if not."""
    plugged: dict[str, PluggedModel] = {}
    for name, model in config.models.items():
        kind = model.backend.get("type")
        try:
            cls = backend_class(kind)
        except KeyError:
            where, message = f"models.{name}.backend.type", f"unknown backend type {kind!r}"
            if config.source is None:
                raise ConfigError(message, key=where) from None  # a config built in code has no file
            raise config.source.error(where, message) from None
        plugged[name] = PluggedModel(model, cls, model.backend.build(cls.config_class))
    return plugged


def create_backends(plugged: dict[str, PluggedModel], env: BackendEnv) -> dict[str, Backend]:
    """One new backend per model, in config order."""
    return {name: p.create(env) for name, p in plugged.items()}


def backends_for(config: GatewayConfig) -> dict[str, Backend]:
    """Unstarted backends for ``config`` without metrics: for asking them what they serve, not for serving."""
    return create_backends(plug(config), BackendEnv(config.server))
