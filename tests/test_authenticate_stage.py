"""The authenticate stage: client certificates (mTLS), credential headers, the cached hot path."""

from __future__ import annotations

import datetime
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.config import MtlsAuthConfig
from gateway.errors import InvalidRequest, Unauthenticated
from gateway.metrics import Metrics
from gateway.request import CertificateSubject, subject_of_certificate
from gateway.stages.authenticate import Authenticate
from gateway.stages.framing import Framing
from tests.jwt_support import cn_subject, jwks_file, keys, make_ctx, make_token, make_verifier, sample, subject_of  # noqa: F401  (fixtures)


@pytest.fixture
def stage(jwks_file) -> Authenticate:
    metrics = Metrics()
    return Authenticate(metrics, jwt=make_verifier(metrics, algorithms=["RS256"], jwks_file=jwks_file),
                        mtls=MtlsAuthConfig(roles=["service"]))


async def test_client_certificate_authenticates_as_its_common_name(stage):
    ctx = make_ctx(cert=subject_of("CN=svc-batch,O=Acme,C=DE"))
    await stage(ctx)
    assert ctx.identity is not None
    assert (ctx.identity.subject, ctx.identity.roles, ctx.identity.method) == ("svc-batch", ("service",), "mtls")
    assert ctx.identity.claims == {"sub": "svc-batch", "roles": ["service"]}


async def test_client_certificate_in_any_attribute_order(stage):
    ctx = make_ctx(cert=CertificateSubject((("C", "DE"), ("O", "Acme"), ("CN", "svc-x"))))
    await stage(ctx)
    assert ctx.identity is not None and ctx.identity.subject == "svc-x"


async def test_client_certificate_common_name_is_taken_verbatim(stage):
    ctx = make_ctx(cert=subject_of(r"CN=Doe\, Jane,O=Acme"))
    await stage(ctx)
    assert ctx.identity is not None and ctx.identity.subject == "Doe, Jane"


@pytest.mark.parametrize("subject", [
    subject_of("O=Acme"), subject_of("CN=a+CN=b"), subject_of("CN=a,CN=b"), cn_subject(""), cn_subject("svc\nx"),
    subject_of("CN=svc\r\nX: y"), CertificateSubject((("O", "x"),)),
    cn_subject("O=x,CN=svc-batch"),  # a CN that reads like a distinguished name is never read as one
    subject_of(r"CN=O\=x\,CN\=svc-batch"), cn_subject("svc-batch", "svc-batch"),
], ids=["no-cn", "multi-valued-rdn", "two-cns", "empty", "newline", "header-injection", "only-o", "dn-in-cn",
        "dn-in-cn-escaped", "same-cn-twice"])
async def test_certificate_without_a_single_plain_common_name_is_refused(stage, subject):
    with pytest.raises(Unauthenticated):
        await stage(make_ctx(cert=subject))


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
    good = make_ctx({"Authorization": f"Bearer {make_token(keys['rsa'])}"}, cert=cn_subject("svc"))
    await stage(good)
    assert good.identity is not None and (good.identity.subject, good.identity.method) == ("alice", "jwt")
    bad = make_ctx({"Authorization": f"Bearer {make_token(keys['rsa2'])}"}, cert=cn_subject("svc"))
    with pytest.raises(Unauthenticated):
        await stage(bad)
    assert bad.identity is None


async def test_certificate_is_not_an_identity_without_auth_mtls(jwks_file):
    stage = Authenticate(Metrics(), jwt=make_verifier(algorithms=["RS256"], jwks_file=jwks_file))
    with pytest.raises(Unauthenticated) as info:
        await stage(make_ctx(cert=cn_subject("svc")))
    assert info.value.error is None


async def test_unverified_connection_is_no_certificate(stage):
    from gateway.http_request import client_certificate

    class Unverified:  # a TLS server that asked for no client certificate cannot have verified one
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

        def getpeercert(self, binary_form: bool = False) -> bytes:
            raise AssertionError("never read")

    assert client_certificate(Unverified()) is None  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated):
        await stage(make_ctx())


async def test_no_credentials_is_401_without_an_error_attribute(stage):
    metrics = stage._metrics
    with pytest.raises(Unauthenticated) as info:
        await stage(make_ctx())
    assert info.value.headers["WWW-Authenticate"] == 'Bearer realm="maas-gateway"'
    assert info.value.message == "missing credentials"
    assert sample(metrics, "maas_auth_failures_total", reason="missing") == 1


async def test_two_api_key_headers_are_refused(stage):
    ctx = make_ctx([("X-API-Key", "mk_a"), ("X-API-Key", "mk_b")])
    with pytest.raises(InvalidRequest):  # by framing, which runs first: the one home of duplicate headers
        await Framing(1_000_000)(ctx)
        await stage(ctx)


async def test_bearer_on_the_hot_path_is_served_from_the_cache(stage, keys):
    token = make_token(keys["rsa"])
    for _ in range(3):
        ctx = make_ctx({"Authorization": f"Bearer {token}"})
        await stage(ctx)
        assert ctx.identity is not None and ctx.identity.subject == "alice"
    assert sample(stage._metrics, "maas_auth_token_cache_total", result="hit") == 2
