"""Header hygiene between the client, the gateway and the upstream.

What an upstream sees must be decided by the gateway, not by the caller: the
client's credentials stay here (the upstream trusts the gateway, not the
client's token), hop-by-hop headers belong to one connection only, and every
``X-Maas-*`` / ``X-Forwarded-*`` header the client sent is a forgery until
proven otherwise, so it is dropped and the gateway's own value is added.
Headers that make servers (or the frameworks in front of them) see another
path, method or client are dropped too: the gateway authorised this path, this
method, from this address, and the upstream must act on exactly that.
The drop set is computed once per backend; per request we only walk the
headers the client actually sent.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

# RFC 9110 section 7.6.1 plus the de-facto Proxy-Connection.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
})

# Never forwarded: credentials meant for the gateway, headers the client
# library recomputes (Host, Content-Length) and Expect (the gateway has already
# read the body; forwarding ``100-continue`` would make the upstream hop wait).
# Accept-Encoding too: answers must reach the harden stage as plain JSON, or a
# client asking for gzip would get an un-hardened score vector past it.
REQUEST_DROP = HOP_BY_HOP | frozenset({
    "authorization", "proxy-authorization", "x-api-key", "host", "content-length", "expect", "accept-encoding",
    "forwarded", "x-request-id",
})
# Another path (IIS/Symfony/Laminas rewrites), another method (method-override middlewares), another client
# (IP allow-lists and rate limits behind the gateway). X-Forwarded-Host/-Port go with the x-forwarded- prefix.
OVERRIDE_HEADERS = frozenset({
    "x-original-url", "x-rewrite-url",
    "x-http-method", "x-http-method-override", "x-method-override",
    "x-real-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip", "x-cluster-client-ip",
    "forwarded", "x-forwarded-host", "x-forwarded-port",
})
REQUEST_DROP = REQUEST_DROP | OVERRIDE_HEADERS
REQUEST_DROP_PREFIXES = ("x-maas-", "x-forwarded-")

# Content-Type travels in BackendResponse.content_type; the server sets its own
# length/encoding framing and X-Request-ID.
RESPONSE_DROP = HOP_BY_HOP | frozenset({"content-length", "content-type", "x-request-id"})

_PLAIN_CONNECTION = ("keep-alive", "close")  # Connection values that name no other header

_ADDED = ("X-Request-ID", "X-Forwarded-For", "X-Forwarded-Proto", "X-Maas-Subject", "X-Maas-Roles")


def connection_tokens(value: str) -> frozenset[str]:
    """Header names listed in a ``Connection`` header (they are hop-by-hop too)."""
    return frozenset(t.strip().lower() for t in value.split(",") if t.strip())


class RequestHeaders:
    """Builds the header list sent upstream for one backend."""

    __slots__ = ("_drop", "_configured", "_added_mask")

    def __init__(self, configured: Mapping[str, str]) -> None:
        names = {k.lower() for k in configured}
        self._drop = REQUEST_DROP | names
        self._configured = tuple(configured.items())
        # a configured header with the same name as one the gateway adds wins
        self._added_mask = tuple(h.lower() not in names for h in _ADDED)

    def build(
        self,
        incoming: Mapping[str, str],
        *,
        request_id: str,
        client_ip: str,
        secure: bool,
        subject: str | None,
        roles: Iterable[str],
    ) -> list[tuple[str, str]]:
        drop = self._drop
        named = incoming.get("Connection")
        if named:
            drop = drop | connection_tokens(named)
        out = [
            (k, v)
            for k, v in incoming.items()
            if (low := k.lower()) not in drop and not low.startswith(REQUEST_DROP_PREFIXES)
        ]
        added = (
            request_id,
            client_ip,
            "https" if secure else "http",
            subject,
            ",".join(roles) if subject is not None else None,
        )
        for name, value, keep in zip(_ADDED, added, self._added_mask):
            if keep and value is not None:
                out.append((name, value))
        out.extend(self._configured)
        return out


def response_headers(upstream: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's response headers minus framing and hop-by-hop ones, in order.

    A list of pairs, so repeated headers such as ``Set-Cookie`` survive.
    """
    drop = RESPONSE_DROP
    for k, v in upstream:
        if k.lower() == "connection" and v.lower() not in _PLAIN_CONNECTION:  # names more hop-by-hop headers
            drop = drop | connection_tokens(v)
    return [(k, v) for k, v in upstream if k.lower() not in drop]
