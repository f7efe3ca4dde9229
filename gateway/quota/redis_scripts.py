"""The Lua scripts the Redis quota store runs, and their wire format.

``acquire.lua`` admits requests, ``release.lua`` gives back what they held,
``refresh.lua`` keeps the slots of live requests from expiring. Each ships as a
package file, is loaded with ``SCRIPT LOAD`` and called by SHA (``EVALSHA``);
one call may carry many requests (see ``command_args``).
"""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua file shipped in this package, with its SHA1 (what EVALSHA names)."""

    name: str
    source: str
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        source = importlib.resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
        return cls(name, source, hashlib.sha1(source.encode()).hexdigest())


ACQUIRE = Script.load("acquire.lua")
RELEASE = Script.load("release.lua")
REFRESH = Script.load("refresh.lua")
SCRIPTS = (ACQUIRE, RELEASE, REFRESH)

Requests = list[tuple[tuple[str, ...], tuple[Any, ...]]]  # (keys, args) per request


def integers(reply: bytes | str) -> list[int]:
    """A script's comma-separated integers (bytes, or str under ``decode_responses``)."""
    parts = reply.split(b",") if isinstance(reply, bytes) else reply.split(",")
    return [int(x) for x in parts]


def command_args(script: Script, requests: Requests, slot_ttl_ms: str) -> tuple[int, list[Any]]:
    """(number of keys, keys + args) for one script call carrying ``requests``.

    ``acquire.lua`` and ``refresh.lua`` take the slot TTL first, then each
    request's arguments; ``release.lua`` takes only the requests'.
    """
    keys: list[Any] = []
    args: list[Any] = [] if script is RELEASE else [slot_ttl_ms]
    for k, a in requests:
        keys.extend(k)
        args.extend(a)
    return len(keys), keys + args


def refresh_commands(live: dict[str, list[str]], *, per_call: int,
                     one_key_per_call: bool) -> list[tuple[Script, Requests]]:
    """``refresh.lua`` calls for every slot in ``live``: about ``per_call`` slots each (Cluster: one key each)."""
    commands: list[tuple[Script, Requests]] = []
    requests: Requests = []
    size = 0
    for key, slots in live.items():
        for i in range(0, len(slots), per_call):
            part = slots[i:i + per_call]
            requests.append(((key,), (len(part), *part)))
            size += len(part)
            if size >= per_call or one_key_per_call:
                commands.append((REFRESH, requests))
                requests, size = [], 0
    if requests:
        commands.append((REFRESH, requests))
    return commands
