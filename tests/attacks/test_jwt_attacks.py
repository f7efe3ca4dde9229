"""Hostile bearer tokens against the authenticate stage: each one must be a 401, never a 500.

Real PyJWT tokens, real keys from ``cryptography``; the requests are aiohttp
requests handed to the stage exactly as the pipeline hands them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from multidict import CIMultiDict

from gateway.auth import AuthFailure
from gateway.config import AuthConfig, GatewayConfig, JwtConfig
from gateway.errors import InvalidRequest, Unauthenticated
from gateway.metrics import Metrics
from gateway.pipeline import RequestContext
from gateway.request import BufferedRequest
from gateway.services import Services
from gateway.stages import authenticate
from gateway.stages.framing import Framing
from tests.harness import error_fields

ISSUER = "https://idp.example"
AUDIENCE = "maas"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _jwk(public_key: Any, kid: str) -> dict[str, Any]:
    algo = RSAAlgorithm if isinstance(public_key, rsa.RSAPublicKey) else ECAlgorithm
    data = json.loads(algo.to_jwk(public_key))
    data["kid"] = kid
    return data


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory, rsa_key: rsa.RSAPrivateKey,
              ec_key: ec.EllipticCurvePrivateKey) -> Path:
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [_jwk(rsa_key.public_key(), "rsa-1"), _jwk(ec_key.public_key(), "ec-1")]}))
    return path


def _stage(jwks_file: Path, **overrides: Any) -> tuple[authenticate.Authenticate, Metrics]:
    settings: dict[str, Any] = dict(issuer=ISSUER, audience=AUDIENCE, algorithms=["RS256", "ES256"],
                                    jwks_file=jwks_file, leeway_s=5.0)
    settings.update(overrides)
    metrics = Metrics()
    services = Services(config=GatewayConfig(auth=AuthConfig(jwt=JwtConfig(**settings))), metrics=metrics, policy=None)
    return authenticate.build(services), metrics


@pytest.fixture
def stage(jwks_file: Path) -> tuple[authenticate.Authenticate, Metrics]:
    return _stage(jwks_file)


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300,
                              "roles": ["analyst"]}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _token(key: Any, kid: str = "rsa-1", alg: str = "RS256", headers: dict[str, Any] | None = None, **claims: Any) -> str:
    return jwt.encode(_claims(**claims), key, algorithm=alg, headers={"kid": kid, **(headers or {})})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{_b64(signature)}"


def _ctx(path: str = "/v2/models/digits/infer", headers: Any = None) -> RequestContext:
    path, _, query = path.partition("?")
    return RequestContext(BufferedRequest("POST", path, query=query, headers=headers or {}), "test", 0.0)


async def _refused(stage: authenticate.Authenticate, token: str, **kwargs: Any) -> Unauthenticated:
    ctx = _ctx(headers={"Authorization": f"Bearer {token}"}, **kwargs)
    with pytest.raises(Unauthenticated) as info:
        await stage(ctx)
    assert ctx.identity is None
    assert info.value.status == 401
    assert info.value.headers["WWW-Authenticate"] == 'Bearer realm="maas-gateway", error="invalid_token"'
    return info.value


def _failures(metrics: Metrics, reason: str) -> float:
    return metrics.registry.get_sample_value("maas_auth_failures_total", {"reason": reason}) or 0.0


async def test_the_good_token_passes(stage, rsa_key):
    """The control: without it every refusal below could be a broken setup."""
    auth, _ = stage
    ctx = _ctx(headers={"Authorization": f"Bearer {_token(rsa_key)}"})
    await auth(ctx)
    assert ctx.identity is not None and ctx.identity.subject == "alice"


@pytest.mark.parametrize("spelling", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_in_every_spelling_is_refused(stage, spelling):
    auth, metrics = stage
    token = _forge({"alg": spelling, "typ": "JWT", "kid": "rsa-1"}, _claims())
    error = await _refused(auth, token)
    assert error.message == "algorithm not allowed"
    assert _failures(metrics, "algorithm_not_allowed") == 1


async def test_alg_none_with_a_signature_attached_is_refused(stage, rsa_key):
    auth, _ = stage
    good = _token(rsa_key)
    header, payload, signature = good.split(".")
    forged = f"{_b64(json.dumps({'alg': 'none', 'kid': 'rsa-1'}).encode())}.{payload}.{signature}"
    await _refused(auth, forged)


async def test_unsigned_token_from_pyjwt_is_refused(stage):
    auth, _ = stage
    token = jwt.encode(_claims(), None, algorithm="none")
    await _refused(auth, token)


async def test_hs256_signed_with_the_rsa_public_key_is_refused(stage, rsa_key):
    """The classic confusion: the public key (which anyone has) used as an HMAC secret."""
    auth, _ = stage
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    error = await _refused(auth, f"{header}.{payload}.{_b64(signature)}")
    assert error.message == "algorithm not allowed"


async def test_hs256_with_the_rsa_key_is_refused_even_when_hs256_is_allowed(jwks_file, rsa_key):
    """Defence in depth: were HS256 ever on the allow-list, an RSA key still cannot verify it."""
    auth, metrics = _stage(jwks_file, algorithms=["RS256", "HS256"])  # a config validate() refuses; built directly
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = _b64(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode())
    payload = _b64(json.dumps(_claims()).encode())
    signature = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    error = await _refused(auth, f"{header}.{payload}.{_b64(signature)}")
    assert error.message == "token algorithm does not match its key"
    assert _failures(metrics, "key_mismatch") == 1


async def test_es256_token_naming_the_rsa_kid_is_refused(stage, ec_key):
    auth, _ = stage
    await _refused(auth, _token(ec_key, kid="rsa-1", alg="ES256"))


async def test_expired_token_is_refused(stage, rsa_key):
    auth, metrics = stage
    now = int(time.time())
    error = await _refused(auth, _token(rsa_key, iat=now - 600, exp=now - 60))  # 60 s > 5 s leeway
    assert error.message == "token expired"
    assert _failures(metrics, "expired") == 1


async def test_token_without_exp_is_refused(stage, rsa_key):
    auth, _ = stage
    error = await _refused(auth, _token(rsa_key, exp=None))
    assert "exp" in error.message


async def test_token_with_a_non_numeric_exp_is_refused(stage, rsa_key):
    auth, _ = stage
    await _refused(auth, _token(rsa_key, exp="tomorrow"))


async def test_future_nbf_is_refused(stage, rsa_key):
    auth, _ = stage
    error = await _refused(auth, _token(rsa_key, nbf=int(time.time()) + 120))
    assert error.message == "token not yet valid"


async def test_future_iat_is_refused(stage, rsa_key):
    auth, _ = stage
    await _refused(auth, _token(rsa_key, iat=int(time.time()) + 3600))


async def test_wrong_issuer_is_refused(stage, rsa_key):
    auth, _ = stage
    error = await _refused(auth, _token(rsa_key, iss="https://evil.example"))
    assert error.message == "token issuer not accepted"


async def test_missing_issuer_is_refused(stage, rsa_key):
    auth, _ = stage
    await _refused(auth, _token(rsa_key, iss=None))


async def test_wrong_audience_is_refused(stage, rsa_key):
    auth, _ = stage
    error = await _refused(auth, _token(rsa_key, aud="another-service"))
    assert error.message == "token audience not accepted"


async def test_missing_audience_is_refused(stage, rsa_key):
    auth, _ = stage
    await _refused(auth, _token(rsa_key, aud=None))


async def test_unknown_kid_is_refused(stage, rsa_key):
    auth, metrics = stage
    error = await _refused(auth, _token(rsa_key, kid="no-such-key"))
    assert error.message == "unknown key id"
    assert _failures(metrics, "unknown_kid") == 1


async def test_attackers_own_key_under_the_real_kid_is_refused(stage, attacker_key):
    auth, _ = stage
    error = await _refused(auth, _token(attacker_key, kid="rsa-1"))
    assert error.message == "signature verification failed"


@pytest.fixture
async def attacker_jwks(aiohttp_server, attacker_key):
    """A JWKS the attacker controls, on a real socket; counts every fetch."""
    hits: list[str] = []

    async def serve(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"keys": [_jwk(attacker_key.public_key(), "attacker")]})

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    server = await aiohttp_server(app)
    return str(server.make_url("/jwks.json")), hits


@pytest.mark.parametrize("kid", ["attacker", "rsa-1"])
async def test_jku_header_pointing_elsewhere_is_never_fetched(stage, attacker_key, attacker_jwks, kid):
    auth, _ = stage
    url, hits = attacker_jwks
    await _refused(auth, _token(attacker_key, kid=kid, headers={"jku": url}))
    await asyncio.sleep(0.05)  # a window for a fetch that must never come (nothing to wait on)
    assert hits == []


async def test_x5u_header_is_never_fetched(stage, attacker_key, attacker_jwks):
    auth, _ = stage
    url, hits = attacker_jwks
    await _refused(auth, _token(attacker_key, kid="rsa-1", headers={"x5u": url}))
    await asyncio.sleep(0.05)  # a window for a fetch that must never come (nothing to wait on)
    assert hits == []


@pytest.mark.parametrize("kid", ["attacker", "rsa-1", None])
async def test_embedded_jwk_header_is_ignored(stage, attacker_key, kid):
    auth, _ = stage
    headers: dict[str, Any] = {"jwk": _jwk(attacker_key.public_key(), kid or "x")}
    token = jwt.encode(_claims(), attacker_key, algorithm="RS256", headers={**headers, **({"kid": kid} if kid else {})})
    await _refused(auth, token)


async def test_oversized_token_is_refused_before_parsing(stage, rsa_key):
    auth, metrics = stage
    token = _token(rsa_key, padding="x" * 9000)
    assert len(token) > 8192
    error = await _refused(auth, token)
    assert error.message == "token larger than 8192 bytes"
    assert _failures(metrics, "too_large") == 1
    # not even valid base64 behind the size check: still the size refusal, not a parse error
    error = await _refused(auth, "!" * 10_000)
    assert error.message == "token larger than 8192 bytes"


async def test_token_in_the_query_string_is_never_read(stage, rsa_key):
    auth, metrics = stage
    token = _token(rsa_key)
    for name in ("access_token", "token", "jwt", "api_key"):
        ctx = _ctx(path=f"/v2/models/digits/infer?{name}={token}")
        with pytest.raises(Unauthenticated) as info:
            await auth(ctx)
        assert info.value.headers["WWW-Authenticate"] == 'Bearer realm="maas-gateway"'  # no error: no credentials
        assert ctx.identity is None
    assert _failures(metrics, "missing") == 4


async def test_modified_signature_is_refused(stage, rsa_key):
    auth, _ = stage
    header, payload, signature = _token(rsa_key).split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    error = await _refused(auth, f"{header}.{payload}.{flipped}")
    assert error.message in ("signature verification failed", "malformed token")


@pytest.mark.parametrize("cut", ["half", "empty", "one_char"])
async def test_cut_signature_is_refused(stage, rsa_key, cut):
    auth, _ = stage
    header, payload, signature = _token(rsa_key).split(".")
    signature = {"half": signature[: len(signature) // 2], "empty": "", "one_char": signature[:-1]}[cut]
    await _refused(auth, f"{header}.{payload}.{signature}")


async def test_modified_payload_under_the_old_signature_is_refused(stage, rsa_key):
    auth, _ = stage
    header, _, signature = _token(rsa_key).split(".")
    payload = _b64(json.dumps(_claims(sub="admin", roles=["admin"])).encode())
    error = await _refused(auth, f"{header}.{payload}.{signature}")
    assert error.message == "signature verification failed"


@pytest.mark.parametrize("roles", ["admin", {"admin": True}, ["admin", 7], [["admin"]], 42, ["ad\nmin"], ["a,b"]])
async def test_roles_claim_that_is_not_a_list_of_strings_gives_no_roles(stage, rsa_key, roles):
    auth, _ = stage
    ctx = _ctx(headers={"Authorization": f"Bearer {_token(rsa_key, roles=roles)}"})
    await auth(ctx)
    assert ctx.identity is not None
    assert ctx.identity.roles == ()
    assert ctx.identity.claims["roles"] == []  # later stages never see the raw, untrusted shape


@pytest.mark.parametrize("sub", [None, 42, ["alice"], "", "alice\r\nX-Maas-Roles: admin"])
async def test_missing_or_bad_subject_is_refused(stage, rsa_key, sub):
    auth, _ = stage
    await _refused(auth, _token(rsa_key, sub=sub))


async def test_cache_does_not_serve_an_expired_token(jwks_file, rsa_key):
    auth, metrics = _stage(jwks_file, leeway_s=0.0)
    exp = int(time.time()) + 1
    token = _token(rsa_key, exp=exp)
    ctx = _ctx(headers={"Authorization": f"Bearer {token}"})
    await auth(ctx)  # verified and cached
    await auth(_ctx(headers={"Authorization": f"Bearer {token}"}))
    assert metrics.registry.get_sample_value("maas_auth_token_cache_total", {"result": "hit"}) == 1
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)  # PyJWT checks exp on the real wall clock: it must pass
    error = await _refused(auth, token)
    assert error.message == "token expired"
    assert auth.jwt is not None and auth.jwt.cached(token) is None


@pytest.mark.parametrize("token", [
    "not-a-jwt", "a.b", "a.b.c.d", "a.b.c.d.e", "....", "eyJhbGciOiJSUzI1NiJ9..", "tokén.with.ünïcode",
    "\x00\x01\x02", _forge({"alg": ["RS256"]}, {}), _forge({"alg": {"x": 1}}, {}), _forge({"alg": "RS256", "kid": 7}, {}),
    _forge({"alg": "RS256", "kid": "rsa-1", "crit": ["exp"]}, _claims(), b"x" * 256),
    _forge({"alg": "RS256", "kid": "rsa-1", "b64": False, "crit": ["b64"]}, _claims(), b"x" * 256),
    f"{_b64(b'[1,2]')}.{_b64(b'{}')}.{_b64(b'x')}", f"{_b64(b'{')}.{_b64(b'{}')}.", "Bearer",
])
async def test_garbage_tokens_are_401_not_500(stage, token):
    auth, _ = stage
    await _refused(auth, token)


@pytest.mark.parametrize("token", ["a.b.\ud800", "\udcff.x.y", "é.b.c"])
async def test_undecodable_header_bytes_are_refused_not_500(stage, token):
    """aiohttp hands over undecodable header bytes as surrogates; they must not reach an encoder."""
    auth, _ = stage
    assert auth.jwt is not None and auth.jwt.cached(token) is None
    with pytest.raises(AuthFailure):
        await auth.jwt.verify(token)


async def test_payload_that_is_not_an_object_is_refused(stage, rsa_key):
    auth, _ = stage
    header = _b64(json.dumps({"alg": "RS256", "kid": "rsa-1"}).encode())
    payload = _b64(b"[1, 2, 3]")
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    signature = rsa_key.sign(f"{header}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256())
    await _refused(auth, f"{header}.{payload}.{_b64(signature)}")


async def test_two_authorization_headers_are_refused_not_resolved(stage, rsa_key, attacker_key):
    auth, _ = stage
    headers = CIMultiDict([("Authorization", f"Bearer {_token(rsa_key)}"),
                           ("Authorization", f"Bearer {_token(attacker_key)}")])
    ctx = _ctx(headers=headers)
    with pytest.raises(InvalidRequest):  # by framing, which runs before authentication
        await Framing(1_000_000)(ctx)
        await auth(ctx)
    assert ctx.identity is None


async def test_other_schemes_are_not_bearer_credentials(stage, rsa_key):
    auth, _ = stage
    for value in (f"Basic {_b64(b'alice:secret')}", f"Token {_token(rsa_key)}", _token(rsa_key)):
        ctx = _ctx(headers={"Authorization": value})
        with pytest.raises(Unauthenticated) as info:
            await auth(ctx)
        assert info.value.headers["WWW-Authenticate"] == 'Bearer realm="maas-gateway"'


async def test_failure_messages_never_carry_key_material(stage, rsa_key, attacker_key):
    auth, _ = stage
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    modulus = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))["n"]
    tokens = [_token(attacker_key), _token(rsa_key, kid="zzz"), _token(rsa_key, exp=1), _forge({"alg": "none"}, _claims())]
    for token in tokens:
        error = await _refused(auth, token)
        for secret in (token, token.split(".")[2] or "-", modulus[:20], pem[30:60], "rsa-1"):
            assert secret not in error.message


# --------------------------------------------------------------------------- end to end, through the real gateway


@pytest.fixture
async def gateway(tmp_path, keys):
    import aiohttp
    from tests.harness import ALLOW_ANALYSTS, start_gateway, start_upstream, v2_model

    up = await start_upstream()
    gw = await start_gateway(tmp_path, keys, models={"digits": v2_model(up.url)}, policy=ALLOW_ANALYSTS)
    async with aiohttp.ClientSession() as session:
        yield gw, up, session
    await gw.stop()
    await up.stop()


V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 4.0]}]}


def _attacks(keys: Any, attacker: rsa.RSAPrivateKey, jku_url: str) -> dict[str, str]:
    now = int(time.time())
    good = keys.token("alice")
    header, payload, signature = good.split(".")
    base = {"sub": "alice", "iss": "https://idp.test", "aud": "maas", "iat": now, "exp": now + 300, "roles": ["analyst"]}
    hs_header = _b64(json.dumps({"alg": "HS256", "kid": keys.kid}).encode())
    hs_payload = _b64(json.dumps(base).encode())
    hs_signature = hmac.new(keys.public_pem, f"{hs_header}.{hs_payload}".encode(), hashlib.sha256).digest()
    return {
        "alg none": _forge({"alg": "none", "kid": keys.kid}, base),
        "alg None": _forge({"alg": "None", "kid": keys.kid}, base),
        "alg NONE": _forge({"alg": "NONE"}, base),
        "alg nOnE": _forge({"alg": "nOnE"}, base),
        "hs256 with the rsa public key": f"{hs_header}.{hs_payload}.{_b64(hs_signature)}",
        "expired": keys.token("alice", iat=now - 600, exp=now - 300),
        "future nbf": keys.token("alice", nbf=now + 600),
        "wrong iss": keys.token("alice", iss="https://evil.example"),
        "wrong aud": keys.token("alice", aud="someone-else"),
        "unknown kid": keys.token("alice", headers={"kid": "rotated-away"}),
        "jku elsewhere": jwt.encode(base, attacker, algorithm="RS256", headers={"kid": keys.kid, "jku": jku_url}),
        "embedded jwk": jwt.encode(base, attacker, algorithm="RS256",
                                   headers={"kid": keys.kid, "jwk": _jwk(attacker.public_key(), keys.kid)}),
        "cut signature": f"{header}.{payload}.{signature[:-8]}",
        "modified signature": f"{header}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}",
    }


async def test_every_jwt_attack_is_a_401_through_the_gateway(gateway, keys, attacker_key, attacker_jwks):
    gw, up, session = gateway
    jku_url, jku_hits = attacker_jwks
    ok = await session.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers=keys.auth("alice"))
    assert ok.status == 200  # the control
    seen_before = len(up.seen)
    for name, token in _attacks(keys, attacker_key, jku_url).items():
        r = await session.post(gw.url + "/v2/models/digits/infer", json=V2_BODY,
                               headers={"Authorization": f"Bearer {token}"})
        assert r.status == 401, name
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="maas-gateway", error="invalid_token"', name
        body = await r.json()
        assert error_fields(body)["type"] == "unauthenticated", name
        assert token not in error_fields(body)["message"], name
    assert len(up.seen) == seen_before  # nothing reached the model
    assert jku_hits == []


async def test_token_in_the_query_string_is_a_401_through_the_gateway(gateway, keys):
    gw, up, session = gateway
    r = await session.post(gw.url + f"/v2/models/digits/infer?access_token={keys.token('alice')}", json=V2_BODY)
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="maas-gateway"'
    assert up.seen == []


async def test_oversized_token_is_refused_through_the_gateway(gateway, keys):
    gw, up, session = gateway
    token = keys.token("alice", padding="x" * 9000)
    r = await session.post(gw.url + "/v2/models/digits/infer", json=V2_BODY, headers={"Authorization": f"Bearer {token}"})
    assert r.status == 401
    assert error_fields(await r.json())["type"] == "unauthenticated"
    assert up.seen == []
