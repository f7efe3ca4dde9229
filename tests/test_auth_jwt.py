"""JWT verification: every supported algorithm and key source, the verified-token cache,
JWKS URLs (rotation, rate-limited refresh, failures), config errors, and the stage's
mTLS and header handling.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.auth import AuthFailure
from gateway.auth.jwt import JwtVerifier
from gateway.config import JwtConfig, MtlsAuthConfig
from gateway.errors import ConfigError, InvalidRequest, Unauthenticated
from gateway.metrics import Metrics
from gateway.pipeline import RequestContext
from gateway.request import BufferedRequest, CertificateSubject, subject_of_certificate, subject_of_name
from gateway.stages.authenticate import Authenticate
from gateway.stages.framing import Framing
from harness import eventually

ISSUER = "https://idp.example"
AUDIENCE = "maas"


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "p521": ec.generate_private_key(ec.SECP521R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }


def _jwk(private_key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    public = private_key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        data = json.loads(RSAAlgorithm.to_jwk(public))
    elif isinstance(public, ec.EllipticCurvePublicKey):
        data = json.loads(ECAlgorithm.to_jwk(public))
    else:
        data = json.loads(OKPAlgorithm.to_jwk(public))
    if kid is not None:
        data["kid"] = kid
    data.update(extra)
    return data


def _write_jwks(path: Path, jwks: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"keys": jwks}))
    return path


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any]) -> Path:
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    return _write_jwks(path, [_jwk(keys[name], name) for name in ("rsa", "p256", "p384", "p521", "ed")])


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "roles": ["analyst"]}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _token(key: Any, alg: str = "RS256", kid: str | None = "rsa", **claims: Any) -> str:
    return jwt.encode(_claims(**claims), key, algorithm=alg, headers={"kid": kid} if kid else None)


def _verifier(metrics: Metrics | None = None, **settings: Any) -> JwtVerifier:
    base: dict[str, Any] = dict(issuer=ISSUER, audience=AUDIENCE, leeway_s=5.0)
    base.update(settings)
    return JwtVerifier.from_config(JwtConfig(**base), metrics or Metrics())


def _ctx(headers: Any = None, *, cert: CertificateSubject | None = None) -> RequestContext:
    """A request as the door hands it on; ``cert``: the subject of a client certificate the handshake verified."""
    request = BufferedRequest("GET", "/v1/models", headers=headers or {}, secure=cert is not None, client_subject=cert)
    return RequestContext(request, "t", 0.0)


def _subject(dn: str) -> CertificateSubject:
    """The subject of a certificate whose subject is the RFC 4514 name ``dn``."""
    return subject_of_name(x509.Name.from_rfc4514_string(dn))


def _cn(*names: str) -> CertificateSubject:
    """A subject of only these common names, verbatim."""
    return CertificateSubject(tuple(("CN", name) for name in names))


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# --------------------------------------------------------------------------- algorithms and key sources


@pytest.mark.parametrize(("alg", "key_name"), [
    ("RS256", "rsa"), ("RS384", "rsa"), ("RS512", "rsa"), ("PS256", "rsa"), ("PS384", "rsa"), ("PS512", "rsa"),
    ("ES256", "p256"), ("ES384", "p384"), ("ES512", "p521"), ("EdDSA", "ed"),
])
async def test_every_asymmetric_algorithm_verifies_with_its_key(jwks_file, keys, alg, key_name):
    verifier = _verifier(algorithms=[alg], jwks_file=jwks_file)
    identity = await verifier.verify(_token(keys[key_name], alg, kid=key_name))
    assert identity.subject == "alice"
    assert identity.roles == ("analyst",)
    assert identity.method == "jwt"
    assert identity.credential_id == key_name


@pytest.mark.parametrize(("alg", "key_name"), [("ES256", "p384"), ("ES384", "p256"), ("ES512", "p256"),
                                               ("RS256", "p256"), ("EdDSA", "rsa"), ("PS256", "ed")])
async def test_a_key_never_verifies_another_type_or_curve(jwks_file, keys, alg, key_name):
    """The token names a real kid but an algorithm that key's type cannot serve."""
    verifier = _verifier(algorithms=["RS256", "PS256", "ES256", "ES384", "ES512", "EdDSA"], jwks_file=jwks_file)
    signer = {"ES256": "p256", "ES384": "p384", "ES512": "p521", "RS256": "rsa", "PS256": "rsa", "EdDSA": "ed"}[alg]
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(_token(keys[signer], alg, kid=key_name))
    assert info.value.reason == "key_mismatch"


