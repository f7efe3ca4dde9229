"""``maas-gateway serve``: the gateway in this process, or N worker processes under a supervisor.

Everything that can be refused is refused here, before a socket is opened or a
worker is spawned: the config is loaded and every model's backend is looked up
and its section typed (``gateway.plugins``), so a mistake is one line with file
and line, never a crash loop of workers. This module sits above both ways of
running (``gateway.server`` for one process, ``gateway.workers`` for several),
so neither needs the other's launcher.
"""

from __future__ import annotations

import asyncio
import sys

from . import native
from .config import load_config
from .errors import ConfigError
from .plugins import plug
from .server import _serve, install_uvloop


def serve(config_path: str, *, workers: int | None = None) -> int:
    """Run until SIGTERM/SIGINT. Returns the exit status."""
    stale = native.problem()
    if stale is not None:  # never serve code other than what the files say
        raise ConfigError(stale)
    config = load_config(config_path)
    plugged = plug(config)
    count = workers or config.server.workers
    install_uvloop()
    if count <= 1:
        asyncio.run(_serve(config, reuse_port=False, plugged=plugged))
        return 0
    from .workers import run_workers  # supervision (replacing dead workers) lives there

    return run_workers(config_path, count)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve(sys.argv[1]))
