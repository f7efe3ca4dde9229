"""The request of the HTTP door: ``gateway.request.Request`` over one parsed HTTP/1.1 head and its body.

Built once per request by the connection (``gateway.http_connection``) from
what llhttp parsed; nothing is copied again after that. The target is split
into path and query only when a stage first asks, so a refusal that comes
earlier (an unknown key) never pays for it. A TLS connection's verified client
certificate is parsed once per connection (``client_certificate``), not per request.
"""

from __future__ import annotations

import ssl

from .http_body import IncomingBody
from .request import CertificateSubject, Headers, Refine, subject_of_certificate
from .stages.path import split_target


class HttpRequest:
    """One request as the stages see it; ``body`` is fed by the connection while the stages run."""

    __slots__ = ("method", "target", "headers", "peer", "secure", "client_subject", "body", "keep_alive",
                 "http_1_0", "has_body", "declared_length", "_path", "_query")

    def __init__(self, method: str, target: str, headers: Headers, body: IncomingBody, *, peer: str,
                 secure: bool, client_subject: CertificateSubject | None, keep_alive: bool, http_1_0: bool) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.peer = peer
        self.secure = secure
        self.client_subject = client_subject
        self.keep_alive = keep_alive  # what the client asked for (HTTP/1.0 defaults to close)
        self.http_1_0 = http_1_0  # no chunked answers: a stream is delimited by closing the connection
        length = headers.get("Content-Length")
        self.declared_length: int | None = int(length) if length is not None else None  # llhttp checked it
        self.has_body = bool(self.declared_length) or "Transfer-Encoding" in headers
        self._path: str | None = None
        self._query = ""

    @property
    def path(self) -> str:
        path = self._path
        if path is None:  # absolute-form targets keep only their path; a target that is no path is refused here
            path, self._query = split_target(self.target)
            self._path = path
        return path

    @property
    def query(self) -> str:
        if self._path is None:
            self.path  # noqa: B018  # splits the target
        return self._query

    @property
    def head_only(self) -> bool:
        """A HEAD request: its answer has headers and no body."""
        return self.method == "HEAD"

    async def read_body(self, limit: int, timeout_s: float, refine: Refine | None = None) -> bytes:
        return await self.body.read(limit, timeout_s, self.declared_length, refine)


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
