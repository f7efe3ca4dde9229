"""Client-side limits of the public port: connection caps, the counts of what was refused, the write deadline.

A reverse proxy must not let one peer hold what others need: how long a
request head may take to arrive, how large a head may grow, how many
connections one address (or everyone) may open, and how long an answer may sit
unread in a socket. Each of those lets a peer pin a connection and its memory,
and the last one also pins whatever the request holds upstream (a pooled
connection to a model server). The connection (``gateway.http_connection``)
enforces the head limits as it parses; this module holds what they share:

* **Connection caps** (``max_connections``, ``max_connections_per_ip``): a
  connection beyond either is closed in ``connection_made``, before any read.
* **Write deadline** (``client_write_timeout_s``, ``WriteWatch``): the
  transport's high-water mark is set to 1 byte, so ``pause_writing`` runs
  whenever bytes wait for the client beyond what the kernel took (over TLS,
  also after an answer that left bytes in the kernel). A client that
  acknowledges nothing for the deadline is dropped (transport aborted with a
  reset): the request's pending write fails, its task is cancelled, and its
  cleanup releases its upstream. A slow reader that keeps taking is given
  another period each time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .socket_probes import abort_with_reset, bytes_taken, kernel_unsent

if TYPE_CHECKING:
    from .config import ServerConfig

log = logging.getLogger("maas.connections")


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """The ``server.*`` limits one listener enforces (their meaning and defaults: ``ServerConfig``)."""

    header_timeout_s: float
    max_header_bytes: int
    max_connections: int
    max_connections_per_ip: int
    client_write_timeout_s: float

    @classmethod
    def from_config(cls, server: ServerConfig) -> ClientLimits:
        return cls(server.header_timeout_s, server.max_header_bytes, server.max_connections,
                   server.max_connections_per_ip, server.client_write_timeout_s)


class ConnectionCounter:
    """Open connections of one listener, in total and per client address, and what was refused.

    One per listener (so per process: ``--workers`` runs a listener per worker).
    The tallies are plain ints for tests and diagnostics.
    """

    __slots__ = ("limits", "total", "per_ip", "refused", "head_timeouts", "heads_too_large", "write_timeouts")

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_ip: dict[str, int] = {}
        self.refused = 0
        self.head_timeouts = 0
        self.heads_too_large = 0
        self.write_timeouts = 0

    def admit(self, ip: str) -> bool:
        """Count a new connection from ``ip``, or say no (and count the refusal) when a cap is reached."""
        held = self.per_ip.get(ip, 0)
        if self.total >= self.limits.max_connections or held >= self.limits.max_connections_per_ip:
            self.refused += 1
            return False
        self.total += 1
        self.per_ip[ip] = held + 1
        return True

    def release(self, ip: str) -> None:
        self.total -= 1
        held = self.per_ip.get(ip, 0) - 1
        if held > 0:
            self.per_ip[ip] = held
        else:
            self.per_ip.pop(ip, None)


class WriteWatch:
    """The write deadline of one connection: a client that takes nothing of its answer for the deadline is dropped.

    ``start`` when bytes wait for the client (the transport paused writing, or a
    TLS answer left bytes in the kernel), ``stop`` when the transport took
    everything. One timer per connection at a time; it re-arms itself while the
    client keeps taking bytes, however slowly.
    """

    __slots__ = ("_tr", "_loop", "_counter", "_peer", "_writing_paused", "_deadline", "_mark", "_timer")

    def __init__(self, tr: asyncio.Transport, counter: ConnectionCounter, peer: str,
                 writing_paused: Callable[[], bool]) -> None:
        self._tr: asyncio.Transport | None = tr
        self._loop = asyncio.get_running_loop()
        self._counter = counter
        self._peer = peer
        self._writing_paused = writing_paused
        self._deadline = 0.0  # 0: nothing waits for the client
        self._mark = 0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        tr = self._tr
        if tr is None or self._deadline:
            return
        self._mark = bytes_taken(tr)
        self._deadline = deadline = self._loop.time() + self._counter.limits.client_write_timeout_s
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._fired)

    def stop(self) -> None:
        self._deadline = 0.0  # the timer, if any, lapses

    def after_tls_answer(self) -> None:
        """Over TLS, encrypted bytes can sit in the TCP transport under the TLS one, where ``pause_writing``
        never sees them: after an answer, look at the kernel's queue instead."""
        tr = self._tr
        if tr is not None and not self._deadline and kernel_unsent(tr.get_extra_info("socket")):
            self.start()

    def close(self) -> None:
        self._tr = None
        self._deadline = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fired(self) -> None:
        self._timer = None
        deadline, tr = self._deadline, self._tr
        if not deadline or tr is None:
            return
        now = self._loop.time()
        if now < deadline:
            self._timer = self._loop.call_at(deadline, self._fired)
            return
        taken = bytes_taken(tr)
        limit = self._counter.limits.client_write_timeout_s
        if taken > self._mark:  # the client took something: a slow reader, not a stalled one
            self._mark = taken
            self._deadline = deadline = now + limit
            self._timer = self._loop.call_at(deadline, self._fired)
            return
        if not self._writing_paused() and not kernel_unsent(tr.get_extra_info("socket")):
            self._deadline = 0.0  # all taken meanwhile
            return
        self._counter.write_timeouts += 1
        log.info("connection from %s dropped: took nothing of its answer for %ss", self._peer, limit)
        abort_with_reset(tr)
