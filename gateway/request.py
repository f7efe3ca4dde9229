"""The request as every stage sees it: small, typed, read-only, and the same whatever door it came through.

A *door* is a listener that turns what its transport received into a
``Request`` (today one door: HTTP, ``gateway.http_connection`` and ``gateway.http_door``); the stages read
only this, never the transport's own object, so a second door (a gRPC
listener) runs the same stages. What a door must provide:

* ``method``, ``path`` (as received, not yet normalised: the path stage does
  that) and ``query`` (raw, forwarded as is);
* ``headers``: a read-only, case-insensitive mapping in which a name may repeat
  (``getall``): multidict's ``CIMultiDictProxy``;
* ``peer``: the address of whoever is on the other end of the connection;
* ``secure`` (the connection is TLS) and ``client_subject``: the subject of a
  client certificate the TLS handshake verified, parsed once from the
  certificate itself (``CertificateSubject``), None without one;
* the body: ``has_body``, ``declared_length`` (what the client announced, if
  anything) and ``read_body(limit, timeout_s)``, which returns the whole body
  or raises ``PayloadTooLarge`` / ``InvalidRequest`` / ``RequestTimeout``,
  never buffering more than ``limit`` bytes.

``BufferedRequest`` is a ``Request`` whose body is already in memory: for doors
that receive whole messages, and for tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from .errors import PayloadTooLarge

if TYPE_CHECKING:
    from cryptography import x509


# Read-only and case-insensitive; a name may repeat (``getall``). multidict is no transport's: the HTTP door builds
# one per request from what llhttp parsed (in C, one call), another door wraps what it received.
Headers = CIMultiDictProxy[str]
# Given the first bytes of a body still arriving: a tighter size limit once they tell one, else None.
Refine = Callable[[bytes], "int | None"]


@dataclass(frozen=True, slots=True)
class CertificateSubject:
    """A verified client certificate's subject as parsed data: (attribute, value) pairs in certificate order.

    Names are RFC 4514's short names (``CN``, ``O``, ``OU``, ``C``, ...) or the
    dotted OID of any other attribute. Values are verbatim and are never parsed
    again: a CN of ``O=x,CN=svc`` is that one string, not a distinguished name.
    """

    attributes: tuple[tuple[str, str], ...]

    def values(self, name: str) -> tuple[str, ...]:
        return tuple(value for key, value in self.attributes if key == name)

    @property
    def common_name(self) -> str | None:
        """The CN when the subject has exactly one (in any RDN, multi-valued ones included); else None."""
        names = self.values("CN")
        return names[0] if len(names) == 1 else None


NO_SUBJECT = CertificateSubject(())


def subject_of_name(name: x509.Name) -> CertificateSubject:
    """The ``CertificateSubject`` of a cryptography ``x509.Name`` (every attribute of every RDN, in order)."""
    pairs: list[tuple[str, str]] = []
    for rdn in name.rdns:
        for attribute in rdn:
            value = attribute.value
            pairs.append((attribute.rfc4514_attribute_name,
                          value if isinstance(value, str) else "#" + bytes(value).hex()))
    return CertificateSubject(tuple(pairs))


@functools.lru_cache(maxsize=1024)  # per certificate, not per request: a client reconnects with the same one
def subject_of_certificate(der: bytes) -> CertificateSubject:
    """The subject of a DER-encoded certificate; an empty subject (no CN: refused) if it cannot be parsed."""
    from cryptography import x509

    try:
        return subject_of_name(x509.load_der_x509_certificate(der).subject)
    except ValueError:  # OpenSSL accepted what cryptography will not read: fail closed
        return NO_SUBJECT


class Request(Protocol):
    """What a door hands the stages. Every member is read-only."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str:
        """The path as received (may raise ``InvalidRequest`` when the door's target is no path)."""
        ...

    @property
    def query(self) -> str: ...

    @property
    def headers(self) -> Headers: ...

    @property
    def peer(self) -> str: ...

    @property
    def secure(self) -> bool: ...

    @property
    def client_subject(self) -> CertificateSubject | None: ...

    @property
    def has_body(self) -> bool: ...

    @property
    def declared_length(self) -> int | None: ...

    async def read_body(self, limit: int, timeout_s: float, refine: Refine | None = None) -> bytes:
        """The whole body; ``refine(first bytes)`` may answer a tighter limit once it can tell (else None)."""
        ...


class BufferedRequest:
    """A ``Request`` whose body is already whole in memory."""

    __slots__ = ("method", "path", "query", "headers", "peer", "secure", "client_subject", "declared_length", "_body")

    def __init__(self, method: str = "GET", path: str = "/", *, query: str = "",
                 headers: Mapping[str, str] | Iterable[tuple[str, str]] = (), peer: str = "127.0.0.1",
                 secure: bool = False, client_subject: CertificateSubject | None = None, body: bytes = b"",
                 declared_length: int | None = None) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers: Headers = CIMultiDictProxy(CIMultiDict(headers))
        self.peer = peer
        self.secure = secure
        self.client_subject = client_subject
        self.declared_length = declared_length
        self._body = body

    @property
    def has_body(self) -> bool:
        return bool(self._body) or bool(self.declared_length)

    async def read_body(self, limit: int, timeout_s: float, refine: Refine | None = None) -> bytes:
        narrowed = refine(self._body) if refine is not None else None
        if narrowed is not None:
            limit = min(limit, narrowed)
        if len(self._body) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
        return self._body
