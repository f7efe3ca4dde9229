"""Who created each response id: the Responses API's stored answers belong to their creator.

The Responses API keeps answers server-side and serves them to anyone who
names the id (``GET/DELETE /v1/responses/{id}``, ``.../cancel``,
``.../input_items``, ``previous_response_id``). The model server has no idea
who is calling, so the gateway records ``id -> (subject, model)`` when it sees
an id created (the JSON answer, or the stream's ``response.created`` event)
and answers 404, before anything is forwarded, to anyone else, and to everyone
for an id it never saw or whose record expired (``responses_ttl_s``). 404, not
403: another subject's id must be indistinguishable from one that does not
exist.

The record lives in the quota store, so every replica knows it: Redis
``SET key value NX EX ttl`` (one key per id; never overwritten, so an
upstream that hands out an id twice cannot move it to another subject), or,
for ``store: memory`` and a gateway without quotas, the equivalent in this
process (``MemoryOwners``, LRU-bounded). A store that cannot answer a lookup
fails closed (503): ownership is never assumed.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

import orjson

from ..cache import Lru
from ..errors import Unavailable
from ..quota.store import StoreError, key_part

log = logging.getLogger("maas.llm")

DEFAULT_TTL_S = 30 * 86400
MAX_MEMORY_RECORDS = 1_000_000  # ids kept by a memory store (~150 bytes each); the oldest go first


class OwnerStore(Protocol):
    """Where ownership records live; raises ``StoreError`` when it cannot answer."""

    async def claim_owner(self, key: str, value: str, ttl_s: int) -> bool:
        """Record ``value`` under ``key`` unless a record is there; True when ``key`` now holds ``value``."""
        ...

    async def owner_of(self, key: str) -> str | None: ...

    async def forget_owner(self, key: str) -> None: ...


class MemoryOwners:
    """``OwnerStore`` in this process: the memory quota store's equivalent of the Redis keys."""

    def __init__(self, limit: int = MAX_MEMORY_RECORDS) -> None:
        self._records: Lru[str, tuple[str, float]] = Lru(limit)

    async def claim_owner(self, key: str, value: str, ttl_s: int) -> bool:
        now = time.monotonic()
        held = self._records.peek(key)
        if held is not None and held[1] > now:
            return held[0] == value
        self._records.put(key, (value, now + ttl_s))
        return True

    async def owner_of(self, key: str) -> str | None:
        held = self._records.peek(key)
        if held is None or held[1] <= time.monotonic():
            return None
        return held[0]

    async def forget_owner(self, key: str) -> None:
        self._records.pop(key)


def owner_store(quota_store: object | None) -> OwnerStore:
    """The quota store when it keeps ownership records (Redis), else a ``MemoryOwners``."""
    if quota_store is not None and callable(getattr(quota_store, "claim_owner", None)):
        return quota_store  # type: ignore[return-value]
    return MemoryOwners()


class Owners:
    """Claims and checks ids of one kind (``response``, ``conversation``) for (subject, model)."""

    def __init__(self, store: OwnerStore) -> None:
        self.store = store

    @staticmethod
    def key(kind: str, rid: str) -> str:
        return f"{kind}:{key_part(rid)}"

    async def claim(self, kind: str, rid: str, subject: str, model: str, ttl_s: int) -> bool:
        """Record ``rid`` as ``subject``'s; False (logged) when another holds it or the store failed."""
        value = orjson.dumps([subject, model]).decode()
        try:
            held = await self.store.claim_owner(self.key(kind, rid), value, max(1, int(ttl_s)))
        except StoreError as exc:
            log.warning("could not record the owner of %s %s: %s (it will be unknown: 404)", kind, rid[:64], exc)
            return False
        if not held:
            log.warning("upstream reused %s id %s of another subject; the id stays with its first owner",
                        kind, rid[:64])
        return held

    async def owner(self, kind: str, rid: str) -> tuple[str, str] | None:
        """(subject, model) that created ``rid``, or None; 503 when the store cannot tell."""
        try:
            text = await self.store.owner_of(self.key(kind, rid))
        except StoreError as exc:
            raise Unavailable("ownership store unavailable") from exc
        if text is None:
            return None
        try:
            subject, model = orjson.loads(text)
        except (orjson.JSONDecodeError, ValueError, TypeError):
            return None
        if not isinstance(subject, str) or not isinstance(model, str):
            return None
        return subject, model

    async def forget(self, kind: str, rid: str) -> None:
        try:
            await self.store.forget_owner(self.key(kind, rid))
        except StoreError as exc:
            log.warning("could not forget %s %s: %s (it expires with its TTL)", kind, rid[:64], exc)
