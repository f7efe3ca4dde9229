"""The HTTP door: aiohttp's request in, the gateway's answer out. The only module that sees ``web.Request``.

In: ``HttpRequest`` is the transport-neutral ``gateway.request.Request`` over
one aiohttp request, built per request without copying anything (headers are
aiohttp's own read-only mapping; the target is split only when a stage asks).
A TLS connection's verified client certificate is parsed once, from the
certificate itself, into a ``CertificateSubject``.

Out: ``HttpDoor.handle`` runs the gateway (``Gateway.run``) and writes what it
answered: a whole body, a stream relayed chunk by chunk, or the JSON error
shape, the one place a ``GatewayError`` becomes a response; then
``Gateway.finish`` runs the request's cleanups, metrics and audit line, on
every exit path.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from .errors import GatewayError, InternalError, InvalidRequest, PayloadTooLarge, RequestTimeout
from .request import CertificateSubject, subject_of_certificate
from .stages.path import split_target

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from .app import Gateway
    from .pipeline import BackendResponse, RequestContext

log = logging.getLogger("maas.gateway")

READ_CHUNK = 65_536  # bytes per read from the socket buffer
JSON_HEADERS = {"Content-Type": "application/json"}
SET_BY_GATEWAY = frozenset({"x-request-id", "content-type"})  # never taken from a backend's headers


def error_body(error_type: str, message: str, rid: str) -> bytes:
    return orjson.dumps({"error": {"type": error_type, "message": message, "request_id": rid}})


# -- in ------------------------------------------------------------------------------


class HttpRequest:
    """``gateway.request.Request`` over an aiohttp request."""

    __slots__ = ("_request", "method", "headers", "peer", "secure", "client_subject", "_path", "_query")

    def __init__(self, request: web.BaseRequest, *, secure: bool = False,
                 client_subject: CertificateSubject | None = None) -> None:
        self._request = request
        self.method: str = request.method
        self.headers: CIMultiDictProxy[str] = request.headers
        self.peer: str = request.remote or ""
        self.secure = secure
        self.client_subject = client_subject
        self._path: str | None = None
        self._query = ""

    @property
    def path(self) -> str:
        path = self._path
        if path is None:  # absolute-form targets keep only their path; a target that is no path is refused here
            path, self._query = split_target(self._request.raw_path)
            self._path = path
        return path

    @property
    def query(self) -> str:
        if self._path is None:
            self.path  # noqa: B018  # splits the target
        return self._query

    @property
    def has_body(self) -> bool:
        return self._request.body_exists

    @property
    def declared_length(self) -> int | None:
        return self._request.content_length

    async def read_body(self, limit: int, timeout_s: float) -> bytes:
        request = self._request
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        content = request.content
        if content.is_eof() and content.exception() is None:
            # already all received (the usual small body): take it without the timeout machinery (~5 us/request)
            data = content.read_nowait(-1)
            if declared is not None:
                if len(data) != declared:
                    raise InvalidRequest("request body shorter than its Content-Length")
            elif len(data) > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            return data
        try:
            async with asyncio.timeout(timeout_s):  # no extra Task per request, unlike wait_for on 3.11
                if declared is not None:  # bytes past it are parsed as the next request (and refused there)
                    try:
                        return await content.readexactly(declared)
                    except asyncio.IncompleteReadError:
                        raise InvalidRequest("request body shorter than its Content-Length") from None
                chunks: list[bytes] = []
                total = 0
                while True:
                    chunk = await content.read(READ_CHUNK)
                    if not chunk:
                        return b"".join(chunks)
                    total += len(chunk)
                    if total > limit:
                        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestTimeout("request body not received in time") from None


def client_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> CertificateSubject | None:
    """The subject of the client certificate the handshake verified; None when the client sent none.

    A server that does not ask for client certificates (``CERT_NONE``) never
    gets one; one that does refuses the handshake for a certificate that does
    not verify, so a certificate here is a verified one.
    """
    if ssl_object.context.verify_mode == ssl.CERT_NONE:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return subject_of_certificate(der) if der else None


# -- out -----------------------------------------------------------------------------


class HttpDoor:
    """The aiohttp handler of the public port: one ``handle`` call per request."""

    __slots__ = ("gateway", "_tls")

    def __init__(self, gateway: Gateway, *, tls: bool) -> None:
        self.gateway = gateway
        self._tls = tls  # a plain-HTTP listener has no certificate to look for

    def request(self, request: web.BaseRequest) -> HttpRequest:
        if self._tls:
            transport = request.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
            if ssl_object is not None:
                return HttpRequest(request, secure=True, client_subject=client_certificate(ssl_object))
        return HttpRequest(request)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        gateway = self.gateway
        ctx = gateway.begin(self.request(request))
        try:
            return await send(request, ctx, await gateway.run(ctx))
        except GatewayError as exc:
            return error_response(ctx, exc)
        except asyncio.CancelledError:
            ctx.status = 499  # client went away; nothing is sent
            raise
        except (ConnectionResetError, BrokenPipeError):
            ctx.status = 499
            raise
        except Exception:
            log.exception("unhandled error (request %s)", ctx.request_id)
            return error_response(ctx, InternalError("internal error"))
        finally:
            await gateway.finish(ctx)


async def send(request: web.BaseRequest, ctx: RequestContext, response: BackendResponse) -> web.StreamResponse:
    """Write the gateway's answer: the backend's headers (less the ones the gateway sets) and body or stream."""
    added = ctx.response_headers  # the gateway's own headers replace a backend's of the same name
    replaced = SET_BY_GATEWAY.union(name.lower() for name in added) if added else SET_BY_GATEWAY
    headers = [(k, v) for k, v in response.headers if k.lower() not in replaced]
    headers.extend(added.items())
    headers.append(("X-Request-ID", ctx.request_id))
    headers.append(("Content-Type", response.content_type))
    if response.stream is None:
        payload = response.body or b""
        ctx.status, ctx.bytes_out = response.status, len(payload)
        return web.Response(status=response.status, body=payload, headers=headers)
    out = web.StreamResponse(status=response.status, headers=headers)
    ctx.status = response.status
    try:
        await out.prepare(request)
        async for chunk in response.stream:
            if chunk:
                await out.write(chunk)
                ctx.bytes_out += len(chunk)
        await out.write_eof()
    except (ConnectionResetError, BrokenPipeError, asyncio.CancelledError):
        raise
    except Exception as exc:  # the answer has started: the only honest signal left is to cut the stream
        log.warning("stream to client cut (request %s): %s", ctx.request_id, exc)
        out.force_close()
    finally:
        if response.release is not None:
            result = response.release()
            if inspect.isawaitable(result):
                await result
    return out


def error_response(ctx: RequestContext, exc: GatewayError) -> web.Response:
    """The JSON error shape for ``exc``, with its headers and the request id."""
    ctx.status = exc.status
    payload = error_body(exc.type, exc.message, ctx.request_id)
    ctx.bytes_out = len(payload)
    headers = {**ctx.response_headers, **exc.headers, **JSON_HEADERS, "X-Request-ID": ctx.request_id}
    return web.Response(status=exc.status, body=payload, headers=headers)
