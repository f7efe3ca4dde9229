"""Kept for third-party backends written against ``backends.base``: the contract now lives in the core.

The Backend class, ``BackendEnv`` and the entry point lookup are defined in
``gateway.backend`` (the core owns the interface; backends sit above it and are
found through the ``maas_gateway.backends`` entry point group). New code imports
from there; this module only hands the same names on.
"""

from __future__ import annotations

from gateway.backend import ENTRY_POINT_GROUP, Backend, BackendEnv, backend_class

__all__ = ["ENTRY_POINT_GROUP", "Backend", "BackendEnv", "backend_class"]
