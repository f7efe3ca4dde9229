"""Start-up checks of each model's ``requires: {min_free_ram_mb, min_free_disk_mb}``.

A model that needs more memory than the machine (or its container) has left
is better refused at start-up with a sentence than killed by the OOM killer
mid-request. Free RAM is the kernel's ``MemAvailable`` (what can be allocated
without swapping), tightened by the cgroup v2 limit when the gateway runs in
a container whose limit is below the host's memory. Free disk is measured on
the file system that holds the model (or the config file, for remote models).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from .config import GatewayConfig
    from .plugins import PluggedModel

MIB = 1 << 20
CGROUP_ROOT = Path("/sys/fs/cgroup")


def free_ram_mb(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = CGROUP_ROOT) -> int | None:
    """Memory that can still be allocated, in MiB; None when the platform does not say."""
    available: int | None = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_headroom(cgroup)
    if limit is not None:
        available = min(available, limit)
    return available // MIB


def _cgroup_headroom(root: Path) -> int | None:
    try:
        raw = (root / "memory.max").read_text().strip()
        if raw == "max":
            return None
        return max(0, int(raw) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def free_disk_mb(path: Path) -> int | None:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe if probe.is_dir() else probe.parent).free // MIB
    except OSError:
        return None


def check_requirements(config: GatewayConfig, *, ram_mb: int | None = None,
                       plugged: Mapping[str, PluggedModel] | None = None) -> list[str]:
    """One sentence per unmet requirement (empty when every model fits). ``ram_mb`` overrides the measurement.

    ``plugged`` is the plugin step's answer for ``config`` (each backend says where its model's file lies);
    a caller that has none lets it be made here.
    """
    if plugged is None:
        from .plugins import plug

        plugged = plug(config)
    problems: list[str] = []
    ram = free_ram_mb() if ram_mb is None else ram_mb
    base = Path(config.source.base_dir) if config.source is not None else Path.cwd()
    total_ram = 0
    needing: list[str] = []
    for name, model in config.models.items():
        req = model.requires
        if req is None:
            continue
        if req.min_free_ram_mb > 0:
            total_ram += req.min_free_ram_mb
            needing.append(name)
            if ram is not None and ram < req.min_free_ram_mb:
                problems.append(f"model {name}: requires {req.min_free_ram_mb} MB of free RAM, {ram} MB available")
        if req.min_free_disk_mb > 0:
            where = plugged[name].data_path() if name in plugged else None
            target = Path(where).parent if where is not None else base
            disk = free_disk_mb(target)
            if disk is not None and disk < req.min_free_disk_mb:
                problems.append(f"model {name}: requires {req.min_free_disk_mb} MB of free disk at {target}, "
                                f"{disk} MB available")
    if len(needing) > 1 and ram is not None and ram < total_ram and not any("RAM" in p for p in problems):
        problems.append(f"models {', '.join(needing)}: together require {total_ram} MB of free RAM, "
                        f"{ram} MB available")
    return problems
