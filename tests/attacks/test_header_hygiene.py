"""Attacks on what the upstream sees: smuggled credentials, forged identity, hop-by-hop tricks.

The upstream trusts ``X-Maas-Subject`` because only the gateway may set it, so
every client-sent copy must vanish, in any spelling, however many times sent.
"""

from __future__ import annotations

import pytest
from tests.harness import start_upstream
from tests.http_helpers import make_ctx
from tests.upstreams import running

from gateway.pipeline import RouteKind

INFER = "/v2/models/digits/infer"

HOSTILE = [
    ("Authorization", "Bearer client-jwt-must-not-leak"),
    ("X-API-Key", "mk_client_key_must_not_leak"),
    ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
    ("X-Maas-Subject", "admin"),
    ("x-MAAS-subject", "root"),
    ("X-Maas-Roles", "admin,superuser"),
    ("X-Maas-Clearance", "9"),
    ("X-Forwarded-For", "10.0.0.1"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "internal.example"),
    ("Forwarded", "for=10.0.0.1;proto=https"),
    ("X-Request-ID", "forged-id"),
    ("Host", "evil.example"),
    ("Connection", "keep-alive, X-Secret-Hop, x-other-hop"),
    ("X-Secret-Hop", "only for the first hop"),
    ("X-Other-Hop", "also hop-by-hop"),
    ("Keep-Alive", "timeout=5"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Late"),
    ("Upgrade", "websocket"),
    ("Expect", "100-continue"),
]
NEVER_FORWARDED = {"authorization", "x-api-key", "proxy-authorization", "x-maas-clearance", "x-forwarded-host",
                   "forwarded", "connection", "x-secret-hop", "x-other-hop", "keep-alive", "proxy-connection", "te",
                   "trailer", "upgrade", "expect"}


@pytest.fixture
async def upstream():
    up = await start_upstream()
    yield up
    await up.stop()


async def _forward(upstream, ctx, **options):
    async with running([upstream.url], **options) as (backend, _):
        await backend.handle(ctx)
    return upstream.seen[-1]


async def test_credentials_forged_identity_and_hop_by_hop_headers_never_reach_the_upstream(upstream) -> None:
    ctx = make_ctx(RouteKind.V2_INFER, INFER, json={"inputs": []},
                   headers=HOSTILE + [("Content-Type", "application/json"), ("Cookie", "theme=dark"),
                                      ("X-Client-Trace", "t-1")])
    seen = await _forward(upstream, ctx)
    names = [name.lower() for name, _ in seen.all_headers]
    for name in NEVER_FORWARDED:
        assert name not in names, name
    values = " ".join(v for _, v in seen.all_headers)
    assert "client-jwt-must-not-leak" not in values and "mk_client_key_must_not_leak" not in values
    # exactly one of each identity / forwarding header, with the gateway's values
    for name, value in [("x-maas-subject", "alice"), ("x-maas-roles", "analyst"), ("x-request-id", "req-1"),
                        ("x-forwarded-for", "203.0.113.7"), ("x-forwarded-proto", "http")]:
        assert [v for n, v in seen.all_headers if n.lower() == name] == [value], name
    assert seen.headers["Host"].startswith("127.0.0.1:")  # the upstream's own host, never the client's
    # ordinary end-to-end headers pass
    assert seen.headers["Cookie"] == "theme=dark" and seen.headers["X-Client-Trace"] == "t-1"


async def test_https_client_connection_is_reported_as_https(upstream) -> None:
    seen = await _forward(upstream, make_ctx(RouteKind.V2_INFER, INFER, json={}, secure=True,
                                             headers=[("X-Forwarded-Proto", "http")]))
    assert [v for n, v in seen.all_headers if n.lower() == "x-forwarded-proto"] == ["https"]


async def test_roles_come_from_the_policy_decision_when_present(upstream) -> None:
    seen = await _forward(upstream, make_ctx(RouteKind.V2_INFER, INFER, json={}, roles=("data-scientist",),
                                             decision_roles=("data-scientist", "analyst")))
    assert seen.headers["X-Maas-Roles"] == "data-scientist,analyst"
    assert seen.headers["X-Maas-Subject"] == "alice"


async def test_configured_headers_win_over_client_copies(upstream) -> None:
    ctx = make_ctx(RouteKind.V2_INFER, INFER, json={},
                   headers=[("X-Tenant", "evil"), ("x-tenant", "evil2"), ("Authorization", "Bearer client")])
    seen = await _forward(upstream, ctx, headers={"Authorization": "Bearer upstream-token", "X-Tenant": "t1"})
    assert [v for n, v in seen.all_headers if n.lower() == "x-tenant"] == ["t1"]
    assert [v for n, v in seen.all_headers if n.lower() == "authorization"] == ["Bearer upstream-token"]


async def test_connection_header_cannot_strip_gateway_identity(upstream) -> None:
    # naming the gateway's own headers as hop-by-hop must not remove what the gateway adds
    ctx = make_ctx(RouteKind.V2_INFER, INFER, json={},
                   headers=[("Connection", "X-Maas-Subject, X-Request-ID, X-Forwarded-For")])
    seen = await _forward(upstream, ctx)
    assert seen.headers["X-Maas-Subject"] == "alice"
    assert seen.headers["X-Request-ID"] == "req-1"
    assert seen.headers["X-Forwarded-For"] == "203.0.113.7"


async def test_openai_client_headers_are_scrubbed_too(upstream) -> None:
    ctx = make_ctx(RouteKind.OPENAI, "/v1/chat/completions", model="chat",
                   json={"model": "chat", "messages": []},
                   headers=[("Authorization", "Bearer sk-client"), ("X-Maas-Subject", "admin"),
                            ("OpenAI-Organization", "org-1")])
    seen = await _forward(upstream, ctx, protocol="openai", headers={"Authorization": "Bearer vllm-key"})
    assert seen.headers["Authorization"] == "Bearer vllm-key"
    assert seen.headers["X-Maas-Subject"] == "alice"
    assert seen.headers["OpenAI-Organization"] == "org-1"
