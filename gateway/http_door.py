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
from typing import TYPE_CHECKING, AsyncIterator

from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.http_writer import StreamWriter

from .errors import GatewayError, InternalError, InvalidRequest, PayloadTooLarge, RequestTimeout
from .errors import error_body as error_body  # re-exported: the server's own refusals use it
from .request import CertificateSubject, Refine, subject_of_certificate
from .stages.path import split_target

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from .app import Gateway
    from .pipeline import BackendResponse, RequestContext

log = logging.getLogger("maas.gateway")

READ_CHUNK = 65_536  # bytes per read from the socket buffer
JSON_HEADERS = {"Content-Type": "application/json"}
SET_BY_GATEWAY = frozenset({"x-request-id", "content-type"})  # never taken from a backend's headers


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

    async def read_body(self, limit: int, timeout_s: float, refine: Refine | None = None) -> bytes:
        request = self._request
        declared = request.content_length
        if declared is not None and declared > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        content = request.content
        if refine is not None:
            return await self._read_refined(limit, timeout_s, refine, declared)
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

    async def _read_refined(self, limit: int, timeout_s: float, refine: Refine | None, declared: int | None) -> bytes:
        """Read chunk by chunk, asking ``refine`` for a tighter limit from the first bytes (a multipart
        body's ``model`` field): an upload over its model's limit is cut off the moment it passes it."""
        content = self._request.content
        chunks: list[bytes] = []
        head = b""
        total = 0
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    chunk = await content.read(READ_CHUNK)
                    if not chunk:
                        if declared is not None and total != declared:
                            raise InvalidRequest("request body shorter than its Content-Length")
                        return b"".join(chunks)
                    total += len(chunk)
                    chunks.append(chunk)
                    if refine is not None:
                        head += chunk
                        narrowed = refine(head)
                        if narrowed is not None:
                            limit, refine = min(limit, narrowed), None
                            if declared is not None and declared > limit:
                                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                    if total > limit:
                        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
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
    out = _HeadWithFirstChunk(status=response.status, headers=headers)
    ctx.status = response.status
    try:
        await out.prepare(request)
        ready = getattr(response.stream, "ready", None)
        if ready is None or not ready():  # the first chunk may take a while (a model's first token): head now
            writer = out._payload_writer
            if writer is not None:
                writer.send_headers()
        await _relay(out, response.stream, ctx)
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


class _HeadWithFirstChunk(web.StreamResponse):
    """A streamed answer whose head waits for its first chunk when that chunk is already here.

    aiohttp sends a ``StreamResponse``'s head on ``prepare``; buffered (as aiohttp does for a whole
    ``Response``), head and first chunk leave in one write: one syscall and one client wake-up less on
    the way to the first token. ``send`` flushes the head at once when the first chunk is not here yet.
    """

    _send_headers_immediately = False


async def _relay(out: web.StreamResponse, stream: AsyncIterator[bytes], ctx: RequestContext) -> None:
    """Write ``stream``'s chunks to the client as they come, each in one transport write.

    The first chunk goes through aiohttp (it carries the buffered headers). After it, a chunked answer's
    chunks are framed here and handed to the transport directly: aiohttp's ``write`` costs four Python
    calls and a three-part join per chunk, and awaits ``drain`` only every 64 KiB. Here ``drain`` is
    awaited whenever the transport is paused (bytes the client has not taken), which is also what
    starts the client write deadline (``connection_limits``): a client that stops reading is waited on,
    never written past, and dropped at ``client_write_timeout_s``. Anything unusual (no chunking, a
    length, compression, aiohttp hooks or internals not where they were) takes aiohttp's own path.
    """
    async for chunk in stream:
        if chunk:
            await out.write(chunk)  # with the headers, in one write
            ctx.bytes_out += len(chunk)
            break
    else:
        return
    writer = getattr(out, "_payload_writer", None)
    protocol = getattr(writer, "_protocol", None)
    direct = (type(writer) is StreamWriter and writer.chunked and writer.length is None
              and writer._compress is None and writer._on_chunk_sent is None and writer.on_body_write is None
              and hasattr(protocol, "_paused"))
    if not direct:
        async for chunk in stream:
            if chunk:
                await out.write(chunk)
                ctx.bytes_out += len(chunk)
        return
    assert writer is not None and protocol is not None
    sent = 0
    try:
        async for chunk in stream:
            if not chunk:
                continue
            transport = protocol.transport
            if transport is None or transport.is_closing():
                raise ClientConnectionResetError("Cannot write to closing transport")
            framed = b"%x\r\n%b\r\n" % (len(chunk), chunk)
            transport.write(framed)
            writer.output_size += len(framed)
            sent += len(chunk)
            if protocol._paused:  # the client has not taken everything: wait for it (its write deadline runs)
                await writer.drain()
    finally:
        ctx.bytes_out += sent


def _raw_path(ctx: RequestContext) -> str:
    """The path as received, for a request refused before (or by) path normalisation; "" when it has none."""
    try:
        return ctx.request.path
    except GatewayError:
        return ""


def error_response(ctx: RequestContext, exc: GatewayError) -> web.Response:
    """The JSON error shape for ``exc``, with its headers and the request id."""
    ctx.status = exc.status
    payload = error_body(exc.type, exc.message, ctx.request_id, ctx.path or _raw_path(ctx))
    ctx.bytes_out = len(payload)
    headers = {**ctx.response_headers, **exc.headers, **JSON_HEADERS, "X-Request-ID": ctx.request_id}
    return web.Response(status=exc.status, body=payload, headers=headers)
