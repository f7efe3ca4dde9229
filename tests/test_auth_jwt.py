"""JWT verification: algorithms, key sources, claims and the verified-token cache."""

from __future__ import annotations

import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import RSAAlgorithm

from gateway.auth import AuthFailure
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from tests.jwt_support import ISSUER, jwk_of, jwks_file, keys, make_token, make_verifier, sample, write_jwks  # noqa: F401  (fixtures)


@pytest.mark.parametrize(("alg", "key_name"), [
    ("RS256", "rsa"), ("RS384", "rsa"), ("RS512", "rsa"), ("PS256", "rsa"), ("PS384", "rsa"), ("PS512", "rsa"),
    ("ES256", "p256"), ("ES384", "p384"), ("ES512", "p521"), ("EdDSA", "ed"),
])
async def test_every_asymmetric_algorithm_verifies_with_its_key(jwks_file, keys, alg, key_name):
    verifier = make_verifier(algorithms=[alg], jwks_file=jwks_file)
    identity = await verifier.verify(make_token(keys[key_name], alg, kid=key_name))
    assert identity.subject == "alice"
    assert identity.roles == ("analyst",)
    assert identity.method == "jwt"
    assert identity.credential_id == key_name


@pytest.mark.parametrize(("alg", "key_name"), [("ES256", "p384"), ("ES384", "p256"), ("ES512", "p256"),
                                               ("RS256", "p256"), ("EdDSA", "rsa"), ("PS256", "ed")])
async def test_a_key_never_verifies_another_type_or_curve(jwks_file, keys, alg, key_name):
    """The token names a real kid but an algorithm that key's type cannot serve."""
    verifier = make_verifier(algorithms=["RS256", "PS256", "ES256", "ES384", "ES512", "EdDSA"], jwks_file=jwks_file)
    signer = {"ES256": "p256", "ES384": "p384", "ES512": "p521", "RS256": "rsa", "PS256": "rsa", "EdDSA": "ed"}[alg]
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(make_token(keys[signer], alg, kid=key_name))
    assert info.value.reason == "key_mismatch"


async def test_algorithm_outside_the_allow_list_is_refused(jwks_file, keys):
    verifier = make_verifier(algorithms=["ES256"], jwks_file=jwks_file)
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(make_token(keys["rsa"], "RS256", kid="rsa"))
    assert info.value.reason == "algorithm_not_allowed"


async def test_jwk_alg_member_pins_the_algorithm(tmp_path, keys):
    path = write_jwks(tmp_path / "jwks.json", [jwk_of(keys["rsa"], "rsa", alg="RS256", use="sig")])
    verifier = make_verifier(algorithms=["RS256", "PS256"], jwks_file=path)
    assert (await verifier.verify(make_token(keys["rsa"], "RS256"))).subject == "alice"
    with pytest.raises(AuthFailure):
        await verifier.verify(make_token(keys["rsa"], "PS256"))


async def test_encryption_keys_in_a_jwks_are_never_used_for_signatures(tmp_path, keys):
    path = write_jwks(tmp_path / "jwks.json", [jwk_of(keys["rsa"], "enc", use="enc"), jwk_of(keys["rsa2"], "sig")])
    verifier = make_verifier(algorithms=["RS256"], jwks_file=path)
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(make_token(keys["rsa"], kid="enc"))
    assert info.value.reason == "unknown_kid"


async def test_token_without_kid_uses_the_only_fitting_key(tmp_path, keys):
    path = write_jwks(tmp_path / "jwks.json", [jwk_of(keys["rsa"], None), jwk_of(keys["p256"], "p256")])
    verifier = make_verifier(algorithms=["RS256", "ES256"], jwks_file=path)
    assert (await verifier.verify(make_token(keys["rsa"], kid=None))).credential_id is None


async def test_token_without_kid_is_refused_when_several_keys_fit(jwks_file, tmp_path, keys):
    path = write_jwks(tmp_path / "jwks.json", [jwk_of(keys["rsa"], "a"), jwk_of(keys["rsa2"], "b")])
    verifier = make_verifier(algorithms=["RS256"], jwks_file=path)
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(make_token(keys["rsa"], kid=None))
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
    verifier = make_verifier(algorithms=["ES256"], public_key_file=path)
    assert (await verifier.verify(make_token(key, "ES256", kid="whatever"))).subject == "alice"
    with pytest.raises(AuthFailure):
        await verifier.verify(make_token(keys["rsa"], "RS256"))  # not on the list, and not this key's type


async def test_hs256_secret_from_the_environment(monkeypatch, keys):
    secret = "s" * 64
    monkeypatch.setenv("TEST_JWT_SECRET", secret)
    verifier = make_verifier(algorithms=["HS256", "HS512"], hs256_secret_env="TEST_JWT_SECRET")
    for alg in ("HS256", "HS512"):
        assert (await verifier.verify(make_token(secret, alg, kid=None))).subject == "alice"
    with pytest.raises(AuthFailure) as info:
        await verifier.verify(make_token("t" * 64, "HS256", kid=None))
    assert info.value.reason == "bad_signature"
    with pytest.raises(AuthFailure):  # an RSA token where only a secret is configured
        await verifier.verify(make_token(keys["rsa"], "RS256"))


