"""The local PyTorch runner: encrypted, signed models served with dynamic batching.

Importing this package never imports torch (the config loader imports it to
find ``TorchBackendConfig``); torch is loaded when a model is started.
"""

from __future__ import annotations

from .backend import TorchBackend
from .config import TorchBackendConfig

__all__ = ["TorchBackend", "TorchBackendConfig"]
