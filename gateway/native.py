"""Which modules run as native code, and whether the native build matches its sources.

The request path (the connection, the door, every stage of a proxied request,
the upstream client, the checks of a v2 body) is compiled with mypyc when the
package is installed (``setup.py``): the same typed source, as C extension
modules. It is what brings the full pipeline near Envoy's throughput (issue 15:
the Python core of a binary v2 request goes from ~80 to ~48 µs, ``bench/core.py``);
nothing else changes: the same code, the same tests. ``MAAS_GATEWAY_COMPILE=0``
at install time keeps it pure Python (no C compiler needed).

A compiled module is a ``.so`` beside its ``.py``, and Python imports the
``.so`` first: in a checkout installed with ``pip install -e .``, editing a
``.py`` changes nothing until the next build. ``stale()`` finds such modules;
``serve`` and the test suite refuse to run on them rather than run code other
than what the file says.

Stdlib only: ``setup.py`` reads ``COMPILED`` from this file before the package
(or any dependency) can be imported.
"""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

# Relative to the repository root: what a proxied request runs. Kept out: modules off that path (config, policy
# compilation, the CLI, workers, the torch runner, the LLM surfaces' checks); the in-memory quota store (a test
# replaces its ``release``); the Redis store, quota matching, the audit writer and the LLM paths (compiled too, they
# were no faster in bench/core.py, within its noise). Add a module only with the whole suite green on both builds.
COMPILED = (
    "gateway/http_connection.py",
    "gateway/http_door.py",
    "gateway/http_request.py",
    "gateway/http_body.py",
    "gateway/http_writer.py",
    "gateway/http_answer.py",
    "gateway/connection_limits.py",
    "gateway/app.py",
    "gateway/pipeline.py",
    "gateway/routing.py",
    "gateway/jsonsafe.py",
    "gateway/metrics.py",
    "gateway/v2.py",
    "gateway/v2_binary.py",
    "gateway/auth/jwt.py",
    "gateway/audit/chain.py",
    "gateway/policy/enforcer.py",
    "gateway/quota/redis_lease.py",
    "gateway/quota/store.py",
    "gateway/cache.py",
    "gateway/llm/stage.py",
    "gateway/stages/request_id.py",
    "gateway/stages/framing.py",
    "gateway/stages/path.py",
    "gateway/stages/authenticate.py",
    "gateway/stages/route.py",
    "gateway/stages/body.py",
    "gateway/stages/authorize.py",
    "gateway/stages/outputs_guard.py",
    "gateway/stages/quota.py",
    "gateway/stages/validate.py",
    "gateway/stages/harden.py",
    "backends/http/client.py",
    "backends/http/connection.py",
    "backends/http/headers.py",
    "backends/http/backend.py",
    "backends/http/response.py",
    "backends/http/protocols.py",
    "backends/http/upstreams.py",
)

ROOT = Path(__file__).resolve().parents[1]


def built(root: Path = ROOT) -> list[str]:
    """The modules of ``COMPILED`` that have a native build beside them."""
    found = extensions(root)
    return [source for source in COMPILED if source in found]


def extensions(root: Path = ROOT) -> dict[str, Path]:
    """Every native build beside a module of the package (source path -> extension file), compiled or not."""
    found = {}
    for package in ("gateway", "backends"):
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            for native in (root / package).rglob("*" + suffix):
                source = native.with_name(native.name[: -len(suffix)] + ".py")
                if source.exists():
                    found[source.relative_to(root).as_posix()] = native
    return found


def stale(root: Path = ROOT) -> list[str]:
    """Modules whose native build is older than their source (edited since the last build), or that an earlier
    build compiled and this one does not (their ``.so`` would still be imported first)."""
    return [source for source, native in extensions(root).items()
            if source not in COMPILED or os.stat(root / source).st_mtime > os.stat(native).st_mtime]


def problem(root: Path = ROOT) -> str | None:
    """One line saying why this checkout's native build cannot be used, or None when it can (or there is none)."""
    old = stale(root)
    if not old:
        return None
    shown = ", ".join(old[:3]) + (f" and {len(old) - 3} more" if len(old) > 3 else "")
    return (f"compiled modules do not match their sources ({shown}): rebuild with `pip install -e .` "
            "(or `MAAS_GATEWAY_COMPILE=0 pip install -e .` for pure Python)")

