"""A request body as it arrives: fed by the connection's parser, read whole by the body stage.

The stages read a body whole (a model's input is checked as one document), so
the one question is how much to hold, and for how long. While nobody reads,
at most ``UNREAD_HIGH`` bytes are held before the connection stops reading the
socket (a pipelined request's body waiting behind another answer, a body sent
to a request that is refused before it is read). While the body stage reads,
everything up to its limit is taken as fast as the client sends, and a byte
past the limit ends the read with 413 at once: the rest is never buffered.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from .errors import GatewayError, InvalidRequest, PayloadTooLarge, RequestTimeout
from .request import Refine

UNREAD_HIGH = 262_144  # bytes held for a body nobody is reading yet, before the socket is paused


class BodyFlow(Protocol):
    """What a body needs of its connection (``gateway.http_connection``)."""

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...

    def send_continue(self) -> None: ...


class IncomingBody:
    """The body of one request, complete once the parser saw its end."""

    __slots__ = ("_flow", "_chunks", "size", "complete", "_waiter", "_lost", "_continue", "_discard")

    def __init__(self, flow: BodyFlow, *, expect_continue: bool) -> None:
        self._flow = flow
        self._chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self._waiter: asyncio.Future[None] | None = None  # set while the body stage waits for bytes
        self._lost: GatewayError | None = None
        self._continue = expect_continue  # the client waits for "100 Continue" before it sends the body
        self._discard = False

    # -- the connection's side ---------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._discard:
            return
        self._chunks.append(data)
        self.size += len(data)
        self._continue = False  # the client sent without waiting: no interim answer is due any more
        if self._waiter is not None:
            self._wake()
        elif self.size > UNREAD_HIGH:
            self._flow.pause_body()

    def discard(self) -> None:
        """The request was answered without this body: what still arrives is dropped as it comes."""
        self._discard = True
        self._chunks = []

    def finish(self) -> None:
        self.complete = True
        self._continue = False
        self._wake()

    def lost(self, error: GatewayError | None = None) -> None:
        """The body will not end: the connection closed, or (``error``) its framing broke mid-way."""
        self._lost = error or InvalidRequest("request body shorter than its Content-Length")
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the body stage's side ---------------------------------------------------------

    async def read(self, limit: int, timeout_s: float, declared: int | None, refine: Refine | None) -> bytes:
        """The whole body, or ``PayloadTooLarge`` / ``InvalidRequest`` / ``RequestTimeout``."""
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        if not self.complete or refine is not None:
            limit = await self._arrive(limit, timeout_s, declared, refine)
        if self.size > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = [data]
        return data

    async def _arrive(self, limit: int, timeout_s: float, declared: int | None, refine: Refine | None) -> int:
        """Wait for the whole body (the limit, narrowed by ``refine`` once the first bytes tell one)."""
        flow = self._flow
        if self._continue:
            self._continue = False
            flow.send_continue()
        flow.resume_body()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    if refine is not None and self._chunks:
                        narrowed = refine(b"".join(self._chunks))
                        if narrowed is not None:
                            limit, refine = min(limit, narrowed), None
                            if declared is not None and declared > limit:
                                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                    if self.size > limit:
                        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                    if self.complete:
                        return limit
                    if self._lost is not None:
                        raise self._lost
                    self._waiter = waiter = loop.create_future()
                    try:
                        await waiter
                    finally:
                        self._waiter = None
        except TimeoutError:
            raise RequestTimeout("request body not received in time") from None
