"""The ``http`` backend: an existing model server (vLLM, TGI, Triton, KServe, a team's own app) over HTTP.

Modules: ``config`` (the ``backend:`` section), ``headers`` (what the upstream
may see), ``protocols`` (openai / v2 / raw paths and body rewrites),
``upstreams`` (balancing, passive health, ejection, probes), ``relay``
(streaming answers), ``backend`` (the Backend implementation tying them together),
and the upstream HTTP/1.1 client: ``client`` (pool, request head), ``connection``
(one keep-alive connection, its timers and reuse), ``response`` (body reading and
its limits), ``errors``.
"""

from __future__ import annotations

from .backend import HttpBackend
from .config import HttpBackendConfig

__all__ = ["HttpBackend", "HttpBackendConfig"]
