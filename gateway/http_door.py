"""The HTTP door: a parsed request in, the gateway's answer out.

In: ``gateway.http_connection`` parses each request into an ``HttpRequest``
(``gateway.http_request``), the transport-neutral ``gateway.request.Request``.

Out: ``HttpDoor.answer`` runs the gateway (``Gateway.run``) and hands the
connection what it answered: a whole body, a stream relayed chunk by chunk, or
the JSON error shape, the one place a ``GatewayError`` becomes an answer; then
``Gateway.finish`` runs the request's cleanups, metrics and audit line, on
every exit path. A whole answer is framed before ``finish`` and written after
it, so its audit line and metrics exist by the time the client has it; a
stream's chunks are written as they come and its end after ``finish``, for the
same reason, and so that a client's next request on the connection, sent as
soon as it sees the end, never waits behind the last one's bookkeeping.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
from typing import TYPE_CHECKING, AsyncIterator, Callable

from .errors import GatewayError, InternalError
from .errors import error_body as error_body  # re-exported: the server's own refusals use it
from .http_request import HttpRequest

if TYPE_CHECKING:
    from .app import Gateway
    from .http_writer import AnswerWriter
    from .pipeline import BackendResponse, RequestContext

log = logging.getLogger("maas.gateway")

JSON = ("Content-Type", "application/json")
SET_BY_GATEWAY = frozenset({"x-request-id", "content-type"})  # never taken from a backend's headers
Answer = tuple[int, list[tuple[str, str]], bytes]


class HttpDoor:
    """Answers the public port's requests: one ``answer`` call per request, in the connection's order."""

    __slots__ = ("gateway",)

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def answer(self, request: HttpRequest, connection: AnswerWriter) -> None:
        gateway = self.gateway
        ctx = gateway.begin(request)
        # ``finish`` runs on every exit path, but after the try, not in a ``finally``: natively compiled
        # (gateway/native.py), a ``finally`` that awaits re-raises whatever exception another request was
        # handling meanwhile, not its own. What ends the request early is kept here and raised after it.
        stopped: BaseException | None = None
        framed: list[bytes] | None = None
        ended = False  # a stream relayed whole: its end is written after finish
        try:
            framed, ended = await self._answer(ctx, request, connection)
        except BaseException as exc:  # cancelled, or the client went away (status 499): nothing is sent
            stopped = exc
        await gateway.finish(ctx)
        if stopped is not None:
            raise stopped
        if framed is not None:
            connection.write(framed)
        elif ended:
            connection.end_stream()

    async def _answer(self, ctx: RequestContext, request: HttpRequest,
                      connection: AnswerWriter) -> tuple[list[bytes] | None, bool]:
        """(a whole answer's bytes, or None; whether a stream was relayed whole). Raises only when nothing
        more can be sent: cancelled, or the client gone."""
        try:
            response = await self.gateway.run(ctx)
            if response.stream is None:
                return connection.frame(request, *whole(ctx, response)), False
            return None, await relay(connection, request, ctx, response)
        except GatewayError as exc:
            return connection.frame(request, *error_answer(ctx, exc)), False
        except asyncio.CancelledError:
            ctx.status = 499  # client went away; nothing is sent
            raise
        except ConnectionError:
            ctx.status = 499
            raise
        except Exception:
            log.exception("unhandled error (request %s)", ctx.request_id)
            return connection.frame(request, *error_answer(ctx, InternalError("internal error"))), False

    def refusal(self, error: GatewayError) -> Answer:
        """The answer to a request the connection refused before it was one (bad framing, a head too large
        or too slow): no request id was chosen yet, so a fresh one."""
        rid = os.urandom(12).hex()
        return error.status, [JSON, ("X-Request-ID", rid)], error_body(error.type, error.message, rid)


def _headers(ctx: RequestContext, response: BackendResponse) -> list[tuple[str, str]]:
    """The backend's headers (less the ones the gateway sets), then the gateway's."""
    added = ctx.response_headers  # the gateway's own headers replace a backend's of the same name
    replaced = _replaced_by(tuple(added)) if added else SET_BY_GATEWAY
    headers = [(k, v) for k, v in response.headers if k.lower() not in replaced]
    headers.extend(added.items())
    headers.append(("X-Request-ID", ctx.request_id))
    headers.append(("Content-Type", response.content_type))
    return headers


@functools.lru_cache(maxsize=64)
def _replaced_by(names: tuple[str, ...]) -> frozenset[str]:
    """The backend headers the gateway's own (``names``: a few fixed sets, the quota's RateLimit-*) replace."""
    return SET_BY_GATEWAY.union(name.lower() for name in names)


def whole(ctx: RequestContext, response: BackendResponse) -> Answer:
    payload = response.body or b""
    ctx.status, ctx.bytes_out = response.status, len(payload)
    return response.status, _headers(ctx, response), payload


async def relay(connection: AnswerWriter, request: HttpRequest, ctx: RequestContext,
                response: BackendResponse) -> bool:
    """Write a streamed answer's chunks as they come; the head leaves with the first chunk when it is here.
    True when the stream was relayed whole: the caller then writes its end (``end_stream``); False when it
    was cut.

    An upstream's stream (``push``) is written on from the upstream connection's own callback, chunk by
    chunk, with no task woken per chunk; this coroutine then only waits for the end. Whenever the client
    has not taken what was written (which also starts its write deadline, ``connection_limits``) chunks
    queue instead and ``send_chunk`` waits here: a client that stops reading is waited on, never written
    past, and dropped at ``client_write_timeout_s``.
    """
    stream: AsyncIterator[bytes] = response.stream
    connection.start_stream(request, response.status, _headers(ctx, response))
    ctx.status = response.status
    push = getattr(stream, "push", None)  # an upstream's stream can be written on from its connection's callback

    def pushed(data: bytes) -> bool:
        ctx.bytes_out += len(data)
        return connection.push_chunk(data)

    stopped: BaseException | None = None  # (raised after the release: not from a ``finally``, see ``answer``)
    relayed = False
    try:
        relayed = await _relay_chunks(connection, ctx, stream, pushed, push)
    except BaseException as exc:
        stopped = exc
    if response.release is not None:
        result = response.release()
        if inspect.isawaitable(result):
            await result
    if stopped is not None:
        raise stopped
    return relayed


async def _relay_chunks(connection: AnswerWriter, ctx: RequestContext, stream: AsyncIterator[bytes],
                        pushed: Callable[[bytes], bool], push: Callable[[Callable[[bytes], bool]], None] | None) -> bool:
    sent = 0
    try:
        ready = getattr(stream, "ready", None)
        if ready is None or not ready():  # the first chunk may take a while (a model's first token): head now
            connection.flush_head()
        if push is not None:
            push(pushed)
        try:
            async for chunk in stream:  # pushed: wakes only for the end, or for what queued while the client lagged
                if chunk:
                    await connection.send_chunk(chunk)
                    sent += len(chunk)
        finally:
            ctx.bytes_out += sent
        return True
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as exc:  # the answer has started: the only honest signal left is to cut the stream
        log.warning("stream to client cut (request %s): %s", ctx.request_id, exc)
        connection.cut_stream()
        return False


def _raw_path(ctx: RequestContext) -> str:
    """The path as received, for a request refused before (or by) path normalisation; "" when it has none."""
    try:
        return ctx.request.path
    except GatewayError:
        return ""


def error_answer(ctx: RequestContext, exc: GatewayError) -> Answer:
    """The JSON error shape for ``exc``, with its headers and the request id."""
    ctx.status = exc.status
    payload = error_body(exc.type, exc.message, ctx.request_id, ctx.path or _raw_path(ctx))
    ctx.bytes_out = len(payload)
    headers = {**ctx.response_headers, **exc.headers, "Content-Type": "application/json",
               "X-Request-ID": ctx.request_id}
    return exc.status, list(headers.items()), payload