async def test_algorithm_outside_the_allow_list_is_refused(jwks_file, keys):
    verifier = _verifier(algorithms=["ES256"], jwks_file=jwks_file)
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(_token(keys["rsa"], "RS256", kid="rsa"))
    assert info.value.reason == "algorithm_not_allowed"


async def test_jwk_alg_member_pins_the_algorithm(tmp_path, keys):
    path = _write_jwks(tmp_path / "jwks.json", [_jwk(keys["rsa"], "rsa", alg="RS256", use="sig")])
    verifier = _verifier(algorithms=["RS256", "PS256"], jwks_file=path)
    assert (await verifier.verify(_token(keys["rsa"], "RS256"))).subject == "alice"
    with pytest.raises(AuthFailure):
        await verifier.verify(_token(keys["rsa"], "PS256"))


async def test_encryption_keys_in_a_jwks_are_never_used_for_signatures(tmp_path, keys):
    path = _write_jwks(tmp_path / "jwks.json", [_jwk(keys["rsa"], "enc", use="enc"), _jwk(keys["rsa2"], "sig")])
    verifier = _verifier(algorithms=["RS256"], jwks_file=path)
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(_token(keys["rsa"], kid="enc"))
    assert info.value.reason == "unknown_kid"


async def test_token_without_kid_uses_the_only_fitting_key(tmp_path, keys):
    path = _write_jwks(tmp_path / "jwks.json", [_jwk(keys["rsa"], None), _jwk(keys["p256"], "p256")])
    verifier = _verifier(algorithms=["RS256", "ES256"], jwks_file=path)
    assert (await verifier.verify(_token(keys["rsa"], kid=None))).credential_id is None


async def test_token_without_kid_is_refused_when_several_keys_fit(jwks_file, tmp_path, keys):
    path = _write_jwks(tmp_path / "jwks.json", [_jwk(keys["rsa"], "a"), _jwk(keys["rsa2"], "b")])
    verifier = _verifier(algorithms=["RS256"], jwks_file=path)
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(_token(keys["rsa"], kid=None))
    assert info.value.message == "token has no key id"


@pytest.mark.parametrize("as_certificate", [False, True])
async def test_public_key_file_ignores_the_kid(tmp_path, keys, as_certificate):
    key = keys["p256"]
    if as_certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
        now = time.time()
        import datetime as dt

        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.timezone.utc))
                .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.timezone.utc)).sign(key, hashes.SHA256()))
        pem = cert.public_bytes(serialization.Encoding.PEM)
    else:
        pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = tmp_path / "idp.pem"
    path.write_bytes(pem)
    verifier = _verifier(algorithms=["ES256"], public_key_file=path)
    assert (await verifier.verify(_token(key, "ES256", kid="whatever"))).subject == "alice"
    with pytest.raises(AuthFailure):
        await verifier.verify(_token(keys["rsa"], "RS256"))  # not on the list, and not this key's type


async def test_hs256_secret_from_the_environment(monkeypatch, keys):
    secret = "s" * 64
    monkeypatch.setenv("TEST_JWT_SECRET", secret)
    verifier = _verifier(algorithms=["HS256", "HS512"], hs256_secret_env="TEST_JWT_SECRET")
    for alg in ("HS256", "HS512"):
        assert (await verifier.verify(_token(secret, alg, kid=None))).subject == "alice"
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(_token("t" * 64, "HS256", kid=None))
    assert info.value.reason == "bad_signature"
    with pytest.raises(AuthFailure):  # an RSA token where only a secret is configured
        await verifier.verify(_token(keys["rsa"], "RS256"))


