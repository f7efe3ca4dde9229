"""The local PyTorch runner: encrypted, signed models served with dynamic batching.

Importing this package never imports torch (the plugin step, ``check`` and the
CLI import it to find ``TorchBackend`` and its config); torch is loaded when a
model is started.
"""

from __future__ import annotations

from .backend import TorchBackend
from .config import TorchBackendConfig

__all__ = ["TorchBackend", "TorchBackendConfig"]