@pytest.mark.parametrize("value", [None, ""])
def test_missing_or_empty_secret_env_stops_start_up(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("TEST_JWT_SECRET", raising=False)
    else:
        monkeypatch.setenv("TEST_JWT_SECRET", value)
    with pytest.raises(ConfigError) as info:
        make_verifier(algorithms=["HS256"], hs256_secret_env="TEST_JWT_SECRET")
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
        make_verifier(algorithms=["RS256"], jwks_file=path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_jwks_file_with_a_private_key_is_refused(tmp_path, keys):
    private = json.loads(RSAAlgorithm.to_jwk(keys["rsa"]))
    path = write_jwks(tmp_path / "jwks.json", [{**private, "kid": "r"}])
    with pytest.raises(ConfigError, match="private key"):
        make_verifier(algorithms=["RS256"], jwks_file=path)


def test_weak_rsa_key_is_refused(tmp_path):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "weak.pem"
    path.write_bytes(weak.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match="too weak"):
        make_verifier(algorithms=["RS256"], public_key_file=path)


def test_private_pem_is_refused(tmp_path, keys):
    path = tmp_path / "private.pem"
    path.write_bytes(keys["p256"].private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="private key"):
        make_verifier(algorithms=["ES256"], public_key_file=path)


async def test_claims_carry_every_token_claim_plus_sub_and_roles(jwks_file, keys):
    verifier = make_verifier(algorithms=["RS256"], jwks_file=jwks_file, subject_claim="email", roles_claim="groups")
    identity = await verifier.verify(make_token(keys["rsa"], email="a@example.org", groups=["x", "y"], clearance=3))
    assert identity.subject == "a@example.org"
    assert identity.roles == ("x", "y")
    assert identity.claims["sub"] == "a@example.org"
    assert identity.claims["roles"] == ["x", "y"]
    assert identity.claims["clearance"] == 3
    assert identity.claims["iss"] == ISSUER
    with pytest.raises(TypeError):
        identity.claims["sub"] = "mallory"  # type: ignore[index]  # shared by cached requests: read-only


async def test_nested_roles_claim(jwks_file, keys):
    verifier = make_verifier(algorithms=["RS256"], jwks_file=jwks_file, roles_claim="realm_access.roles")
    identity = await verifier.verify(make_token(keys["rsa"], realm_access={"roles": ["ops"]}))
    assert identity.roles == ("ops",)


async def test_audience_list_accepts_any_listed_audience(jwks_file, keys):
    verifier = make_verifier(algorithms=["RS256"], jwks_file=jwks_file, audience=["maas", "other"])
    assert (await verifier.verify(make_token(keys["rsa"], aud="other"))).subject == "alice"


async def test_leeway_accepts_a_token_just_expired(jwks_file, keys):
    verifier = make_verifier(algorithms=["RS256"], jwks_file=jwks_file, leeway_s=30.0)
    assert (await verifier.verify(make_token(keys["rsa"], exp=int(time.time()) - 10))).subject == "alice"


async def test_cache_serves_a_verified_token_without_verifying_again(jwks_file, keys):
    metrics = Metrics()
    verifier = make_verifier(metrics, algorithms=["RS256"], jwks_file=jwks_file)
    token = make_token(keys["rsa"])
    assert verifier.cached(token) is None
    identity = await verifier.verify(token)
    for _ in range(5):
        assert verifier.cached(token) is identity
    assert sample(metrics, "maas_auth_token_cache_total", result="hit") == 5
    assert sample(metrics, "maas_auth_token_cache_total", result="miss") == 1


async def test_cache_is_bounded_and_evicts_the_least_recently_used(jwks_file, keys):
    verifier = make_verifier(algorithms=["RS256"], jwks_file=jwks_file, cache_size=3)
    tokens = [make_token(keys["rsa"], sub=f"user{i}") for i in range(4)]
    for token in tokens[:3]:
        verifier.cached(token)
        await verifier.verify(token)
    assert verifier.cached(tokens[0]) is not None  # now the most recently used
    await verifier.verify(tokens[3])  # evicts tokens[1]
    assert verifier.cached(tokens[1]) is None
    assert all(verifier.cached(t) is not None for t in (tokens[0], tokens[2], tokens[3]))


async def test_cache_size_zero_disables_the_cache(jwks_file, keys):
    verifier = make_verifier(algorithms=["RS256"], jwks_file=jwks_file, cache_size=0)
    token = make_token(keys["rsa"])
    await verifier.verify(token)
    assert verifier.cached(token) is None


async def test_refused_tokens_are_never_cached(jwks_file, keys):
    verifier = make_verifier(algorithms=["RS256"], jwks_file=jwks_file)
    token = make_token(keys["rsa"], iss="https://evil.example")
    for _ in range(2):
        with pytest.raises(AuthFailure):
            await verifier.verify(token)
        assert verifier.cached(token) is None


async def test_reloading_a_jwks_file_without_the_key_drops_cached_tokens(tmp_path, keys):
    path = write_jwks(tmp_path / "jwks.json", [jwk_of(keys["rsa"], "rsa")])
    verifier = make_verifier(algorithms=["RS256"], jwks_file=path)
    token = make_token(keys["rsa"])
    await verifier.verify(token)
    assert verifier.cached(token) is not None
    write_jwks(path, [jwk_of(keys["rsa2"], "rsa2")])
    verifier.reload()
    assert verifier.cached(token) is None
    with pytest.raises(AuthFailure):
        await verifier.verify(token)


def test_reloading_a_broken_jwks_file_keeps_the_old_keys(tmp_path, keys):
    path = write_jwks(tmp_path / "jwks.json", [jwk_of(keys["rsa"], "rsa")])
    verifier = make_verifier(algorithms=["RS256"], jwks_file=path)
    before = verifier.keys.keyset
    path.write_text("{broken")
    with pytest.raises(ConfigError):
        verifier.reload()
    assert verifier.keys.keyset is before
