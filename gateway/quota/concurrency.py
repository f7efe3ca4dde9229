"""What an admitted request holds until it ends, and the guarantee that it gives it back.

``max_concurrent`` counts in-flight requests per (entry, subject, model) as
*slots*; a token budget holds a *reservation*. Both must be returned on every
exit path — success, error, client disconnect, cancellation, timeout — or the
subject is locked out for good. The quota stage registers ``Hold.release``
with ``ctx.on_finish``, which the app runs on every path; ``release`` is
idempotent and runs the store call in its own task, not awaited by the request,
so a request task cancelled mid-release (a client that goes away) still frees
its slot and the connection's next request does not wait for the store.

Slot ids are minted here, never taken from the client: a client that sent the
same ``X-Request-ID`` twice must not share one slot between two requests. In
Redis a slot is a sorted-set member scored with its expiry (``SLOT_TTL_S``),
so the slots of a replica that crashed before releasing free themselves; the
store refreshes the slots of live requests (``live_slots``), so a request
keeps its slot for as long as it runs, however long that is.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from typing import TYPE_CHECKING, Callable

from . import llm_tokens
from .store import Limits, QuotaStore, StoreError

if TYPE_CHECKING:
    from ..pipeline import RequestContext

log = logging.getLogger("maas.quota")

_PROCESS = os.urandom(6).hex()  # distinguishes this replica's slots from others'
_counter = itertools.count()

# Releases in flight, kept referenced so they are not garbage-collected mid-way.
_pending: set[asyncio.Task[None]] = set()


async def drain() -> None:
    """Wait for the releases still in flight (shutdown: before the store closes)."""
    loop = asyncio.get_running_loop()
    mine = [task for task in _pending if task.get_loop() is loop]  # (a loop closed mid-release left its own)
    if mine:
        await asyncio.wait(mine)  # (not gather: cancelling the waiter must not cancel a release)


def new_slot_id() -> str:
    """A slot id unique across replicas and restarts (process nonce + counter)."""
    return f"{_PROCESS}.{next(_counter)}"


class Hold:
    """One admitted request's slot and token reservation."""

    __slots__ = ("store", "bucket", "limits", "slot", "reserved", "model", "_done", "_on_error", "_on_tokens")

    def __init__(self, store: QuotaStore, bucket: str, limits: Limits, slot: str, *, reserved: int = 0,
                 model: str = "", on_error: Callable[[StoreError], None] | None = None,
                 on_tokens: Callable[[str, int], None] | None = None) -> None:
        self.store, self.bucket, self.limits, self.slot = store, bucket, limits, slot
        self.reserved, self.model = reserved, model
        self._done = False
        self._on_error, self._on_tokens = on_error, on_tokens

    def refund_for(self, ctx: RequestContext) -> int:
        """Reserved minus used (negative: charge the overshoot). Zero without a token budget.

        Used is the usage the backend reported with its answer (``ctx.usage``), else
        the whole reservation if the upstream answered 2xx (``llm_tokens.actual``). A
        2xx final status counts as answered too, so a backend that reports no usage
        never makes answers free."""
        if not self.limits.tokens_per_minute:
            return 0
        usage = ctx.usage
        answered = (usage is not None and usage.answered) or 200 <= ctx.status < 300
        used = llm_tokens.actual(usage.total_tokens if usage is not None else None, answered, self.reserved)
        if self._on_tokens is not None:
            self._on_tokens(self.model, used)
        return self.reserved - used

    def release(self, ctx: RequestContext) -> None:
        """Give back the slot and settle the reservation; once, whatever happens to the caller.

        Started, not awaited: the request's answer is complete and its connection's next request must
        not wait for the store (awaiting cost a store round trip, or with the memory store two turns of a
        busy loop: ``finish`` took ~0.6 ms median at 16 streams). The release is issued before the next
        request on the same connection is read (its task is scheduled first, and Redis commands go out
        in order), and ``drain`` waits for every release still in flight at shutdown.
        """
        if self._done:
            return
        self._done = True
        refund = self.refund_for(ctx)
        task = asyncio.ensure_future(self._release(refund))
        _pending.add(task)
        task.add_done_callback(_pending.discard)

    async def _release(self, refund: int) -> None:
        try:
            await self.store.release(self.bucket, self.limits, self.slot, refund)
        except StoreError as exc:
            # The store frees the slot once it answers again (or after SLOT_TTL_S at worst:
            # it is no longer refreshed);
            # the refund is lost: the subject stays charged the estimate.
            log.warning("quota release failed for %s: %s", self.bucket, exc)
            if self._on_error is not None:
                self._on_error(exc)