@pytest.mark.parametrize("value", [None, ""])
def test_missing_or_empty_secret_env_stops_start_up(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("TEST_JWT_SECRET", raising=False)
    else:
        monkeypatch.setenv("TEST_JWT_SECRET", value)
    with pytest.raises(ConfigError) as info:
        _verifier(algorithms=["HS256"], hs256_secret_env="TEST_JWT_SECRET")
    assert "TEST_JWT_SECRET" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("content", "expected"), [
    ('{"keys": [', ":1: invalid JSON"),
    ('{"nokeys": []}', 'a "keys" list'),
    ('{"keys": []}', "no usable signing keys"),
    ('{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}', "keys[0]: symmetric (oct) keys"),
    ('{"keys": [{"kty": "RSA", "kid": "r", "n": "AQAB", "e": "AQAB"}]}', "keys[0]:"),
    ('{"keys": [{"kty": "XYZ", "kid": "r"}]}', "unsupported kty"),
])
def test_bad_jwks_file_is_a_one_line_config_error(tmp_path, content, expected):
    path = tmp_path / "jwks.json"
    path.write_text(content)
    with pytest.raises(ConfigError) as info:
        _verifier(algorithms=["RS256"], jwks_file=path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_jwks_file_with_a_private_key_is_refused(tmp_path, keys):
    private = json.loads(RSAAlgorithm.to_jwk(keys["rsa"]))
    path = _write_jwks(tmp_path / "jwks.json", [{**private, "kid": "r"}])
    with pytest.raises(ConfigError, match="private key"):
        _verifier(algorithms=["RS256"], jwks_file=path)


def test_weak_rsa_key_is_refused(tmp_path):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "weak.pem"
    path.write_bytes(weak.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match="too weak"):
        _verifier(algorithms=["RS256"], public_key_file=path)


def test_private_pem_is_refused(tmp_path, keys):
    path = tmp_path / "private.pem"
    path.write_bytes(keys["p256"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="private key"):
        _verifier(algorithms=["ES256"], public_key_file=path)


# --------------------------------------------------------------------------- claims


async def test_claims_carry_every_token_claim_plus_sub_and_roles(jwks_file, keys):
    verifier = _verifier(algorithms=["RS256"], jwks_file=jwks_file, subject_claim="email", roles_claim="groups")
    identity = await verifier.verify(_token(keys["rsa"], email="a@example.org", groups=["x", "y"], clearance=3))
    assert identity.subject == "a@example.org"
    assert identity.roles == ("x", "y")
    assert identity.claims["sub"] == "a@example.org"
    assert identity.claims["roles"] == ["x", "y"]
    assert identity.claims["clearance"] == 3
    assert identity.claims["iss"] == ISSUER
    with pytest.raises(TypeError):
        identity.claims["sub"] = "mallory"  # type: ignore[index]  # shared by cached requests: read-only


async def test_nested_roles_claim(jwks_file, keys):
    verifier = _verifier(algorithms=["RS256"], jwks_file=jwks_file, roles_claim="realm_access.roles")
    identity = await verifier.verify(_token(keys["rsa"], realm_access={"roles": ["ops"]}))
    assert identity.roles == ("ops",)


async def test_audience_list_accepts_any_listed_audience(jwks_file, keys):
    verifier = _verifier(algorithms=["RS256"], jwks_file=jwks_file, audience=["maas", "other"])
    assert (await verifier.verify(_token(keys["rsa"], aud="other"))).subject == "alice"


async def test_leeway_accepts_a_token_just_expired(jwks_file, keys):
    verifier = _verifier(algorithms=["RS256"], jwks_file=jwks_file, leeway_s=30.0)
    assert (await verifier.verify(_token(keys["rsa"], exp=int(time.time()) - 10))).subject == "alice"


# --------------------------------------------------------------------------- the verified-token cache


async def test_cache_serves_a_verified_token_without_verifying_again(jwks_file, keys):
    metrics = Metrics()
    verifier = _verifier(metrics, algorithms=["RS256"], jwks_file=jwks_file)
    token = _token(keys["rsa"])
    assert verifier.cached(token) is None
    identity = await verifier.verify(token)
    for _ in range(5):
        assert verifier.cached(token) is identity
    assert _sample(metrics, "maas_auth_token_cache_total", result="hit") == 5
    assert _sample(metrics, "maas_auth_token_cache_total", result="miss") == 1


async def test_cache_is_bounded_and_evicts_the_least_recently_used(jwks_file, keys):
    verifier = _verifier(algorithms=["RS256"], jwks_file=jwks_file, cache_size=3)
    tokens = [_token(keys["rsa"], sub=f"user{i}") for i in range(4)]
    for token in tokens[:3]:
        verifier.cached(token)
        await verifier.verify(token)
    assert verifier.cached(tokens[0]) is not None  # now the most recently used
    await verifier.verify(tokens[3])  # evicts tokens[1]
    assert verifier.cached(tokens[1]) is None
    assert all(verifier.cached(t) is not None for t in (tokens[0], tokens[2], tokens[3]))


async def test_cache_size_zero_disables_the_cache(jwks_file, keys):
    verifier = _verifier(algorithms=["RS256"], jwks_file=jwks_file, cache_size=0)
    token = _token(keys["rsa"])
    await verifier.verify(token)
    assert verifier.cached(token) is None


async def test_refused_tokens_are_never_cached(jwks_file, keys):
    verifier = _verifier(algorithms=["RS256"], jwks_file=jwks_file)
    token = _token(keys["rsa"], iss="https://evil.example")
    for _ in range(2):
        with pytest.raises(AuthFailure):
            await verifier.verify(token)
        assert verifier.cached(token) is None


async def test_reloading_a_jwks_file_without_the_key_drops_cached_tokens(tmp_path, keys):
    path = _write_jwks(tmp_path / "jwks.json", [_jwk(keys["rsa"], "rsa")])
    verifier = _verifier(algorithms=["RS256"], jwks_file=path)
    token = _token(keys["rsa"])
    await verifier.verify(token)
    assert verifier.cached(token) is not None
    _write_jwks(path, [_jwk(keys["rsa2"], "rsa2")])
    verifier.reload()
    assert verifier.cached(token) is None
    with pytest.raises(AuthFailure):
        await verifier.verify(token)


def test_reloading_a_broken_jwks_file_keeps_the_old_keys(tmp_path, keys):
    path = _write_jwks(tmp_path / "jwks.json", [_jwk(keys["rsa"], "rsa")])
    verifier = _verifier(algorithms=["RS256"], jwks_file=path)
    before = verifier.keys.keyset
    path.write_text("{broken")
    with pytest.raises(ConfigError):
        verifier.reload()
    assert verifier.keys.keyset is before


# --------------------------------------------------------------------------- JWKS URL


class JwksServer:
    """A real HTTP identity provider endpoint whose keys and health the test controls."""

    def __init__(self) -> None:
        self.jwks: list[dict[str, Any]] = []
        self.fetches = 0
        self.status = 200

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response({"keys": self.jwks})


@pytest.fixture
async def idp(aiohttp_server, keys):
    server = JwksServer()
    server.jwks = [_jwk(keys["rsa"], "rsa")]
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    running = await aiohttp_server(app)
    server.url = str(running.make_url("/jwks"))  # type: ignore[attr-defined]
    return server


async def _remote(idp: JwksServer, metrics: Metrics | None = None, **settings: Any) -> JwtVerifier:
    verifier = _verifier(metrics, algorithms=["RS256"], jwks_url=idp.url, **settings)  # type: ignore[attr-defined]
    await verifier.start()
    return verifier


async def test_jwks_url_rotation_fetches_a_new_kid_on_demand(idp, keys):
    verifier = await _remote(idp, jwks_min_refresh_s=0.2)
    try:
        assert (await verifier.verify(_token(keys["rsa"]))).subject == "alice"
        assert idp.fetches == 1
        idp.jwks = [_jwk(keys["rsa"], "rsa"), _jwk(keys["rsa2"], "rsa2")]  # the IdP rotates in a new key
        await asyncio.sleep(0.25)  # the thing under test: past jwks_min_refresh_s, an unknown kid may refetch
        assert (await verifier.verify(_token(keys["rsa2"], kid="rsa2"))).subject == "alice"
        assert idp.fetches == 2
        assert (await verifier.verify(_token(keys["rsa"], sub="bob"))).subject == "bob"  # the old one still works
        assert idp.fetches == 2
    finally:
        await verifier.close()


async def test_random_kid_spray_causes_at_most_one_fetch_per_interval(idp, keys):
    interval = 1.0
    verifier = await _remote(idp, jwks_min_refresh_s=interval)
    try:
        assert idp.fetches == 1
        spray = [_token(keys["rsa"], kid=uuid.uuid4().hex) for _ in range(100)]  # minted before the clock starts
        await asyncio.sleep(interval + 0.05)  # the thing under test: one refetch allowed per interval

        async def attempt(token: str) -> str:
            try:
                await verifier.verify(token)
            except AuthFailure as failure:
                return failure.reason
            return "accepted"

        started = time.monotonic()
        reasons = await asyncio.gather(*(attempt(t) for t in spray[:50]))
        reasons += [await attempt(t) for t in spray[50:]]
        assert time.monotonic() - started < interval  # the sprays above all fell in one interval
        assert set(reasons) == {"unknown_kid"}
        assert idp.fetches == 2

        idp.jwks.append(_jwk(keys["rsa2"], "rsa2"))
        rotated = _token(keys["rsa2"], kid="rsa2")
        assert await attempt(rotated) == "unknown_kid"  # still rate-limited: not fetched yet
        assert idp.fetches == 2
        await asyncio.sleep(interval + 0.05)  # the thing under test: the next interval allows one more fetch
        assert await attempt(rotated) == "accepted"
        assert idp.fetches == 3
    finally:
        await verifier.close()


async def test_failing_jwks_fetch_keeps_the_last_good_keys(idp, keys):
    metrics = Metrics()
    verifier = await _remote(idp, metrics, jwks_min_refresh_s=0.1)
    try:
        idp.status = 500
        await asyncio.sleep(0.15)  # the thing under test: past jwks_min_refresh_s (0.1 s), a refetch is allowed
        with pytest.raises(AuthFailure):
            await verifier.verify(_token(keys["rsa"], kid="new"))  # triggers a fetch that fails
        assert idp.fetches == 2
        assert _sample(metrics, "maas_jwks_refreshes_total", result="error") == 1
        assert (await verifier.verify(_token(keys["rsa"]))).subject == "alice"
        assert verifier.ready() is None

        idp.status = 200
        idp.jwks = [{"kty": "garbage"}]  # a reachable IdP serving nothing usable: still keep the old keys
        await asyncio.sleep(0.15)  # the thing under test: past jwks_min_refresh_s (0.1 s), a refetch is allowed
        with pytest.raises(AuthFailure):
            await verifier.verify(_token(keys["rsa"], kid="new2"))
        assert (await verifier.verify(_token(keys["rsa"], sub="carol"))).subject == "carol"
    finally:
        await verifier.close()


async def test_jwks_url_down_at_start_is_not_ready_and_refuses_tokens(idp, keys):
    idp.status = 503
    verifier = await _remote(idp, jwks_min_refresh_s=0.1)
    try:
        assert verifier.ready() is not None and "JWKS" in verifier.ready()
        with pytest.raises(AuthFailure):
            await verifier.verify(_token(keys["rsa"]))
        idp.status = 200
        await asyncio.sleep(0.15)  # the thing under test: past jwks_min_refresh_s (0.1 s), a refetch is allowed
        assert (await verifier.verify(_token(keys["rsa"]))).subject == "alice"  # an unknown kid refetches
        assert verifier.ready() is None
    finally:
        await verifier.close()


async def test_periodic_refresh_drops_a_removed_key_and_its_cached_tokens(idp, keys):
    verifier = await _remote(idp, jwks_cache_s=1.0, jwks_min_refresh_s=0.1)
    try:
        token = _token(keys["rsa"])
        await verifier.verify(token)
        assert verifier.cached(token) is not None
        idp.jwks = [_jwk(keys["rsa2"], "rsa2")]
        await eventually(lambda: verifier.cached(token) is None, timeout=5.0)  # the periodic refresh (jwks_cache_s 1 s)
        assert idp.fetches >= 2
        with pytest.raises(AuthFailure):
            await verifier.verify(token)
    finally:
        await verifier.close()


async def test_close_closes_the_client_session(idp):
    verifier = await _remote(idp)
    session = verifier.keys._session  # type: ignore[union-attr]
    assert session is not None and not session.closed
    await verifier.close()
    assert session.closed


# --------------------------------------------------------------------------- the stage: mTLS, headers


@pytest.fixture
def stage(jwks_file) -> Authenticate:
    metrics = Metrics()
    return Authenticate(metrics, jwt=_verifier(metrics, algorithms=["RS256"], jwks_file=jwks_file),
                        mtls=MtlsAuthConfig(roles=["service"]))


async def test_client_certificate_authenticates_as_its_common_name(stage):
    ctx = _ctx(cert=_subject("CN=svc-batch,O=Acme,C=DE"))
    await stage(ctx)
    assert ctx.identity is not None
    assert (ctx.identity.subject, ctx.identity.roles, ctx.identity.method) == ("svc-batch", ("service",), "mtls")
    assert ctx.identity.claims == {"sub": "svc-batch", "roles": ["service"]}


async def test_client_certificate_in_any_attribute_order(stage):
    ctx = _ctx(cert=CertificateSubject((("C", "DE"), ("O", "Acme"), ("CN", "svc-x"))))
    await stage(ctx)
    assert ctx.identity is not None and ctx.identity.subject == "svc-x"


async def test_client_certificate_common_name_is_taken_verbatim(stage):
    ctx = _ctx(cert=_subject(r"CN=Doe\, Jane,O=Acme"))
    await stage(ctx)
    assert ctx.identity is not None and ctx.identity.subject == "Doe, Jane"


@pytest.mark.parametrize("subject", [
    _subject("O=Acme"), _subject("CN=a+CN=b"), _subject("CN=a,CN=b"), _cn(""), _cn("svc\nx"),
    _subject("CN=svc\r\nX: y"), CertificateSubject((("O", "x"),)),
    _cn("O=x,CN=svc-batch"),  # a CN that reads like a distinguished name is never read as one
    _subject(r"CN=O\=x\,CN\=svc-batch"), _cn("svc-batch", "svc-batch"),
], ids=["no-cn", "multi-valued-rdn", "two-cns", "empty", "newline", "header-injection", "only-o", "dn-in-cn",
        "dn-in-cn-escaped", "same-cn-twice"])
async def test_certificate_without_a_single_plain_common_name_is_refused(stage, subject):
    with pytest.raises(Unauthenticated):
        await stage(_ctx(cert=subject))


def test_subject_is_parsed_from_the_certificate_itself():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x")]),
                      x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, "O=x,CN=svc-batch")])])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2030, 1, 1)).sign(key, hashes.SHA256()))
    subject = subject_of_certificate(cert.public_bytes(serialization.Encoding.DER))
    assert subject.attributes == (("O", "x"), ("CN", "O=x,CN=svc-batch"))
    assert subject.common_name == "O=x,CN=svc-batch"
    assert subject_of_certificate(b"not a certificate").common_name is None  # unreadable: fails closed


