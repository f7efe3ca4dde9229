"""Keys, tokens, verifiers and contexts shared by the JWT and authenticate-stage tests."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.auth.jwt import JwtVerifier
from gateway.config import JwtConfig
from gateway.metrics import Metrics
from gateway.pipeline import RequestContext
from gateway.request import BufferedRequest, CertificateSubject, subject_of_name

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


def jwk_of(private_key: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
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


def write_jwks(path: Path, jwks: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"keys": jwks}))
    return path


@pytest.fixture(scope="module")
def jwks_file(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Any]) -> Path:
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    return write_jwks(path, [jwk_of(keys[name], name) for name in ("rsa", "p256", "p384", "p521", "ed")])


def claims_with(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, "roles": ["analyst"]}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def make_token(key: Any, alg: str = "RS256", kid: str | None = "rsa", **claims: Any) -> str:
    return jwt.encode(claims_with(**claims), key, algorithm=alg, headers={"kid": kid} if kid else None)


def make_verifier(metrics: Metrics | None = None, **settings: Any) -> JwtVerifier:
    base: dict[str, Any] = dict(issuer=ISSUER, audience=AUDIENCE, leeway_s=5.0)
    base.update(settings)
    return JwtVerifier.from_config(JwtConfig(**base), metrics or Metrics())


def make_ctx(headers: Any = None, *, cert: CertificateSubject | None = None) -> RequestContext:
    """A request as the door hands it on; ``cert``: the subject of a client certificate the handshake verified."""
    request = BufferedRequest("GET", "/v1/models", headers=headers or {}, secure=cert is not None, client_subject=cert)
    return RequestContext(request, "t", 0.0)


def subject_of(dn: str) -> CertificateSubject:
    """The subject of a certificate whose subject is the RFC 4514 name ``dn``."""
    return subject_of_name(x509.Name.from_rfc4514_string(dn))


def cn_subject(*names: str) -> CertificateSubject:
    """A subject of only these common names, verbatim."""
    return CertificateSubject(tuple(("CN", name) for name in names))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0