async def test_a_token_wins_over_the_certificate_and_is_always_verified(stage, keys):
    good = _ctx({"Authorization": f"Bearer {_token(keys['rsa'])}"}, cert=_cn("svc"))
    await stage(good)
    assert good.identity is not None and (good.identity.subject, good.identity.method) == ("alice", "jwt")
    bad = _ctx({"Authorization": f"Bearer {_token(keys['rsa2'])}"}, cert=_cn("svc"))
    with pytest.raises(Unauthenticated):
        await stage(bad)
    assert bad.identity is None


async def test_certificate_is_not_an_identity_without_auth_mtls(jwks_file):
    stage = Authenticate(Metrics(), jwt=_verifier(algorithms=["RS256"], jwks_file=jwks_file))
    with pytest.raises(Unauthenticated) as info:
        await stage(_ctx(cert=_cn("svc")))
    assert info.value.error is None


async def test_unverified_connection_is_no_certificate(stage):
    from gateway.http_door import client_certificate

    class Unverified:  # a TLS server that asked for no client certificate cannot have verified one
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

        def getpeercert(self, binary_form: bool = False) -> bytes:
            raise AssertionError("never read")

    assert client_certificate(Unverified()) is None  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated):
        await stage(_ctx())


async def test_no_credentials_is_401_without_an_error_attribute(stage):
    metrics = stage._metrics
    with pytest.raises(Unauthenticated) as info:
        await stage(_ctx())
    assert info.value.headers["WWW-Authenticate"] == 'Bearer realm="maas-gateway"'
    assert info.value.message == "missing credentials"
    assert _sample(metrics, "maas_auth_failures_total", reason="missing") == 1


async def test_two_api_key_headers_are_refused(stage):
    ctx = _ctx([("X-API-Key", "mk_a"), ("X-API-Key", "mk_b")])
    with pytest.raises(InvalidRequest):  # by framing, which runs first: the one home of duplicate headers
        await Framing(1_000_000)(ctx)
        await stage(ctx)


async def test_bearer_on_the_hot_path_is_served_from_the_cache(stage, keys):
    token = _token(keys["rsa"])
    for _ in range(3):
        ctx = _ctx({"Authorization": f"Bearer {token}"})
        await stage(ctx)
        assert ctx.identity is not None and ctx.identity.subject == "alice"
    assert _sample(stage._metrics, "maas_auth_token_cache_total", result="hit") == 2


async def test_stage_lifecycle_with_a_jwks_url(idp, keys):
    stage = Authenticate(Metrics(), jwt=_verifier(algorithms=["RS256"], jwks_url=idp.url))
    await stage.start()
    try:
        assert stage.ready() is None
        ctx = _ctx({"Authorization": f"Bearer {_token(keys['rsa'])}"})
        await stage(ctx)
        assert ctx.identity is not None
    finally:
        await stage.close()
